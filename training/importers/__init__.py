"""Parsers that turn an uploaded export into validated rows, by format.

Every upload goes through the same three steps:

1. `open_payload` (opening.py) opens the file on disk (plain, gzip or zip)
   behind a guard that stops zip bombs and turns a damaged archive into an
   UploadError;
2. `read_upload` (here) recognises the format (Jira REST JSON, Jira CSV and
   links CSV: jira.py; Q&A CSV/JSONL, StackFAQ JSON, pairs, triplets, text +
   label, or any CSV/JSONL/Parquet with a column mapping: tabular.py), the
   encoding and the delimiter, and yields `ParsedDocument`s, rejecting bad
   rows into the `ImportReport` with their row number, field and reason;
3. `validate_rows` (validation.py) drops duplicate keys and text PostgreSQL
   cannot store, and computes each row's content hash and the report's figures.

Nothing here touches the database: training.datasets stores what comes out.
A file that cannot be read at all raises `UploadError` with a message a person
can act on; one bad row never does. Callers use this package's names
(`from training import importers; importers.read_upload(...)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.importers.jira import LinkRow, jira_issue_list, jira_issues, parse_date
from training.importers.opening import (
    BOMB_SLACK_BYTES,
    MAX_ZIP_RATIO,
    PARQUET_MAGIC,
    SNIFF_BYTES,
    declared_expanded_size,
    detect_encoding,
    is_jsonl,
    load_json,
    open_payload,
)
from training.importers.tabular import (
    REPEATED_QUESTIONS,
    REQUIRED_ROLES,
    ROLES,
    CellError,
    jsonl_records,
    keep_repeated_questions,
    mapped_upload,
    merge_repeated_questions,
    question_key,
    read_csv,
    read_parquet,
    records_with_columns,
    stackfaq,
    suggest_mapping,
    validate_mapping,
)
from training.importers.validation import (
    FORMAT_KIND,
    FORMATS,
    MAX_REPORTED_ERRORS,
    MAX_STORED_ERRORS,
    PREVIEW_ROWS,
    ImportReport,
    ParsedDocument,
    RowLimitReached,
    StagedRow,
    Upload,
    UploadError,
    canonical_json,
    check_kind,
    content_hash,
    csv_safe,
    error_csv_rows,
    preview_row,
    validate_rows,
    write_csv,
)

__all__ = [
    "BOMB_SLACK_BYTES", "FORMATS", "FORMAT_KIND", "MAX_REPORTED_ERRORS", "MAX_STORED_ERRORS", "MAX_ZIP_RATIO",
    "PREVIEW_ROWS", "REPEATED_QUESTIONS", "REQUIRED_ROLES", "ROLES", "CellError", "ImportReport", "LinkRow",
    "ParsedDocument", "RowLimitReached", "StagedRow", "Upload", "UploadError", "canonical_json", "content_hash",
    "csv_safe", "declared_expanded_size", "detect_encoding", "error_csv_rows", "merge_repeated_questions",
    "open_payload", "parse_date", "preview_row",
    "question_key", "read_upload", "suggest_mapping", "validate_mapping", "validate_rows", "write_csv",
]


# --- Format recognition --------------------------------------------------------------


def read_upload(
    path: Path, filename: str, report: ImportReport, *, kind: str = "", mapping: dict[str, Any] | None = None,
    max_bytes: int | None = None, repeated_questions: str = "keep",
) -> Upload:
    """Recognise the file and return its rows as an iterator of ParsedDocument.

    kind: what the caller expects ("" = whatever the file is); mapping: which
    column plays which role, for files that are not a known export (a known
    export is read as such unless a mapping is given); max_bytes: how far a
    compressed file (gzip, zip, Parquet pages) may expand, besides the
    MAX_ZIP_RATIO guard; repeated_questions (Q&A only, REPEATED_QUESTIONS):
    "keep" makes each answer of a question its own document, "merge" one
    document per question (merge_repeated_questions).
    """
    if repeated_questions not in REPEATED_QUESTIONS:
        raise UploadError(f"repeated_questions: {repeated_questions!r} is not one of {', '.join(REPEATED_QUESTIONS)}.")
    with open_payload(path, filename, max_bytes) as stream:
        head = stream.read(SNIFF_BYTES)
    if not head.strip():
        raise UploadError(f"{filename}: the file is empty. Upload an export with at least one row.")
    if head.startswith(PARQUET_MAGIC):
        upload = read_parquet(path, filename, report, kind=kind, mapping=mapping, max_bytes=max_bytes)
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
            upload = read_csv(path, filename, report, text_head, encoding, kind=kind, mapping=mapping,
                               max_bytes=max_bytes)
    report.detected_format = upload.format
    report.columns = upload.columns
    report.mapping = upload.mapping
    if upload.kind == "qa":
        upload.documents = (merge_repeated_questions(upload.documents, report) if repeated_questions == "merge"
                            else keep_repeated_questions(upload.documents))
    return upload


def _read_json_family(path, filename, report, text_head, encoding, *, kind, mapping, max_bytes=None) -> Upload:
    if is_jsonl(text_head):
        return mapped_upload(filename, report, jsonl_records(path, filename, encoding, max_bytes), kind=kind,
                        mapping=mapping, fmt_hint="jsonl")
    payload = load_json(path, filename, encoding, max_bytes)
    if isinstance(payload, dict) and isinstance(payload.get("root"), dict) and "qapair" in payload["root"]:
        check_kind(filename, "stackfaq", kind)
        return Upload("stackfaq", "qa", [], {}, stackfaq(payload["root"]["qapair"], filename, report))
    issues = jira_issue_list(payload)
    if issues is not None and not mapping:
        check_kind(filename, "jira_json", kind)
        if not issues:
            raise UploadError(f"{filename}: the export contains no issues.")
        return Upload("jira_json", "tickets", [], {}, jira_issues(issues, report))
    if isinstance(payload, list) and payload and all(isinstance(item, dict) for item in payload[:100]):
        records = ((row, item) for row, item in enumerate(payload, start=1))
        return mapped_upload(filename, report, records_with_columns(records), kind=kind, mapping=mapping,
                        fmt_hint="json")
    raise UploadError(
        f"{filename}: this JSON is not an export we can read. Expected a Jira /rest/api/2/search response "
        "(an object with an \"issues\" list), a list of issues, one issue with \"key\" and \"fields\", "
        "a StackFAQ file ({\"root\": {\"qapair\": [...]}}), a list of objects, or JSON Lines."
    )
