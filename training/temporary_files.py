"""Temporary files the product writes for a download: named by ids, in a folder of their own.

A dataset name once became a file name (`{version.name}-v1.zip` under a
mkdtemp folder), and the download then deleted that file's parent folder: a
name like "/x" or "../../data/models/x" wrote outside the temporary folder
and deleted "/" or every owner's models. Now no user text reaches a path:
the file is called by the row's id, the name a person sees travels only in
the Content-Disposition header (training.downloads), and cleanup removes
exactly the folder `new_folder` created, after checking it is one.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PREFIX = "embedportal-"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemporaryExport:
    """A file in a folder made for it alone; `download_name` is for the header, never for a path."""

    folder: Path
    path: Path
    download_name: str


def _is_ours(folder: Path) -> bool:
    folder = Path(folder)
    return (
        folder.is_absolute()
        and folder.name.startswith(PREFIX)
        and folder.parent.resolve() == Path(tempfile.gettempdir()).resolve()
        and not folder.is_symlink()
        and folder.is_dir()
    )


@contextmanager
def new_folder(kind: str) -> Iterator[Path]:
    """A fresh mkdtemp folder (embedportal-<kind>-XXXX in the temp dir); removed again if the block fails."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
    try:
        yield folder
    except BaseException:
        remove(folder)
        raise


def remove(folder: Path) -> None:
    """Delete a folder made by new_folder, and nothing else: any other path is logged and left alone."""
    if not _is_ours(folder):
        logger.error("refusing to delete %s: not a temporary folder made by new_folder", folder)
        return
    shutil.rmtree(folder, ignore_errors=True)
