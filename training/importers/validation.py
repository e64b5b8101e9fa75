"""What every importer shares: the report and its row errors, the rows' shapes, cleaning and checking.

`ImportReport` counts rows and keeps their errors (row number, key, field,
reason); `validate_rows` drops duplicate keys and text PostgreSQL cannot
store, and hashes each row's content; `csv_safe` and `write_csv` write
reports back as CSV without formula injection. Nothing here reads files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from embedportal import json_limits

# Errors kept in the report shown on the page / returned by the API.
MAX_REPORTED_ERRORS = 50
# Errors kept with a dataset version for the CSV download.
MAX_STORED_ERRORS = 10_000
# A single cell longer than this is rejected (row + field named): no ticket
# or answer is a million characters, and such a cell is nearly always a broken
# quote swallowing the rest of the file.
MAX_CELL_CHARS = 1_000_000
PREVIEW_ROWS = 10
# Buckets (upper bounds, in characters of title + body) of the length distribution.
LENGTH_BUCKETS = (100, 500, 2000, 10000)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

FORMATS = {
    "jira_json": "Jira REST JSON",
    "jira_csv": "Jira CSV export",
    "jira_links": "Jira duplicate links CSV",
    "stackfaq": "FAQ with paraphrases (StackFAQ JSON)",
    "qa": "Q&A (question, answer)",
    "pairs": "Pairs (anchor, positive[, score])",
    "triplets": "Triplets (anchor, positive, negative)",
    "labelled": "Text + label",
    "mapped": "Columns mapped by hand",
}
FORMAT_KIND = {
    "jira_json": "tickets", "jira_csv": "tickets", "stackfaq": "qa", "qa": "qa",
    "pairs": "pairs", "triplets": "triplets", "labelled": "labelled",
}


class UploadError(ValueError):
    """The upload as a whole cannot be imported; the message says why and what to do.

    columns: the file's column names when they are known (a file that needs a
    column mapping), so a preview can offer them.
    """

    def __init__(self, message: str, *, columns: list[str] | None = None):
        super().__init__(message)
        self.columns = columns or []


class RowLimitReached(Exception):
    """A report's row_limit was reached: the reading stops there (a preview has seen enough)."""


@dataclass
class ParsedDocument:
    external_key: str
    title: str
    body: str
    metadata: dict[str, Any]
    row: int = 0


@dataclass
class StagedRow:
    """A validated row, ready to store: metadata already serialised, content hashed."""

    row: int
    external_key: str
    title: str
    body: str
    metadata_json: str
    content_hash: str


@dataclass
class ImportReport:
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    # Rows merged into an earlier row with the same key and the same content (an exact repeat):
    # rows_read = rows_accepted + rows_rejected + duplicates. `merged` lists the first of them.
    duplicates: int = 0
    merged: list[dict[str, Any]] = field(default_factory=list)
    empty_bodies: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    all_errors: list[dict[str, Any]] = field(default_factory=list)
    errors_not_stored: int = 0
    detected_format: str = ""
    encoding: str = ""
    delimiter: str = ""
    columns: list[str] = field(default_factory=list)
    mapping: dict[str, Any] = field(default_factory=dict)
    length_min: int | None = None
    length_max: int = 0
    length_total: int = 0
    length_buckets: list[int] = field(default_factory=lambda: [0] * (len(LENGTH_BUCKETS) + 1))
    # Previews stop after this many rows (RowLimitReached); imports read every row.
    row_limit: int | None = None

    def read_row(self) -> None:
        """Count one row of the file; RowLimitReached instead once row_limit rows were read."""
        if self.row_limit is not None and self.rows_read >= self.row_limit:
            raise RowLimitReached(self.row_limit)
        self.rows_read += 1

    def reject(self, *, row: int, field_name: str, reason: str, key: str = "") -> None:
        self.rows_rejected += 1
        error = {"row": row, "key": key, "field": field_name, "reason": reason}
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)
        if len(self.all_errors) < MAX_STORED_ERRORS:
            self.all_errors.append(error)
        else:
            self.errors_not_stored += 1

    def merge(self, *, row: int, key: str, first_row: int, reason: str = "") -> None:
        """Count a row merged into an earlier one, listing it with why (the first few on the page, up to
        MAX_STORED_ERRORS in the version's CSV of rows not imported as their own document, field "(merged)")."""
        self.duplicates += 1
        entry = {"row": row, "key": key, "reason": reason or f"the same as row {first_row}: merged into it"}
        if len(self.merged) < MAX_REPORTED_ERRORS:
            self.merged.append(entry)
        if len(self.all_errors) < MAX_STORED_ERRORS:
            self.all_errors.append({"row": row, "key": key, "field": "(merged)", "reason": entry["reason"]})

    def accept(self, *, title: str, body: str) -> None:
        self.rows_accepted += 1
        if not body.strip():
            self.empty_bodies += 1
        length = len(title) + len(body)
        self.length_min = length if self.length_min is None else min(self.length_min, length)
        self.length_max = max(self.length_max, length)
        self.length_total += length
        for i, bound in enumerate(LENGTH_BUCKETS):
            if length < bound:
                self.length_buckets[i] += 1
                break
        else:
            self.length_buckets[-1] += 1

    def length_distribution(self) -> dict[str, Any]:
        labels = []
        lower = 0
        for bound in LENGTH_BUCKETS:
            labels.append(f"{lower}-{bound - 1}")
            lower = bound
        labels.append(f">={LENGTH_BUCKETS[-1]}")
        return {
            "min": self.length_min or 0,
            "max": self.length_max,
            "mean": round(self.length_total / self.rows_accepted, 1) if self.rows_accepted else 0,
            # A list, not an object: jsonb would reorder the keys.
            "buckets": [{"range": label, "count": count} for label, count in zip(labels, self.length_buckets)],
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "detected_format": self.detected_format,
            "encoding": self.encoding,
            "delimiter": self.delimiter,
            "columns": self.columns,
            "mapping": self.mapping,
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "duplicates": self.duplicates,
            "rows_merged": self.duplicates,
            "merged": self.merged,
            "empty_bodies": self.empty_bodies,
            "text_length": self.length_distribution(),
            "errors": self.errors,
            "errors_not_stored": self.errors_not_stored,
        }


