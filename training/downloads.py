"""HTTP responses for files the registry writes to a temporary folder."""

import shutil
from pathlib import Path

from django.http import FileResponse


def temporary_file_response(path: Path, content_type: str) -> FileResponse:
    """Stream a temporary export as an attachment and delete its folder.

    The open handle keeps the data readable after the unlink (POSIX), so
    nothing is left behind even if the client disconnects.
    """
    response = FileResponse(open(path, "rb"), as_attachment=True, filename=path.name, content_type=content_type)
    shutil.rmtree(path.parent, ignore_errors=True)
    return response
