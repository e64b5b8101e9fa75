"""Rows with named columns: Q&A, pairs, triplets, text + label, and any CSV/JSONL/JSON/Parquet with a mapping.

A known layout is recognised from its column names (`suggest_mapping`);
anything else is read through a column mapping a person chose
(`validate_mapping`). StackFAQ JSON (questions with paraphrases) is Q&A too.
A CSV whose header is a Jira export or a links file is handed to
training.importers.jira.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from embedportal import json_limits
from training.importers.jira import is_links_header, jira_csv, links_rows, parse_date
from training.importers.opening import (
    BOMB_SLACK_BYTES,
    MAX_ZIP_RATIO,
    expanded_too_far,
    open_payload,
    sniff_delimiter,
    text_stream,
)
from training.importers.validation import (
    FORMAT_KIND,
    MAX_CELL_CHARS,
    ImportReport,
    ParsedDocument,
    RowLimitReached,
    Upload,
    UploadError,
    check_kind,
    undecodable,
)

# A Parquet file may declare at most this many rows: a row costs a few bytes
# on disk with run-length encoding, so the byte guards alone would let
# billions of empty rows through, each one looked at in Python.
MAX_PARQUET_ROWS = 20_000_000
# The csv module's own ceiling (default 128 KiB) is raised so that a cell above
# MAX_CELL_CHARS is seen and reported instead of aborting the parse.
csv.field_size_limit(64 * 1024 * 1024)
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


# --- StackFAQ JSON ---------------------------------------------------------------------


def question_key(question: str) -> str:
    """A stable key for a question: re-uploads of the same FAQ upsert by it."""
    return "q-" + hashlib.sha1(" ".join(question.lower().split()).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def stackfaq(pairs: Any, filename: str, report: ImportReport) -> Iterator[ParsedDocument]:
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


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


# How a Q&A upload treats one question answered in several rows (Dataset.repeated_questions).
REPEATED_QUESTIONS = {
    "keep": "keep each answer as its own document",
    "merge": "merge the answers into one document",
}
# Characters of questions and answers held in memory while merging repeated questions (every
# question's first row waits until the file is read): ~2 bytes a character, so at most ~0.5 GB;
# the bank FAQ (1,764 rows) holds 0.7 M. A bigger Q&A file is refused with what to do.
MERGE_MAX_CHARS = 256 * 1024 * 1024


def keep_repeated_questions(documents: Iterator[ParsedDocument]) -> Iterator[ParsedDocument]:
    """Each row its own document: a key derived from the question (no key column) that an earlier row with
    other content already has gets "-2", "-3", ... in file order, so the row is kept, not refused as a key
    conflict. Rows with the same content keep the key (validate_rows merges exact repeats, listing them);
    keys from a key column are left alone (a conflict there is the user's to resolve)."""
    first: dict[str, bytes] = {}  # key -> digest of its first row's content
    variants: dict[str, dict[bytes, str]] = {}  # key -> other contents -> the key each got
    for doc in documents:
        key = doc.external_key
        if key.startswith("q-") and key in (question_key(doc.title), question_key(f"{doc.title}\x1f{doc.body}")):
            digest = hashlib.sha1("\x1f".join((doc.title, doc.body, json.dumps(doc.metadata, sort_keys=True,
                                                                            default=str)))
                                  .encode("utf-8", "surrogatepass")).digest()
            if first.setdefault(key, digest) != digest:
                others = variants.setdefault(key, {})
                doc.external_key = others.setdefault(digest, f"{key}-{len(others) + 2}")
        yield doc


def merge_repeated_questions(documents: Iterator[ParsedDocument], report: ImportReport, *,
                             max_chars: int = MERGE_MAX_CHARS) -> Iterator[ParsedDocument]:
    """One document per question (case and spacing ignored): later rows' other answers are appended to the
    first row's document, in file order, and each such row is counted and listed as merged with its reason.

    The documents come out after the whole file is read (in the order of their first rows). A preview's
    row limit (RowLimitReached) still yields what was read first, then stops the same way.
    """
    firsts: dict[str, ParsedDocument] = {}
    answers: dict[str, set[str]] = {}
    held = 0
    try:
        for doc in documents:
            question = _normalized(doc.title)
            first = firsts.get(question)
            if first is None:
                firsts[question] = doc
                answers[question] = {_normalized(doc.body)}
                held += len(doc.title) + len(doc.body)
                if held > max_chars:
                    raise UploadError(
                        f"repeated_questions: the file is too big to merge repeated questions in one pass "
                        f"(more than {max_chars // (1024 * 1024)} M characters); import it with \"keep each "
                        "answer as its own document\", or split it.")
                continue
            answer = _normalized(doc.body)
            if answer in answers[question]:
                reason = f"the same question and answer as row {first.row}: merged into it"
            else:
                answers[question].add(answer)
                first.body = f"{first.body.rstrip()}\n\n{doc.body.strip()}"
                held += len(doc.body)
                reason = f"the same question as row {first.row}: its answer was added to that row's document"
            report.merge(row=doc.row, key=doc.external_key, first_row=first.row, reason=reason)
    except RowLimitReached:
        yield from firsts.values()
        raise
    yield from firsts.values()


# --- Reading: CSV, JSONL, list of objects, Parquet -----------------------------------------


def jsonl_records(path: Path, filename: str, encoding: str, max_bytes: int | None = None):
    columns: list[str] = []
    seen: set[str] = set()

    def records() -> Iterator[tuple[int, Any]]:
        with text_stream(open_payload(path, filename, max_bytes), encoding) as text:
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


def records_with_columns(records: Iterator[tuple[int, Any]]):
    items = list(records)
    columns: list[str] = []
    for _, item in items[:100]:
        for name in item:
            if name not in columns:
                columns.append(name)
    return columns, iter(items)


def read_parquet(path, filename, report, *, kind, mapping, max_bytes=None) -> Upload:
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
        raise UploadError(expanded_too_far(filename, limit))

    def records() -> Iterator[tuple[int, Any]]:
        row = 0
        decoded = 0
        try:
            for batch in parquet.iter_batches(batch_size=5000):
                decoded += _decoded_bytes(batch)
                if decoded > limit:
                    raise UploadError(expanded_too_far(filename, limit))
                for item in batch.to_pylist():
                    row += 1
                    yield row, item
        except UploadError:
            raise
        except Exception as exc:  # a damaged row group: say where it broke off
            raise UploadError(f"{filename}: the Parquet file is damaged after row {row} ({exc}).") from None

    report.encoding = "parquet"
    return mapped_upload(filename, report, (columns, records()), kind=kind, mapping=mapping, fmt_hint="parquet")


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


def read_csv(path, filename, report, text_head, encoding, *, kind, mapping, max_bytes=None) -> Upload:
    delimiter = sniff_delimiter(filename, text_head)
    report.delimiter = delimiter
    stream = text_stream(open_payload(path, filename, max_bytes), encoding)
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
    bad = next((h for h in header if undecodable(h)), None)
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
        check_kind(filename, "jira_csv", kind)
        return Upload("jira_csv", "tickets", header, {}, jira_csv(header, rows(), filename, report))
    if not mapping and is_links_header(lowered):
        return Upload("jira_links", "links", header, {}, links_rows(header, rows(), report))

    def records() -> Iterator[tuple[int, Any]]:
        width = len(header)
        for row, cells in rows():
            if len(cells) > width and any(c.strip() for c in cells[width:]):
                yield row, UploadError(f"{len(cells)} cells, the header has {width} columns")
                continue
            yield row, dict(zip(header, cells))

    return mapped_upload(filename, report, (header, records()), kind=kind, mapping=mapping, fmt_hint="csv",
                    empty_message=f"{filename}: the file has a header row ({', '.join(header)}) but no data rows.")


# --- Columns to roles ---------------------------------------------------------------------


def mapped_upload(filename, report, columns_and_records, *, kind, mapping, fmt_hint, empty_message="") -> Upload:
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
        check_kind(filename, fmt, kind)
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
