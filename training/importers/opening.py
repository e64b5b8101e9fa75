"""Opening an upload: plain, gzip or zip behind guards against bombs; encodings; sniffing the format.

`open_payload` opens the file on disk (plain, gzip or zip) behind a guard
that stops zip bombs and turns a damaged archive into an UploadError;
`detect_encoding`, `is_jsonl` and `sniff_delimiter` tell what the text is;
`load_json` reads a whole JSON document with its depth bounded.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

from embedportal import json_limits
from training.importers.validation import UploadError

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
SNIFF_BYTES = 64 * 1024
CSV_DELIMITERS = (",", ";", "\t", "|")


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
            raise UploadError(expanded_too_far(self._filename, self._limit))
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


def expanded_too_far(filename: str, cap: int) -> str:
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


# Files people upload by mistake, by their first bytes: said plainly instead of a column mapping built from
# binary. Only signatures no text export starts with (a CSV may start with "MZ", none with "\x89PNG").
BINARY_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel or Word file (.xls, .doc)"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x7fELF", "a program (ELF executable)"),
    (b"BZh", "a bzip2 archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
)
_FORMATS = "a Jira export (CSV, JSON or JSONL; plain, gzip or zip)"


def refuse_binary(head: bytes, filename: str) -> None:
    """UploadError naming what the file looks like when its first bytes are a known binary format's."""
    for signature, what in BINARY_SIGNATURES:
        if head.startswith(signature):
            raise UploadError(f"{filename}: this looks like {what}, not a CSV export. Upload {_FORMATS}.")


def open_payload(path: Path, filename: str, max_bytes: int | None = None) -> IO[bytes]:
    """Open a plain, gzip or zip file as a buffered binary stream of its (first) payload.

    A compressed payload may expand at most MAX_ZIP_RATIO times its size and,
    when max_bytes is given, to at most max_bytes: past either, reading
    raises UploadError naming the file.
    """
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise UploadError(f"{filename}: the file is empty. Upload an export with at least one row.")
    refuse_binary(head, filename)
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
    if any(m.filename.startswith(("xl/", "word/", "ppt/")) for m in members):
        archive.close()
        what = "an Excel workbook" if any(m.filename.startswith("xl/") for m in members) else "an Office document"
        raise UploadError(f"{filename}: this looks like {what}, not a CSV export. Save it as CSV (UTF-8) and "
                          "upload that.")
    member = members[0]
    if member.compress_size and member.file_size / member.compress_size > MAX_ZIP_RATIO:
        archive.close()
        raise UploadError(
            f"{filename}: {member.filename} expands {member.file_size // max(member.compress_size, 1)}x, "
            f"above the {MAX_ZIP_RATIO}x limit for compressed uploads. Upload the file uncompressed."
        )
    if max_bytes is not None and member.file_size > max_bytes:
        archive.close()
        raise UploadError(expanded_too_far(f"{filename}: {member.filename}", max_bytes))
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


# --- Encodings and sniffing ------------------------------------------------------------


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


def text_stream(binary: IO[bytes], encoding: str) -> IO[str]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so the row
    # holding them is rejected with its field instead of failing the file.
    errors = "replace" if encoding.startswith("utf-16") else "surrogateescape"
    return io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline="")


def is_jsonl(text_head: str) -> bool:
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


def sniff_delimiter(filename: str, text_head: str) -> str:
    if filename.lower().endswith((".tsv", ".tsv.gz", ".tab")):
        return "\t"
    header = text_head.split("\n", 1)[0]
    counts = {d: header.count(d) for d in CSV_DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def load_json(path: Path, filename: str, encoding: str, max_bytes: int | None = None) -> Any:
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
