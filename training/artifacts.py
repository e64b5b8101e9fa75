"""Files that must reach every host: model folders, fitted clustering models, staged uploads.

Without EMBEDPORTAL_ARTIFACT_STORE (one machine, the default) these live in
the local folders MODELS_DIR and UPLOADS_DIR and nothing below happens.

With EMBEDPORTAL_ARTIFACT_STORE=s3://bucket/prefix (and the usual AWS_*
variables, or EMBEDPORTAL_S3_ENDPOINT_URL for MinIO/Ceph/R2) the store is
where they live, and every local folder is a cache: a worker or web process
on another host needs only DATABASE_URL, REDIS_URL and the store (no shared
disk, docs/scaling.md). The host that wrote a file publishes it; a host that
lacks it downloads it on first use into its own cache, whole or not at all
(a temporary folder renamed into place):

    store key                                              cache on a host without the file
    <prefix>/<owner>/version-<id>/...                       MODELS_DIR/store/version-<id>/...
    <prefix>/<owner>/clustering-<run>/attempt-<n>/model.npz MODELS_DIR/clustering/run-<run>/attempt-<n>/model.npz
    <prefix>/uploads/<owner>/<uuid>.upload                  UPLOADS_DIR/<uuid>.upload

Keys are built from ids (and our own uuid file names) only, never from a
name a user chose. A model version and a clustering model never change once
written (a new attempt writes under a new key), so a cached copy is never
stale. A staged upload is deleted from the store when its import ends.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings

from training.errors import ServiceError
from training.models import ModelVersion

logger = logging.getLogger(__name__)

# One segment of a key: ids, "version-12", "attempt-2", "model.npz", a uuid file name.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UPLOAD_NAME = re.compile(r"^[0-9a-f]{32}\.upload$")
# Keys per DeleteObjects request (the S3 maximum).
_DELETE_BATCH = 1000


def configured() -> bool:
    """True when an artifact store is set: local folders are then caches of it."""
    return bool(settings.ARTIFACT_STORE)


def _client():
    import boto3

    return boto3.client("s3", endpoint_url=settings.S3_ENDPOINT_URL or None)


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ServiceError(f"EMBEDPORTAL_ARTIFACT_STORE must look like s3://bucket/prefix, got {uri!r}.")
    return parsed.netloc, parsed.path.strip("/")


def _key(*segments: str | int) -> tuple[str, str]:
    """(bucket, key) of the store for these segments, each checked to be an id-like name."""
    bucket, prefix = _split(settings.ARTIFACT_STORE)
    parts = [str(s) for s in segments]
    for part in parts:
        if not _SEGMENT.match(part) or part in (".", ".."):
            raise ServiceError(f"{part!r} cannot be part of an artifact store key.")
    return bucket, "/".join(p for p in (prefix, *parts) if p)


def _unreachable(what: str, where: str, exc: Exception) -> ServiceError:
    return ServiceError(
        f"Could not reach {what} in the artifact store ({where}): {type(exc).__name__}: {exc}. Check "
        "EMBEDPORTAL_ARTIFACT_STORE, EMBEDPORTAL_S3_ENDPOINT_URL and the AWS_* credentials on this host."
    )


def _store_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# --- Model versions (folders) ----------------------------------------------------------------


def publish(*, version: ModelVersion) -> str:
    """Upload the version's folder to the configured store; returns its URI ('' when none is configured)."""
    if not configured():
        return ""
    folder = Path(version.artifact_path)
    # Ids, never the (user-chosen) name: a name like "../x" or "a/b" would reach into other keys.
    bucket, key_prefix = _key(int(version.owner_id), f"version-{int(version.pk)}")
    client = _client()
    try:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                client.upload_file(str(file), bucket, f"{key_prefix}/{file.relative_to(folder).as_posix()}")
    except _store_errors() as exc:
        raise _unreachable(f"model version {version.pk}", f"s3://{bucket}/{key_prefix}/", exc) from exc
    uri = f"s3://{bucket}/{key_prefix}/"
    ModelVersion.objects.filter(pk=version.pk).update(storage_uri=uri)
    version.storage_uri = uri
    return uri


def version_cache(version: ModelVersion) -> Path:
    """Where a host that did not train the version keeps its downloaded copy."""
    return Path(settings.MODELS_DIR) / "store" / f"version-{int(version.pk)}"


def ensure_local(artifact_path: str) -> str:
    """A local folder holding a registered version's files: its own path where this host has it (the
    host that trained it), else this host's cache of the store's copy, downloaded on first use.

    Anything that is not a published version (a base model's Hugging Face id or folder) comes back
    unchanged, and so does everything when no store is configured.
    """
    if not configured() or Path(artifact_path).exists():
        return artifact_path
    version = ModelVersion.objects.filter(artifact_path=artifact_path).exclude(storage_uri="").first()
    if version is None:
        return artifact_path
    cache = version_cache(version)
    if cache.is_dir():
        return str(cache)
    bucket, prefix = _split(version.storage_uri)
    try:
        _download_prefix(bucket, prefix, cache, what=str(version))
    except _store_errors() as exc:
        raise _unreachable(f"the files of {version}", version.storage_uri, exc) from exc
    logger.info("downloaded %s from %s into %s", version, version.storage_uri, cache)
    return str(cache)


