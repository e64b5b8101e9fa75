"""Where model folders live: the local MODELS_DIR, plus an S3-compatible store when configured.

With EMBEDPORTAL_ARTIFACT_STORE=s3://bucket/prefix (and the usual AWS_*
variables, or EMBEDPORTAL_S3_ENDPOINT_URL for MinIO/Ceph/R2), every
registered version is uploaded there; a web or worker process on another
machine that lacks the folder downloads it on first use into the same local
path. Without the setting, artifacts stay in the local folder only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings

from training.errors import ServiceError
from training.models import ModelVersion

logger = logging.getLogger(__name__)


def _client():
    import boto3

    return boto3.client("s3", endpoint_url=settings.S3_ENDPOINT_URL or None)


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ServiceError(f"EMBEDPORTAL_ARTIFACT_STORE must look like s3://bucket/prefix, got {uri!r}.")
    return parsed.netloc, parsed.path.strip("/")


def publish(*, version: ModelVersion) -> str:
    """Upload the version's folder to the configured store; returns its URI ('' when none is configured)."""
    store = settings.ARTIFACT_STORE
    if not store:
        return ""
    bucket, prefix = _split(store)
    folder = Path(version.artifact_path)
    # Ids, never the (user-chosen) name: a name like "../x" or "a/b" would reach into other keys.
    key_prefix = "/".join(p for p in (prefix, f"{version.owner_id}", f"version-{version.pk}") if p)
    client = _client()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            client.upload_file(str(file), bucket, f"{key_prefix}/{file.relative_to(folder).as_posix()}")
    uri = f"s3://{bucket}/{key_prefix}/"
    ModelVersion.objects.filter(pk=version.pk).update(storage_uri=uri)
    version.storage_uri = uri
    return uri


def ensure_local(artifact_path: str) -> str:
    """Make sure a registered version's folder exists here, downloading it from the store if needed."""
    folder = Path(artifact_path)
    if folder.exists() or not settings.ARTIFACT_STORE:
        return artifact_path
    version = ModelVersion.objects.filter(artifact_path=artifact_path).exclude(storage_uri="").first()
    if version is None:
        return artifact_path
    bucket, prefix = _split(version.storage_uri)
    client = _client()
    partial = folder.with_name(folder.name + ".partial")
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            target = (partial / item["Key"][len(prefix) + 1 :]).resolve()
            if partial.resolve() not in target.parents:  # a key such as "prefix/../../x" would write elsewhere
                raise ServiceError(f"The stored files of {version} include {item['Key']!r}, which points outside "
                                   "its folder; nothing was downloaded from it.")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target))
    partial.rename(folder)  # appears complete or not at all
    logger.info("downloaded %s from %s", version, version.storage_uri)
    return artifact_path