@dataclass
class Upload:
    """What read_upload recognised, and the rows it yields (a one-shot iterator)."""

    format: str
    kind: str
    columns: list[str]
    mapping: dict[str, Any]
    documents: Iterator[ParsedDocument]


def check_kind(filename: str, fmt: str, kind: str) -> None:
    expected = FORMAT_KIND.get(fmt)
    if kind and expected and kind != expected:
        raise UploadError(
            f"kind: {filename} is a {FORMATS[fmt]} file, which makes a {expected!r} dataset, not {kind!r}. "
            f"Choose kind {expected!r}, or map its columns by hand."
        )


def undecodable(value: str) -> str | None:
    for ch in value:
        if "\udc80" <= ch <= "\udcff":
            return f"invalid byte 0x{ord(ch) - 0xDC00:02X} (not UTF-8 text); save the file as UTF-8"
    return None


def csv_safe(value: Any) -> str:
    """A cell for a CSV we write back: formula prefixes neutralised (CWE-1236)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def write_csv(rows: Iterable[Iterable[Any]]) -> Iterator[str]:
    """CSV lines (for a streaming response), every cell passed through csv_safe."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow([csv_safe(cell) for cell in row])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


# --- Validation -----------------------------------------------------------------------------


def validate_rows(documents: Iterable[ParsedDocument], report: ImportReport) -> Iterator[StagedRow]:
    """Reject text PostgreSQL cannot store and conflicting keys; hash and count the rest.

    The first row with a key wins. A later row with the same key and the same
    content is counted as a duplicate and skipped; one with other content is
    also rejected (row, field "key"), so strict mode refuses it. NUL
    characters (which PostgreSQL text cannot hold) are removed.
    """
    # key -> (60 bits of the content hash << 32) | row: one small int per key
    # keeps 1M keys at ~150 MB (a (row, hexdigest) tuple cost twice that).
    first_row: dict[str, int] = {}
    for doc in documents:
        key = doc.external_key.replace("\x00", "")
        title = _clean_text(doc.title)
        body = _clean_text(doc.body)
        if json_limits.depth_exceeds(doc.metadata):
            report.reject(row=doc.row, key=key.encode("utf-8", "replace").decode("utf-8"), field_name="metadata",
                          reason=f"a value nests more than {json_limits.MAX_DEPTH} levels deep; flatten it")
            continue
        metadata_json = canonical_json(doc.metadata)
        problem = None
        for name, value in (("key", key), ("title", title), ("body", body), ("metadata", metadata_json)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                problem = (name, undecodable(value) or "text that cannot be stored")
                break
        if problem is None:
            # CSV cells are checked per column on the way in; this covers JSON, JSONL and Parquet.
            too_long = next(((n, v) for n, v in (("title", title), ("body", body)) if len(v) > MAX_CELL_CHARS), None)
            if too_long is not None:
                problem = (too_long[0], f"{len(too_long[1]):,} characters, above the {MAX_CELL_CHARS:,} limit")
        if problem is not None:
            report.reject(row=doc.row, key=key.encode("utf-8", "replace").decode("utf-8"),
                          field_name=problem[0], reason=problem[1])
            continue
        digest = content_hash(key, title, body, metadata_json)
        packed = (int(digest[:15], 16) << 32) | (doc.row & 0xFFFFFFFF)
        if key in first_row:
            first = first_row[key] & 0xFFFFFFFF
            if first_row[key] >> 32 != packed >> 32:
                # Same key, other content: which one is right is the user's call, so say so.
                report.reject(row=doc.row, key=key, field_name="key",
                              reason=f"duplicate key with different content (first seen in row {first}); "
                                     "this row was skipped")
            else:  # an exact repeat: counted and listed as merged, never dropped silently
                report.merge(row=doc.row, key=key, first_row=first)
            continue
        first_row[key] = packed
        report.accept(title=title, body=body)
        yield StagedRow(doc.row, key, title, body, metadata_json, digest)


def _clean_text(value: str) -> str:
    """No NUL (PostgreSQL text cannot hold it); one newline convention whatever the exporter used."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if "\r" in value:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    return value


def canonical_json(metadata: dict[str, Any]) -> str:
    """Metadata as stored and hashed: sorted keys (jsonb reorders them anyway), no NUL.

    NUL is removed from the values, not from the serialised text: there a
    person's literal backslash-u0000 was cut in half, leaving JSON that
    PostgreSQL refused at import time (a 500 after a clean preview).
    The caller bounds the depth (json_limits.depth_exceeds).
    """
    return json.dumps(json_limits.strip_nul(metadata), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def content_hash(key: str, title: str, body: str, metadata_json: str) -> str:
    return hashlib.sha1("\x1f".join((key, title, body, metadata_json)).encode("utf-8")).hexdigest()


def preview_row(row: StagedRow) -> dict[str, Any]:
    return {
        "row": row.row,
        "key": row.external_key,
        "title": row.title[:500],
        "body": row.body[:500],
        "metadata": json.loads(row.metadata_json),
    }


def error_csv_rows(errors: Iterable[dict[str, Any]]) -> Iterator[list[Any]]:
    yield ["row", "key", "field", "reason"]
    for error in errors:
        yield [error.get("row"), error.get("key"), error.get("field"), error.get("reason")]
