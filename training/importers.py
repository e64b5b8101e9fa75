"""Parsers that turn an uploaded export into documents.

Each importer reads a file from disk (uploads are streamed there by Django)
and yields `ParsedDocument`s, collecting per-row problems in an `ImportReport`
instead of failing the whole file. A file that is not what it claims (binary,
truncated gzip, wrong JSON shape) raises `UploadError` with a message a person
can act on.
"""

from __future__ import annotations

import gzip

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
# A zip entry may expand at most this much: a guard against zip bombs.
MAX_ZIP_RATIO = 200
MAX_REPORTED_ERRORS = 50


class UploadError(ValueError):
    """The upload as a whole cannot be imported; the message says why and what to do."""


@dataclass
class ParsedDocument:
    external_key: str
    title: str
    body: str
    metadata: dict[str, Any]


@dataclass
class ImportReport:
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, *, row: int, field_name: str, reason: str, key: str = "") -> None:
        self.rows_rejected += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"row": row, "key": key, "field": field_name, "reason": reason})

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "errors": self.errors,
        }


def open_payload(path: Path, filename: str) -> IO[bytes]:
    """Open a plain, gzip or zip file as a binary stream of its (first) payload."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise UploadError(f"{filename}: the file is empty. Upload a Jira export (JSON, .json.gz or .zip).")
    if head.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    if head.startswith(ZIP_MAGIC):
        return _open_zip_member(path, filename)
    return open(path, "rb")


def _open_zip_member(path: Path, filename: str) -> IO[bytes]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UploadError(f"{filename}: not a readable zip archive ({exc}). Re-create the archive and upload it again.")
    members = [m for m in archive.infolist() if not m.is_dir()]
    if not members:
        raise UploadError(f"{filename}: the zip archive holds no file. Put the export file in it.")
    member = members[0]
    if member.compress_size and member.file_size / member.compress_size > MAX_ZIP_RATIO:
        raise UploadError(
            f"{filename}: {member.filename} expands {member.file_size // max(member.compress_size, 1)}x, "
            f"above the {MAX_ZIP_RATIO}x limit for compressed uploads. Upload the file uncompressed."
        )
    return archive.open(member)


def load_json(path: Path, filename: str) -> Any:
    """Read a whole JSON payload (plain/gz/zip), mapping every failure to UploadError."""
    try:
        with open_payload(path, filename) as stream:
            raw = stream.read()
    except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as exc:
        raise UploadError(
            f"{filename}: the compressed file is damaged or truncated ({exc}). Export it again and re-upload."
        )
    if b"\x00" in raw[:8192] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UploadError(f"{filename}: this is a binary file, not a JSON export. Upload the Jira JSON export.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UploadError(f"{filename}: the file is not valid UTF-8 at byte {exc.start}. Save it as UTF-8.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if filename.lower().endswith((".csv", ".tsv")):
            raise UploadError(
                f"{filename}: CSV files cannot be imported yet. Export the issues from Jira as JSON "
                "(REST API /rest/api/2/search) and upload that file."
            )
        raise UploadError(
            f"{filename}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Upload the response of Jira's /rest/api/2/search, a list of issues, or one issue."
        )


def parse_jira_json(path: Path, filename: str, report: ImportReport) -> Iterator[ParsedDocument]:
    """Yield the issues of a Jira REST export: `{"issues": [...]}`, a list, or one issue."""
    payload = load_json(path, filename)
    if isinstance(payload, dict) and isinstance(payload.get("issues"), list):
        issues = payload["issues"]
    elif isinstance(payload, list):
        issues = payload
    elif isinstance(payload, dict) and "key" in payload and isinstance(payload.get("fields"), dict):
        issues = [payload]
    else:
        raise UploadError(
            f"{filename}: this JSON is not a Jira issue export. Expected an object with an \"issues\" "
            "list (a /rest/api/2/search response), a list of issues, or one issue with \"key\" and \"fields\"."
        )
    if not issues:
        raise UploadError(f"{filename}: the export contains no issues.")
    for row, issue in enumerate(issues, start=1):
        report.rows_read += 1
        doc = _jira_issue(issue, row, report)
        if doc is not None:
            report.rows_accepted += 1
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
        external_key=key[:255], title=summary.strip(), body=(description or "").strip(), metadata=metadata
    )


def _jira_links(links: list[Any]) -> list[dict[str, str]]:
    out = []
    for link in links:
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


