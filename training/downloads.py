"""HTTP attachments: one Content-Disposition for every download, and temporary exports streamed then removed.

The name a person sees (a dataset name, say) is user text: it goes into the
header only, never into a path (training.temporary_files), and is cleaned
for it: RFC 6266 `filename*=UTF-8''...` carries the real name
percent-encoded, `filename="..."` an ASCII fallback for old clients. Path
separators, control characters and leading dots are replaced in both, so a
browser cannot be steered into a folder or a hidden file either.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

from django.http import FileResponse, StreamingHttpResponse

from training import temporary_files
from training.temporary_files import TemporaryExport

# Long enough for any dataset name (200) plus "-v12.parquet"; browsers and
# file systems cut names near 255 bytes, which a UTF-8 name this long may pass.
MAX_FILENAME_CHARS = 220
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _visible(filename: str) -> str:
    """The name with path separators and invisible/control characters made "_", no leading dots or spaces."""
    cleaned = "".join(
        "_" if ch in "/\\" or unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in filename
    )
    cleaned = cleaned.strip().lstrip(".").strip()
    if len(cleaned) > MAX_FILENAME_CHARS:
        stem, dot, ext = cleaned.rpartition(".")
        keep = dot + ext if dot and len(ext) <= 8 else ""
        cleaned = cleaned[: MAX_FILENAME_CHARS - len(keep)] + keep
    return cleaned or "download"


def _ascii_fallback(visible: str) -> str:
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_." else "_" for ch in visible)


def content_disposition(filename: str) -> str:
    """`attachment; filename="<ascii>"; filename*=UTF-8''<percent-encoded>` for any user-supplied name."""
    visible = _visible(filename)
    return f"attachment; filename=\"{_ascii_fallback(visible)}\"; filename*=UTF-8''{quote(visible, safe='')}"


def temporary_file_response(export: TemporaryExport, content_type: str) -> FileResponse:
    """Stream a temporary export as an attachment and delete the folder made for it (only that folder).

    The open handle keeps the data readable after the unlink (POSIX), so
    nothing is left behind even if the client disconnects.
    """
    try:
        handle = open(export.path, "rb")
    finally:
        temporary_files.remove(export.folder)
    response = FileResponse(handle, content_type=content_type)
    response["Content-Disposition"] = content_disposition(export.download_name)
    return response


def csv_attachment(lines, filename: str) -> StreamingHttpResponse:
    """CSV lines (already made safe for spreadsheets: importers.write_csv) as a download called `filename`."""
    response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = content_disposition(filename)
    return response
