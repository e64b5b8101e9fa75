"""Jira exports: REST JSON (/rest/api/2/search and v3's Atlassian Document Format), CSV, duplicate links CSV."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

from training.importers.validation import MAX_CELL_CHARS, ImportReport, ParsedDocument, UploadError

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


def parse_date(value: str) -> str:
    """ISO 8601 for the date formats Jira exports use; the input unchanged otherwise."""
    value = value.strip()
    for fmt in JIRA_DATE_FORMATS:
        try:
            return datetime.strptime(value, fmt).isoformat()
        except ValueError:
            continue
    return value


# --- Jira REST JSON -----------------------------------------------------------------


def jira_issue_list(payload: Any) -> list | None:
    if isinstance(payload, dict) and isinstance(payload.get("issues"), list):
        return payload["issues"]
    if isinstance(payload, dict) and "key" in payload and isinstance(payload.get("fields"), dict):
        return [payload]
    if isinstance(payload, list) and payload and isinstance(payload[0], dict) and "fields" in payload[0]:
        return payload
    return None


def jira_issues(issues: list, report: ImportReport) -> Iterator[ParsedDocument]:
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


# --- Jira CSV ----------------------------------------------------------------------------


def jira_csv(header: list[str], rows, filename: str, report: ImportReport) -> Iterator[ParsedDocument]:
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
    # Every id of the duplicate cell: "13547000, 13396667" names two duplicates of one issue.
    others: tuple[str, ...] = ()


# Separators of several ids in one duplicate cell (Jira's exports join them with ", ").
_IDS = re.compile(r"[\s,;|]+")


def is_links_header(lowered: list[str]) -> bool:
    return ("issue id" in lowered and "duplicate id" in lowered) or ("issue key" in lowered and "duplicate key" in lowered)


def links_rows(header: list[str], rows, report: ImportReport) -> Iterator[LinkRow]:
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
        others = tuple(dict.fromkeys(i for i in _IDS.split(other) if i))
        if key in others:
            report.reject(row=row, key=key, field_name=header[b], reason="an issue cannot duplicate itself")
            continue
        yield LinkRow(row, key, others[0], header[a], header[b], others)
