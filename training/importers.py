"""Parsers that turn an uploaded export into validated rows.

Every upload goes through the same three steps:

1. `open_payload` opens the file on disk (plain, gzip or zip) behind a guard
   that stops zip bombs and turns a damaged archive into an UploadError;
2. `read_upload` recognises the format (Jira REST JSON, Jira CSV, Q&A CSV/JSONL,
   StackFAQ JSON, pairs, triplets, text + label, or any CSV/JSONL/Parquet with
   a column mapping), the encoding and the delimiter, and yields
   `ParsedDocument`s, rejecting bad rows into the `ImportReport` with their row
   number, field and reason;
3. `validate_rows` drops duplicate keys and text PostgreSQL cannot store, and
   computes each row's content hash and the report's figures.

Nothing here touches the database: training.datasets stores what comes out.
A file that cannot be read at all raises `UploadError` with a message a person
can act on; one bad row never does.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from embedportal import json_limits

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
PARQUET_MAGIC = b"PAR1"
# A compressed upload may expand at most this much (plus 1 MB of slack for
# tiny files): a guard against zip and gzip bombs. Real exports expand ~7x
# (the Hadoop JSON: 6.4 MB -> 46 MB).
MAX_ZIP_RATIO = 200
BOMB_SLACK_BYTES = 1 << 20
# A whole JSON document (not JSON Lines) may nest this deep: a Jira issue
# nests ~10 levels and its Atlassian Document Format description ~20 more.
# Deeper documents are refused before any value is walked, so nothing below
# (repr, json.dumps, the ADF reader) meets the interpreter's recursion limit.
MAX_DOCUMENT_DEPTH = 64
# A Parquet file may declare at most this many rows: a row costs a few bytes
# on disk with run-length encoding, so the byte guards alone would let
# billions of empty rows through, each one looked at in Python.
MAX_PARQUET_ROWS = 20_000_000
# Errors kept in the report shown on the page / returned by the API.
MAX_REPORTED_ERRORS = 50
# Errors kept with a dataset version for the CSV download.
MAX_STORED_ERRORS = 10_000
# A single cell longer than this is rejected (row + field named): no ticket
# or answer is a million characters, and such a cell is nearly always a broken
# quote swallowing the rest of the file.
MAX_CELL_CHARS = 1_000_000
# The csv module's own ceiling (default 128 KiB) is raised so that the cell
# above is seen and reported instead of aborting the parse.
csv.field_size_limit(64 * 1024 * 1024)
SNIFF_BYTES = 64 * 1024
PREVIEW_ROWS = 10
# Buckets (upper bounds, in characters of title + body) of the length distribution.
LENGTH_BUCKETS = (100, 500, 2000, 10000)
CSV_DELIMITERS = (",", ";", "\t", "|")
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
ROLES = ("key", "title", "body", "label", "group", "date", "negative", "score")
# The roles each kind needs mapped, with the names a person knows them by.
REQUIRED_ROLES = {
    "tickets": {"title": "summary"},
    "qa": {"title": "question", "body": "answer"},
    "pairs": {"title": "anchor", "body": "positive"},
    "triplets": {"title": "anchor", "body": "positive", "negative": "negative"},
    "labelled": {"title": "text", "label": "label"},
}
# Column names recognised without a mapping (lowercased), per role, per format.
_SYNONYMS = {
    "qa": {"title": ("question", "q", "query"), "body": ("answer", "a", "response")},
    "triplets": {"title": ("anchor", "query"), "body": ("positive",), "negative": ("negative",)},
    "pairs": {
        "title": ("anchor", "sentence1", "question_1", "text1", "query"),
        "body": ("positive", "sentence2", "question_2", "text2"),
    },
    "labelled": {"title": ("text", "sentence"), "label": ("label", "class", "category")},
}
_OPTIONAL = {
    "key": ("id", "key", "qid", "question_id"),
    "label": ("category", "class", "label", "topic"),
    "group": ("group", "group_id", "answer_id", "cluster"),
    "date": ("last_update", "date", "updated", "created"),
    "score": ("score", "similar", "similarity", "label"),
}
JIRA_DATE_FORMATS = ("%d/%b/%y %H:%M", "%d/%b/%y %I:%M %p", "%d/%b/%Y %H:%M", "%d/%b/%Y %I:%M %p",
                     "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%d")
_LINK_COLUMN = re.compile(r"^(outward|inward) issue link \((.+)\)$", re.IGNORECASE)
_JIRA_LIST_COLUMNS = {
    "component/s": "components", "labels": "labels", "affects version/s": "affects_versions",
    "fix version/s": "fix_versions",
}
_JIRA_TEXT_COLUMNS = {
    "issue type": "issue_type", "priority": "priority", "status": "status", "resolution": "resolution",
    "project key": "project", "reporter": "reporter", "assignee": "assignee",
}
_JIRA_DATE_COLUMNS = {"created": "created", "updated": "updated", "resolved": "resolved"}


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
    duplicates: int = 0
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


# --- Opening (plain, gzip, zip) ----------------------------------------------------


class _GuardedReader(io.RawIOBase):
    """Counts the bytes a compressed payload expands to and maps damage to UploadError."""

    def __init__(self, raw: IO[bytes], *, limit: int, filename: str, closers: tuple = (), cap: int | None = None):
        self._raw = raw
        # The ratio limit, or the absolute cap (the caller's max_bytes) when that is lower.
        self._by_cap = cap is not None and cap < limit
        self._limit = cap if self._by_cap else limit
        self._filename = filename
        self._closers = closers
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self._raw.readinto(buffer)
        except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as exc:
            raise UploadError(
                f"{self._filename}: the compressed file is damaged or truncated ({exc}). Export it again and re-upload."
            ) from None
        self.produced += n or 0
        if self.produced > self._limit and self._by_cap:
            raise UploadError(_expanded_too_far(self._filename, self._limit))
        if self.produced > self._limit:
            raise UploadError(
                f"{self._filename}: the compressed file expands more than {MAX_ZIP_RATIO}x, above the limit "
                "for compressed uploads (a zip bomb?). Upload the file uncompressed."
            )
        return n or 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            for closer in self._closers:
                closer.close()
        super().close()


def _expanded_too_far(filename: str, cap: int) -> str:
    return (f"{filename}: the compressed file expands to more than {cap // 1048576} MB, the limit for a compressed "
            "upload here (EMBEDPORTAL_MAX_DECOMPRESSED_MB; during a web request, twice "
            "EMBEDPORTAL_BACKGROUND_IMPORT_MB). Upload it uncompressed, or split it into smaller files.")


def declared_expanded_size(source: Path | IO[bytes]) -> int | None:
    """What a compressed file says it expands to (gzip trailer, zip member headers); None for other files.

    source: a path or a seekable binary file (left at the position it had).
    Only a hint for deciding where to import (headers can lie; the guarded
    readers count what really comes out). A gzip trailer holds the size
    modulo 4 GiB of its last member only.
    """
    fh = open(source, "rb") if isinstance(source, Path) else source
    start = fh.tell()
    try:
        fh.seek(0)
        head = fh.read(4)
        if head.startswith(GZIP_MAGIC):
            fh.seek(-4, io.SEEK_END)
            return int.from_bytes(fh.read(4), "little")
        if head.startswith(ZIP_MAGIC):
            fh.seek(0)
            with zipfile.ZipFile(fh) as archive:
                return sum(m.file_size for m in archive.infolist() if not m.is_dir())
        return None
    except (OSError, zipfile.BadZipFile, EOFError):  # damaged, which reading it will say
        return None
    finally:
        if isinstance(source, Path):
            fh.close()
        else:
            fh.seek(start)


def open_payload(path: Path, filename: str, max_bytes: int | None = None) -> IO[bytes]:
    """Open a plain, gzip or zip file as a buffered binary stream of its (first) payload.

    A compressed payload may expand at most MAX_ZIP_RATIO times its size and,
    when max_bytes is given, to at most max_bytes: past either, reading
    raises UploadError naming the file.
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise UploadError(f"{filename}: the file is empty. Upload an export with at least one row.")
    size = path.stat().st_size
    if head.startswith(GZIP_MAGIC):
        raw = gzip.open(path, "rb")
        limit = size * MAX_ZIP_RATIO + BOMB_SLACK_BYTES
        return io.BufferedReader(_GuardedReader(raw, limit=limit, filename=filename, cap=max_bytes),
                                 buffer_size=1 << 16)
    if head.startswith(ZIP_MAGIC):
        return _open_zip_member(path, filename, max_bytes)
    return open(path, "rb", buffering=1 << 20)