def read_text(*, version: ModelVersion, name: str) -> str:
    """One small text file of the version's folder (its model card), without fetching the whole model:
    from this host's copy when it has one, else straight from the store; "" when it is nowhere."""
    for folder in (Path(version.artifact_path), version_cache(version)):
        if (folder / name).is_file():
            return (folder / name).read_text(errors="replace")
    if not configured() or not version.storage_uri:
        return ""
    bucket, prefix = _split(version.storage_uri)
    try:
        return _client().get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read().decode(errors="replace")
    except _store_errors() as exc:
        logger.warning("could not read %s of %s from the artifact store: %s", name, version, exc)
        return ""


def _download_prefix(bucket: str, prefix: str, target: Path, *, what: str) -> None:
    """Every object under `prefix/` into `target`, which appears complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        client = _client()
        found = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for item in page.get("Contents", []):
                file = (partial / item["Key"][len(prefix) + 1:]).resolve()
                if partial.resolve() not in file.parents:  # a key such as "prefix/../../x" would write elsewhere
                    raise ServiceError(f"The stored files of {what} include {item['Key']!r}, which points outside "
                                       "its folder; nothing was downloaded from it.")
                file.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(file))
                found += 1
        if not found:
            raise ServiceError(f"The artifact store holds no files of {what} under s3://{bucket}/{prefix}/; "
                               "it was published to another store, or its files were deleted there.")
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():  # not "another process was faster": a real failure
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def forget(*, version: ModelVersion) -> None:
    """Delete a deleted version's files from the store and this host's cache (best effort, logged).

    Other hosts' caches keep their copy until their disk is cleaned: nothing points to it any more.
    """
    shutil.rmtree(version_cache(version), ignore_errors=True)
    if not configured() or not version.storage_uri:
        return
    bucket, prefix = _split(version.storage_uri)
    try:
        client = _client()
        keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
                for item in page.get("Contents", [])]
        _delete_keys(client, bucket, keys)
    except _store_errors() as exc:
        logger.warning("could not delete %s from the artifact store: %s", version.storage_uri, exc)


def _delete_keys(client, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), _DELETE_BATCH):
        batch = keys[start:start + _DELETE_BATCH]
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})


# --- Single files: fitted clustering models ---------------------------------------------------


def publish_file(path: Path, *segments: str | int) -> None:
    """Upload one file under the key made of `segments` (ids); nothing when no store is configured."""
    if not configured():
        return
    bucket, key = _key(*segments)
    try:
        _client().upload_file(str(path), bucket, key)
    except _store_errors() as exc:
        raise _unreachable(f"{Path(path).name}", f"s3://{bucket}/{key}", exc) from exc


def fetch_file(target: Path, *segments: str | int) -> Path:
    """`target` when this host has it (or no store is configured), else downloaded there from the store."""
    target = Path(target)
    if not configured() or target.exists():
        return target
    bucket, key = _key(*segments)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        _client().download_file(bucket, key, partial)
        os.replace(partial, target)  # complete or absent
    except _store_errors() as exc:
        raise _unreachable(target.name, f"s3://{bucket}/{key}", exc) from exc
    finally:
        Path(partial).unlink(missing_ok=True)
    logger.info("downloaded s3://%s/%s into %s", bucket, key, target)
    return target


# --- Staged uploads ----------------------------------------------------------------------------


def _upload_segments(owner_id: int, file_path: str | Path) -> tuple[str, str, str]:
    name = Path(file_path).name
    if not _UPLOAD_NAME.match(name):  # staged files are named <uuid hex>.upload by training.import_jobs
        raise ServiceError(f"{name!r} is not the name of a staged upload.")
    return ("uploads", str(int(owner_id)), name)


def publish_upload(*, owner_id: int, file_path: str | Path) -> None:
    """Put a staged upload in the store, so a worker (or web process) on another host can read it."""
    publish_file(Path(file_path), *_upload_segments(owner_id, file_path))


def local_upload(*, owner_id: int, file_path: str | Path) -> Path:
    """The staged upload on this host: where it was staged, else this host's copy of the store's."""
    path = Path(file_path)
    if not configured() or path.exists():
        return path
    return fetch_file(Path(settings.UPLOADS_DIR) / path.name, *_upload_segments(owner_id, file_path))


def remove_uploads(staged: list[tuple[int, str]]) -> None:
    """Delete staged uploads [(owner id, file path)] here (where staged and this host's cached copy) and
    from the store, in one request per thousand. Best effort: a failure is logged, never raised."""
    keys: list[str] = []
    for owner_id, file_path in staged:
        path = Path(file_path)
        path.unlink(missing_ok=True)
        (Path(settings.UPLOADS_DIR) / path.name).unlink(missing_ok=True)
        if configured() and _UPLOAD_NAME.match(path.name):
            keys.append(_key(*_upload_segments(owner_id, path))[1])
    if not keys:
        return
    bucket, _ = _split(settings.ARTIFACT_STORE)
    try:
        _delete_keys(_client(), bucket, keys)
    except _store_errors() as exc:
        logger.warning("could not delete %d staged upload(s) from the artifact store: %s", len(keys), exc)