def _open_zip_member(path: Path, filename: str, max_bytes: int | None = None) -> IO[bytes]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UploadError(
            f"{filename}: not a readable zip archive, damaged or truncated ({exc}). Re-create the archive and upload it again."
        ) from None
    members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
    if not members:
        archive.close()
        raise UploadError(f"{filename}: the zip archive holds no file. Put the export file in it.")
    member = members[0]
    if member.compress_size and member.file_size / member.compress_size > MAX_ZIP_RATIO:
        archive.close()
        raise UploadError(
            f"{filename}: {member.filename} expands {member.file_size // max(member.compress_size, 1)}x, "
            f"above the {MAX_ZIP_RATIO}x limit for compressed uploads. Upload the file uncompressed."
        )
    if max_bytes is not None and member.file_size > max_bytes:
        archive.close()
        raise UploadError(_expanded_too_far(f"{filename}: {member.filename}", max_bytes))
    try:
        stream = archive.open(member)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        archive.close()
        raise UploadError(f"{filename}: cannot read {member.filename} in the archive ({exc}).") from None
    # The declared sizes can lie: count what really comes out.
    limit = max(member.compress_size, 1) * MAX_ZIP_RATIO + BOMB_SLACK_BYTES
    guarded = _GuardedReader(stream, limit=limit, filename=filename, closers=(archive,), cap=max_bytes)
    return io.BufferedReader(guarded, buffer_size=1 << 16)


def _read_all(path: Path, filename: str, max_bytes: int | None = None) -> bytes:
    with open_payload(path, filename, max_bytes) as stream:
        return stream.read()


# --- Encodings and text ------------------------------------------------------------


def detect_encoding(head: bytes) -> str:
    """BOMs first; then UTF-8 if the sample is UTF-8 (or mostly is); else cp1252.

    A sample with valid multi-byte UTF-8 *and* stray bytes is UTF-8 with a few
    bad rows (reported row by row); one with stray bytes only is cp1252.
    """
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    sample = head[:4096]
    if len(sample) >= 4 and sample.count(b"\x00") >= len(sample) // 4:
        return "utf-16-le" if sample[1:2] == b"\x00" else "utf-16-be"
    text = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape").decode(head, final=False)
    bad = sum(1 for ch in text if "\udc80" <= ch <= "\udcff")
    if not bad:
        return "utf-8"
    good = sum(1 for ch in text if ord(ch) > 127 and not ("\udc80" <= ch <= "\udcff"))
    return "utf-8" if good else "cp1252"


def _text_stream(binary: IO[bytes], encoding: str) -> IO[str]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so the row
    # holding them is rejected with its field instead of failing the file.
    errors = "replace" if encoding.startswith("utf-16") else "surrogateescape"
    return io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline="")


def _undecodable(value: str) -> str | None:
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


def parse_date(value: str) -> str:
    """ISO 8601 for the date formats Jira exports use; the input unchanged otherwise."""
    value = value.strip()
    for fmt in JIRA_DATE_FORMATS:
        try:
            return datetime.strptime(value, fmt).isoformat()
        except ValueError:
            continue
    return value


# --- Format recognition --------------------------------------------------------------


def read_upload(
    path: Path, filename: str, report: ImportReport, *, kind: str = "", mapping: dict[str, Any] | None = None,
    max_bytes: int | None = None,
) -> Upload:
    """Recognise the file and return its rows as an iterator of ParsedDocument.

    kind: what the caller expects ("" = whatever the file is); mapping: which
    column plays which role, for files that are not a known export (a known
    export is read as such unless a mapping is given); max_bytes: how far a
    compressed file (gzip, zip, Parquet pages) may expand, besides the
    MAX_ZIP_RATIO guard.
    """
    with open_payload(path, filename, max_bytes) as stream:
        head = stream.read(SNIFF_BYTES)
    if not head.strip():
        raise UploadError(f"{filename}: the file is empty. Upload an export with at least one row.")
    if head.startswith(PARQUET_MAGIC):
        upload = _read_parquet(path, filename, report, kind=kind, mapping=mapping, max_bytes=max_bytes)
    else:
        encoding = detect_encoding(head)
        if not encoding.startswith("utf-16") and b"\x00" in head[:8192]:
            raise UploadError(
                f"{filename}: this is a binary file, not an export. Upload a JSON, JSONL, CSV or Parquet file."
            )
        report.encoding = encoding
        text_head = head.decode(encoding, errors="replace").lstrip("\ufeff \t\r\n")
        if text_head.startswith(("{", "[")):
            upload = _read_json_family(path, filename, report, text_head, encoding, kind=kind, mapping=mapping,
                                       max_bytes=max_bytes)
        else:
            upload = _read_csv(path, filename, report, text_head, encoding, kind=kind, mapping=mapping,
                               max_bytes=max_bytes)
    report.detected_format = upload.format
    report.columns = upload.columns
    report.mapping = upload.mapping
    return upload


def _is_jsonl(text_head: str) -> bool:
    first, sep, rest = text_head.partition("\n")
    if not sep or not first.strip().startswith("{"):
        return False
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    except (RecursionError, ValueError):
        pass  # one object on the line, too deep or with a too long number: its row is rejected as such

    return rest.lstrip().startswith("{") or not rest.strip()


def _read_json_family(path, filename, report, text_head, encoding, *, kind, mapping, max_bytes=None) -> Upload:
    if _is_jsonl(text_head):
        return _tabular(filename, report, _jsonl_records(path, filename, encoding, max_bytes), kind=kind,
                        mapping=mapping, fmt_hint="jsonl")
    payload = _load_json(path, filename, encoding, max_bytes)
    if isinstance(payload, dict) and isinstance(payload.get("root"), dict) and "qapair" in payload["root"]:
        _check_kind(filename, "stackfaq", kind)
        return Upload("stackfaq", "qa", [], {}, _stackfaq(payload["root"]["qapair"], filename, report))
    issues = _jira_issue_list(payload)
    if issues is not None and not mapping:
        _check_kind(filename, "jira_json", kind)
        if not issues:
            raise UploadError(f"{filename}: the export contains no issues.")
        return Upload("jira_json", "tickets", [], {}, _jira_issues(issues, report))
    if isinstance(payload, list) and payload and all(isinstance(item, dict) for item in payload[:100]):
        records = ((row, item) for row, item in enumerate(payload, start=1))
        return _tabular(filename, report, _records_with_columns(records), kind=kind, mapping=mapping,
                        fmt_hint="json")
    raise UploadError(
        f"{filename}: this JSON is not an export we can read. Expected a Jira /rest/api/2/search response "
        "(an object with an \"issues\" list), a list of issues, one issue with \"key\" and \"fields\", "
        "a StackFAQ file ({\"root\": {\"qapair\": [...]}}), a list of objects, or JSON Lines."
    )


def _load_json(path: Path, filename: str, encoding: str, max_bytes: int | None = None) -> Any:
    raw = _read_all(path, filename, max_bytes)
    # Undecodable bytes become lone surrogates; validate_rows rejects the rows holding them.
    text = raw.decode(encoding, errors="replace" if encoding.startswith("utf-16") else "surrogateescape")
    del raw
    try:
        payload = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as exc:
        raise UploadError(
            f"{filename}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Upload the response of Jira's /rest/api/2/search, a list of issues, or one issue."
        ) from None
    except RecursionError:
        payload = None  # refused below, with the same message as a deep document json could read
    except ValueError as exc:  # not a JSONDecodeError: an integer above Python's 4,300-digit limit
        raise UploadError(f"{filename}: a number in the JSON is too long to read ({str(exc).split(';')[0]}); "
                          "export it as text.") from None
    else:
        if not json_limits.depth_exceeds(payload, MAX_DOCUMENT_DEPTH):
            return payload
    raise UploadError(f"{filename}: the JSON nests more than {MAX_DOCUMENT_DEPTH} levels deep, deeper than any "
                      "export; check that this is the export file.")


def _jira_issue_list(payload: Any) -> list | None:
    if isinstance(payload, dict) and isinstance(payload.get("issues"), list):
        return payload["issues"]
    if isinstance(payload, dict) and "key" in payload and isinstance(payload.get("fields"), dict):
        return [payload]
    if isinstance(payload, list) and payload and isinstance(payload[0], dict) and "fields" in payload[0]:
        return payload
    return None


def _check_kind(filename: str, fmt: str, kind: str) -> None:
    expected = FORMAT_KIND.get(fmt)
    if kind and expected and kind != expected:
        raise UploadError(
            f"kind: {filename} is a {FORMATS[fmt]} file, which makes a {expected!r} dataset, not {kind!r}. "
            f"Choose kind {expected!r}, or map its columns by hand."
        )


# --- Jira REST JSON -----------------------------------------------------------------


def _jira_issues(issues: list, report: ImportReport) -> Iterator[ParsedDocument]:
    for row, issue in enumerate(issues, start=1):
        report.read_row()
        doc = _jira_issue(issue, row, report)
        if doc is not None:
            yield doc


def _name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name") or value.get("value") or "")
    return "" if value is None else str(value)


def _jira_issue(issue: Any, row: int, report: ImportReport) -> ParsedDocument | None:
    if not isinstance(issue, dict):
        report.reject(row=row, field_name="issue", reason="not a JSON object")
        return None
    key = issue.get("key")
    if not isinstance(key, str) or not key.strip():
        report.reject(row=row, field_name="key", reason="missing issue key")
        return None
    key = key.strip()
    fields = issue.get("fields")
    if not isinstance(fields, dict):
        report.reject(row=row, key=key, field_name="fields", reason="missing \"fields\" object")
        return None
    summary = fields.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        report.reject(row=row, key=key, field_name="fields.summary", reason="empty summary")
        return None
    description = fields.get("description")
    if description is not None and not isinstance(description, str):
        # Jira Cloud's v3 API returns Atlassian Document Format; keep its text.
        description = _adf_text(description)
    metadata = {
        "issue_type": _name(fields.get("issuetype")),
        "priority": _name(fields.get("priority")),
        "status": _name(fields.get("status")),
        "resolution": _name(fields.get("resolution")),
        "components": [_name(c) for c in fields.get("components") or [] if _name(c)],
        "labels": [str(label) for label in fields.get("labels") or []],
        "created": fields.get("created") or "",
        "updated": fields.get("updated") or "",
        "links": _jira_links(fields.get("issuelinks") or []),
    }
    return ParsedDocument(
        external_key=key[:255], title=summary.strip(), body=(description or "").strip(), metadata=metadata, row=row
    )


def _jira_links(links: Any) -> list[dict[str, str]]:
    out = []
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict):
            continue
        link_type = _name(link.get("type"))
        for direction in ("outward", "inward"):
            other = link.get(f"{direction}Issue")
            if isinstance(other, dict) and other.get("key"):
                out.append({"type": link_type, "direction": direction, "key": str(other["key"])})
    return out


def _adf_text(node: Any) -> str:
    if isinstance(node, dict):
        if node.get("type") == "text":
            return str(node.get("text", ""))
        parts = [_adf_text(child) for child in node.get("content") or []]
        sep = "\n" if node.get("type") in ("doc", "paragraph") else ""
        return sep.join(p for p in parts if p)
    if isinstance(node, list):
        return "\n".join(_adf_text(n) for n in node)
    return ""


# --- StackFAQ JSON ---------------------------------------------------------------------


def question_key(question: str) -> str:
    """A stable key for a question: re-uploads of the same FAQ upsert by it."""
    return "q-" + hashlib.sha1(" ".join(question.lower().split()).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _stackfaq(pairs: Any, filename: str, report: ImportReport) -> Iterator[ParsedDocument]:
    if not isinstance(pairs, list) or not pairs:
        raise UploadError(f"{filename}: root.qapair holds no question.")
    for row, item in enumerate(pairs, start=1):
        report.read_row()
        if not isinstance(item, dict):
            report.reject(row=row, field_name="qapair", reason="not a JSON object")
            continue
        question = item.get("question")
        if not isinstance(question, str) or not question.strip():
            report.reject(row=row, field_name="question", reason="empty question")
            continue
        answers = item.get("answer")
        answers = [answers] if isinstance(answers, str) else [a for a in answers or [] if isinstance(a, str)]
        body = "\n\n".join(a.strip() for a in answers if a.strip())
        if not body:
            report.reject(row=row, key=question_key(question), field_name="answer", reason="empty answer")
            continue
        # Paraphrases of two characters or fewer ("*") say nothing.
        paraphrases = [p.strip() for p in item.get("rephr") or [] if isinstance(p, str) and len(p.strip()) > 2]
        key = question_key(question)
        yield ParsedDocument(key, question.strip(), body, {"paraphrases": paraphrases, "group": key}, row=row)


# --- Tabular: CSV, JSONL, list of objects, Parquet -----------------------------------------


def _jsonl_records(path: Path, filename: str, encoding: str, max_bytes: int | None = None):
    columns: list[str] = []
    seen: set[str] = set()

    def records() -> Iterator[tuple[int, Any]]:
        with _text_stream(open_payload(path, filename, max_bytes), encoding) as text:
            for line_no, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json_limits.loads(line, what=f"line {line_no}")
                except json_limits.JSONLimitError as exc:
                    yield line_no, UploadError(str(exc).partition(": ")[2])

    # Columns: the keys of the first 100 objects, in order.
    iterator = records()
    buffered = []
    for item in iterator:
        buffered.append(item)
        if isinstance(item[1], dict):
            for name in item[1]:
                if name not in seen:
                    seen.add(name)
                    columns.append(name)
        if len(buffered) >= 100:
            break

    def replay() -> Iterator[tuple[int, Any]]:
        yield from buffered
        yield from iterator

    if not columns:
        bad = next(((row, item) for row, item in buffered if isinstance(item, UploadError)), None)
        if bad is not None:
            raise UploadError(f"{filename}: no usable row in the file (first problem: row {bad[0]}, field (row): "
                              f"{bad[1]}).")
    return columns, replay()


def _records_with_columns(records: Iterator[tuple[int, Any]]):
    items = list(records)
    columns: list[str] = []
    for _, item in items[:100]:
        for name in item:
            if name not in columns:
                columns.append(name)
    return columns, iter(items)


def _read_parquet(path, filename, report, *, kind, mapping, max_bytes=None) -> Upload:
    import pyarrow.parquet as pq  # pyarrow: the reference Parquet reader, streams row groups

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for anything unreadable
        raise UploadError(f"{filename}: not a readable Parquet file ({exc}).") from None
    columns = list(parquet.schema_arrow.names)
    # Parquet pages are compressed: check what the footer declares before decoding anything,
    # then count what the batches really hold (dictionary and run-length encodings expand further).
    limit = path.stat().st_size * MAX_ZIP_RATIO + BOMB_SLACK_BYTES
    if max_bytes is not None:
        limit = min(limit, max_bytes)
    meta = parquet.metadata
    if meta.num_rows > MAX_PARQUET_ROWS:
        raise UploadError(f"{filename}: the Parquet file declares {meta.num_rows:,} rows, above the "
                          f"{MAX_PARQUET_ROWS:,} limit of one upload. Split it into smaller files.")
    declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if declared > limit:
        raise UploadError(_expanded_too_far(filename, limit))

    def records() -> Iterator[tuple[int, Any]]:
        row = 0
        decoded = 0
        try:
            for batch in parquet.iter_batches(batch_size=5000):
                decoded += _decoded_bytes(batch)
                if decoded > limit:
                    raise UploadError(_expanded_too_far(filename, limit))
                for item in batch.to_pylist():
                    row += 1
                    yield row, item
        except UploadError:
            raise
        except Exception as exc:  # a damaged row group: say where it broke off
            raise UploadError(f"{filename}: the Parquet file is damaged after row {row} ({exc}).") from None

    report.encoding = "parquet"
    return _tabular(filename, report, (columns, records()), kind=kind, mapping=mapping, fmt_hint="parquet")


def _decoded_bytes(batch) -> int:
    """Bytes a record batch holds once its dictionary columns are expanded (to_pylist expands them).

    batch.nbytes counts a dictionary's values once: 20,000 rows pointing at
    one 1,000-character value are 80 KB there and 20 MB as Python strings.
    Computed from the value lengths, without expanding anything.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for column in batch.columns:
        if not pa.types.is_dictionary(column.type):
            total += column.nbytes
            continue
        values = column.dictionary
        total += column.indices.nbytes
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or \
                pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            total += pc.sum(pc.take(pc.binary_length(values), column.indices)).as_py() or 0
        elif len(values):
            total += values.nbytes // len(values) * len(column)
    return total


def _sniff_delimiter(filename: str, text_head: str) -> str:
    if filename.lower().endswith((".tsv", ".tsv.gz", ".tab")):
        return "\t"
    header = text_head.split("\n", 1)[0]
    counts = {d: header.count(d) for d in CSV_DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _read_csv(path, filename, report, text_head, encoding, *, kind, mapping, max_bytes=None) -> Upload:
    delimiter = _sniff_delimiter(filename, text_head)
    report.delimiter = delimiter
    stream = _text_stream(open_payload(path, filename, max_bytes), encoding)
    reader = csv.reader(stream, delimiter=delimiter)
    try:
        header = next(reader)
    except csv.Error as exc:
        stream.close()
        raise UploadError(f"{filename}: the header row cannot be read as CSV ({exc}).") from None
    except StopIteration:
        stream.close()
        raise UploadError(f"{filename}: the file is empty. Upload an export with at least one row.") from None
    except UploadError as exc:
        stream.close()
        raise UploadError(f"{exc} It broke off before the first row.") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    lowered = [h.lower() for h in header]
    bad = next((h for h in header if _undecodable(h)), None)
    if bad is not None:
        stream.close()
        raise UploadError(f"{filename}: the header row has bytes that are not text; save the file as UTF-8.")

    def rows() -> Iterator[tuple[int, list[str]]]:
        row = 0
        try:
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise UploadError(
                        f"{filename}: row {row + 1} cannot be read as CSV ({exc}); check its quotes."
                    ) from None
                except UploadError as exc:
                    raise UploadError(f"{exc} It broke off after row {row}.") from None
                if not any(c.strip() for c in cells):
                    continue  # blank line
                row += 1
                if cells[0].strip().lstrip("\ufeff") == header[0] and (
                    [c.strip().lstrip("\ufeff") for c in cells] == header
                ):
                    # Files joined end to end (cat a.csv.gz b.csv.gz: gzip reads both members as one
                    # stream) repeat their header: never a document, always worth telling.
                    report.read_row()
                    report.reject(row=row, field_name="(row)", reason="repeats the header row (two files joined "
                                  "together?); remove this line or upload the files one by one")
                    continue
                yield row, cells
        finally:
            stream.close()

    if not mapping and "summary" in lowered and ("issue key" in lowered or "issue id" in lowered):
        _check_kind(filename, "jira_csv", kind)
        return Upload("jira_csv", "tickets", header, {}, _jira_csv(header, rows(), filename, report))
    if not mapping and _is_links_header(lowered):
        return Upload("jira_links", "links", header, {}, _links_rows(header, rows(), report))

    def records() -> Iterator[tuple[int, Any]]:
        width = len(header)
        for row, cells in rows():
            if len(cells) > width and any(c.strip() for c in cells[width:]):
                yield row, UploadError(f"{len(cells)} cells, the header has {width} columns")
                continue
            yield row, dict(zip(header, cells))

    return _tabular(filename, report, (header, records()), kind=kind, mapping=mapping, fmt_hint="csv",
                    empty_message=f"{filename}: the file has a header row ({', '.join(header)}) but no data rows.")


def _is_links_header(lowered: list[str]) -> bool:
    return ("issue id" in lowered and "duplicate id" in lowered) or ("issue key" in lowered and "duplicate key" in lowered)


def _tabular(filename, report, columns_and_records, *, kind, mapping, fmt_hint, empty_message="") -> Upload:
    columns, records = columns_and_records
    if not columns:
        raise UploadError(empty_message or f"{filename}: no rows with named fields in the file.")
    if mapping:
        if not kind:
            raise UploadError("kind: choose what the rows are (tickets, qa, pairs, triplets or labelled) "
                              "to import a file with mapped columns.")
        resolved = validate_mapping(mapping, columns=columns, kind=kind)
        fmt = "mapped"
    else:
        fmt, resolved = suggest_mapping(columns)
        if fmt is None:
            raise UploadError(
                f"mapping: the columns of {filename} ({', '.join(columns[:20])}) are not a known export. "
                "Map them: which column is the key, title, body, label, group, date and attributes.",
                columns=list(columns),
            )
        _check_kind(filename, fmt, kind)
        kind = FORMAT_KIND[fmt]
    return Upload(fmt, kind, list(columns), resolved,
                  _mapped_rows(records, resolved, kind, report, empty_message=empty_message))


def suggest_mapping(columns: list[str]) -> tuple[str | None, dict[str, Any]]:
    """(format, mapping) recognised from column names alone; (None, partial guess) if none fits."""
    by_lower = {c.strip().lower(): c for c in columns}

    def pick(names: tuple[str, ...], taken: set[str]) -> str:
        for name in names:
            column = by_lower.get(name)
            if column is not None and column not in taken:
                return column
        return ""

    for fmt in ("triplets", "qa", "pairs", "labelled"):
        mapping: dict[str, Any] = {}
        taken: set[str] = set()
        for role, names in _SYNONYMS[fmt].items():
            column = pick(names, taken)
            if not column:
                break
            mapping[role] = column
            taken.add(column)
        else:
            optional = {"pairs": ("score",), "triplets": (), "labelled": ("key",),
                        "qa": ("key", "label", "group", "date")}[fmt]
            for role in optional:
                column = pick(_OPTIONAL[role], taken)
                if column:
                    mapping[role] = column
                    taken.add(column)
            if fmt == "qa":
                attributes = [c for c in columns if c not in taken and not c.lower().endswith("_html")]
                if attributes:
                    mapping["attributes"] = attributes
            return fmt, mapping
    return None, {}


def validate_mapping(mapping: dict[str, Any], *, columns: list[str], kind: str) -> dict[str, Any]:
    """The mapping with empty roles dropped; UploadError naming the role or column that is wrong."""
    if kind not in REQUIRED_ROLES:
        raise UploadError(f"kind: {kind!r} is not a kind of dataset ({', '.join(REQUIRED_ROLES)}).")
    if not isinstance(mapping, dict):
        raise UploadError("mapping: give an object of role -> column name.")
    known = set(columns)
    out: dict[str, Any] = {}
    for role, column in mapping.items():
        if role == "attributes":
            names = [column] if isinstance(column, str) else column or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UploadError("mapping: attributes must be a column name or a list of column names (text), "
                                  f"got {json.dumps(column)[:80]}.")
            missing = [n for n in names if n not in known]
            if missing:
                raise UploadError(f"mapping: attribute column {missing[0]!r} is not in the file "
                                  f"(columns: {', '.join(columns[:30])}).")
            if names:
                out["attributes"] = names
            continue
        if role not in ROLES:
            raise UploadError(f"mapping: unknown role {role!r}; roles are {', '.join(ROLES)} and attributes.")
        if not column:
            continue
        if not isinstance(column, str):
            raise UploadError(f"mapping: the {role} column must be a column name (text), got {json.dumps(column)[:80]}.")
        if column not in known:
            raise UploadError(f"mapping: the {role} column {column!r} is not in the file "
                              f"(columns: {', '.join(columns[:30])}).")
        out[role] = column
    for role, label in REQUIRED_ROLES[kind].items():
        if role not in out:
            raise UploadError(f"mapping: a {kind} dataset needs the {role} column ({label}) mapped.")
    return out


class CellError(ValueError):
    """A cell that cannot be read as text (nested too deeply); its row is rejected naming the column."""


def _scalar_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict) and json_limits.depth_exceeds(value):
        raise CellError(f"nested more than {json_limits.MAX_DEPTH} levels deep; give it as text")
    return str(value)


def _cell(value: Any) -> str:
    """A cell as text: lists (nested too) flattened to "a, b, c" without empty items.

    One pass over the items with an explicit stack: linear in the size of the
    cell, and a list nested deeper than json_limits.MAX_DEPTH is a CellError
    (the recursive version called itself twice per item: 23 levels cost 7 s).
    """
    if not isinstance(value, (list, tuple)):
        return _scalar_text(value)
    parts: list[str] = []
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple)):
            if depth > json_limits.MAX_DEPTH:
                raise CellError(f"a list nested more than {json_limits.MAX_DEPTH} levels deep; flatten it")
            stack.extend((child, depth + 1) for child in reversed(item))
            continue
        text = _scalar_text(item)
        if text:
            parts.append(text)
    return ", ".join(parts)


def _mapped_rows(records, mapping, kind, report, *, empty_message) -> Iterator[ParsedDocument]:
    any_row = False
    for row, item in records:
        any_row = True
        report.read_row()
        if isinstance(item, UploadError):
            report.reject(row=row, field_name="(row)", reason=str(item))
            continue
        if not isinstance(item, dict):
            report.reject(row=row, field_name="(row)", reason="not an object with named fields")
            continue
        try:
            doc = _mapped_row(row, item, mapping, kind, report)
        except _BadCell as exc:
            report.reject(row=row, field_name=exc.column, reason=exc.reason)
            continue
        if doc is not None:
            yield doc
    if not any_row and empty_message:
        raise UploadError(empty_message)


class _BadCell(Exception):
    def __init__(self, column: str, reason: str):
        super().__init__(reason)
        self.column, self.reason = column, reason


def _mapped_row(row: int, item: dict, mapping: dict, kind: str, report: ImportReport) -> ParsedDocument | None:
    def cell(column: str) -> str:
        try:
            return _cell(item.get(column))
        except CellError as exc:
            raise _BadCell(column, str(exc)) from None

    title = cell(mapping["title"])
    body = cell(mapping["body"]) if "body" in mapping else ""
    key = cell(mapping["key"]) if "key" in mapping else ""
    for role, value in (("title", title), ("body", body), ("key", key)):
        if len(value) > MAX_CELL_CHARS:
            report.reject(row=row, key=key[:255], field_name=mapping[role],
                          reason=f"{len(value):,} characters, above the {MAX_CELL_CHARS:,} limit")
            return None
    if not title:
        report.reject(row=row, key=key[:255], field_name=mapping["title"],
                      reason=f"empty {REQUIRED_ROLES[kind]['title']}")
        return None
    if kind in ("qa", "pairs", "triplets") and not body:
        report.reject(row=row, key=key[:255], field_name=mapping["body"],
                      reason=f"empty {REQUIRED_ROLES[kind]['body']}")
        return None
    metadata: dict[str, Any] = {}
    if "label" in mapping:
        metadata["label"] = cell(mapping["label"])
        if kind == "labelled" and not metadata["label"]:
            report.reject(row=row, key=key[:255], field_name=mapping["label"], reason="empty label")
            return None
    if "group" in mapping:
        metadata["group"] = cell(mapping["group"])
    if "date" in mapping:
        metadata["date"] = parse_date(cell(mapping["date"]))
    if "negative" in mapping:
        metadata["negative"] = cell(mapping["negative"])
        if kind == "triplets" and not metadata["negative"]:
            report.reject(row=row, key=key[:255], field_name=mapping["negative"], reason="empty negative")
            return None
    if "score" in mapping:
        raw = cell(mapping["score"])
        if raw:
            try:
                metadata["score"] = float(raw)
            except ValueError:
                report.reject(row=row, key=key[:255], field_name=mapping["score"], reason=f"{raw[:40]!r} is not a number")
                return None
            if metadata["score"] != metadata["score"] or metadata["score"] in (float("inf"), float("-inf")):
                report.reject(row=row, key=key[:255], field_name=mapping["score"], reason="not a finite number")
                return None
    if mapping.get("attributes"):
        metadata["attributes"] = {name: cell(name) for name in mapping["attributes"]}
    if not key:
        key = _derived_key(kind, title, body, metadata)
    return ParsedDocument(key[:255], title, body, metadata, row=row)


def _derived_key(kind: str, title: str, body: str, metadata: dict) -> str:
    """Rows without a key column get one from their content, stable across re-uploads."""
    if kind == "qa":
        # Question and answer: one question may have several answers (85 in bank-faq.csv).
        return question_key(f"{title}\x1f{body}")
    parts = [title, body, metadata.get("negative", "")] if kind != "labelled" else [title]
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{kind[0]}-{digest}"


# --- Jira CSV ----------------------------------------------------------------------------


def _jira_csv(header: list[str], rows, filename: str, report: ImportReport) -> Iterator[ParsedDocument]:
    lowered = [h.lower() for h in header]

    def first(name: str) -> int | None:
        return lowered.index(name) if name in lowered else None

    key_col = first("issue key") if "issue key" in lowered else first("issue id")
    id_col = first("issue id")
    summary_col = first("summary")
    description_col = first("description")
    text_cols = {meta: i for i, h in enumerate(lowered) for col, meta in _JIRA_TEXT_COLUMNS.items() if h == col}
    date_cols = {meta: i for i, h in enumerate(lowered) for col, meta in _JIRA_DATE_COLUMNS.items() if h == col}
    list_cols: dict[str, list[int]] = {}
    link_cols: list[tuple[int, str, str]] = []
    for i, h in enumerate(lowered):
        if h in _JIRA_LIST_COLUMNS:
            list_cols.setdefault(_JIRA_LIST_COLUMNS[h], []).append(i)
        match = _LINK_COLUMN.match(header[i])
        if match:
            link_cols.append((i, match.group(2).strip(), match.group(1).lower()))
    width = len(header)
    any_row = False
    for row, cells in rows:
        any_row = True
        report.read_row()
        if len(cells) > width and any(c.strip() for c in cells[width:]):
            report.reject(row=row, field_name="(row)", reason=f"{len(cells)} cells, the header has {width} columns")
            continue
        cells = cells + [""] * (width - len(cells))
        key = cells[key_col].strip()
        if not key:
            report.reject(row=row, field_name=header[key_col], reason="empty issue key")
            continue
        too_long = next((i for i, c in enumerate(cells) if len(c) > MAX_CELL_CHARS), None)
        if too_long is not None:
            report.reject(row=row, key=key[:255], field_name=header[too_long],
                          reason=f"{len(cells[too_long]):,} characters, above the {MAX_CELL_CHARS:,} limit")
            continue
        summary = cells[summary_col].strip()
        if not summary:
            report.reject(row=row, key=key[:255], field_name=header[summary_col], reason="empty summary")
            continue
        metadata: dict[str, Any] = {meta: cells[i].strip() for meta, i in text_cols.items()}
        for meta, indexes in list_cols.items():
            metadata[meta] = [cells[i].strip() for i in indexes if cells[i].strip()]
        metadata.setdefault("components", [])
        metadata.setdefault("labels", [])
        for meta, i in date_cols.items():
            metadata[meta] = parse_date(cells[i]) if cells[i].strip() else ""
        if id_col is not None and id_col != key_col:
            metadata["issue_id"] = cells[id_col].strip()
        metadata["links"] = [
            {"type": link_type, "direction": direction, "key": cells[i].strip()}
            for i, link_type, direction in link_cols if cells[i].strip()
        ]
        body = cells[description_col].strip() if description_col is not None else ""
        yield ParsedDocument(key[:255], summary, body, metadata, row=row)
    if not any_row:
        raise UploadError(f"{filename}: the file has a header row ({', '.join(header)}) but no data rows.")


# --- Duplicate links CSV --------------------------------------------------------------------


@dataclass
class LinkRow:
    row: int
    key: str
    other: str
    key_field: str
    other_field: str


def _links_rows(header: list[str], rows, report: ImportReport) -> Iterator[LinkRow]:
    lowered = [h.lower() for h in header]
    if "issue key" in lowered and "duplicate key" in lowered:
        a, b = lowered.index("issue key"), lowered.index("duplicate key")
    else:
        a, b = lowered.index("issue id"), lowered.index("duplicate id")
    for row, cells in rows:
        report.read_row()
        cells = cells + [""] * (len(header) - len(cells))
        key, other = cells[a].strip(), cells[b].strip()
        if not key or not other:
            report.reject(row=row, key=key, field_name=header[a] if not key else header[b], reason="empty")
            continue
        if key == other:
            report.reject(row=row, key=key, field_name=header[b], reason="an issue cannot duplicate itself")
            continue
        yield LinkRow(row, key, other, header[a], header[b])


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
                problem = (name, _undecodable(value) or "text that cannot be stored")
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
            report.duplicates += 1
            first = first_row[key] & 0xFFFFFFFF
            if first_row[key] >> 32 != packed >> 32:
                # Same key, other content: which one is right is the user's call, so say so.
                report.reject(row=doc.row, key=key, field_name="key",
                              reason=f"duplicate key with different content (first seen in row {first}); "
                                     "this row was skipped")
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


# Kept for callers of the first version of this module.
def parse_jira_json(path: Path, filename: str, report: ImportReport) -> Iterator[ParsedDocument]:
    upload = read_upload(path, filename, report, kind="tickets")
    return upload.documents

