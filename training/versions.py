"""How an upload's rows become a dataset version: COPY into a stage, merge by key, record the counts.

Runs inside the caller's transaction (training.datasets.import_dataset and
add_version), so anything that goes wrong rolls the whole upload back.
"""

from __future__ import annotations

from typing import Callable

from django.db import connection
from django.db.models import Max

from training import bm25, importers
from training.errors import ServiceError
from training.models import Dataset, DatasetVersion

STAGE_TABLE = "embedportal_import_stage"
GIN_PENDING_LIST_LIMIT = "64MB"
# Rows between two progress callbacks of an import.
PROGRESS_EVERY = 5000
Progress = Callable[[str, int], None]


def store_version(
    *, dataset: Dataset, upload: importers.Upload, report: importers.ImportReport, filename: str, strict: bool,
    progress: Progress | None = None,
) -> DatasetVersion:
    """Stage the rows with COPY, check them, merge them by key; must run inside a transaction.

    progress(phase, rows_read) is called every PROGRESS_EVERY rows while reading
    and once when merging starts (background import jobs show it).
    """
    number = (dataset.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    with connection.cursor() as cursor:
        # The two GIN indexes on documents (title/body tsvector, identifiers) merge
        # their pending lists in fewer, larger batches: the 20,859-issue import took
        # 28.6/29.3 s instead of 33.3/51.5 s (4 MB default), A/B on the loaded 2-core
        # machine. Autovacuum merges what is left after commit.
        cursor.execute(f"SET LOCAL gin_pending_list_limit = '{GIN_PENDING_LIST_LIMIT}'")
        cursor.execute(f"DROP TABLE IF EXISTS pg_temp.{STAGE_TABLE}")
        cursor.execute(
            f"CREATE TEMP TABLE {STAGE_TABLE} (row integer, external_key varchar(255), title text, body text, "
            "metadata jsonb, content_hash varchar(40)) ON COMMIT DROP"
        )
        # COPY streams rows to the server in ~32 KB chunks: memory stays flat
        # whatever the file size (1M rows: see docs/benchmarks.md).
        with cursor.copy(
            f"COPY {STAGE_TABLE} (row, external_key, title, body, metadata, content_hash) FROM STDIN"
        ) as copy:
            for row in importers.validate_rows(upload.documents, report):
                copy.write_row((row.row, row.external_key, row.title, row.body, row.metadata_json, row.content_hash))
                if progress is not None and report.rows_read % PROGRESS_EVERY == 0:
                    progress("reading", report.rows_read)
        if progress is not None:
            progress("merging", report.rows_read)
        if report.rows_accepted == 0:
            first = report.errors[0] if report.errors else {}
            raise ServiceError(
                f"{filename}: no usable row in the file (first problem: row {first.get('row')}, "
                f"field {first.get('field')}: {first.get('reason')})."
            )
        if strict and report.rows_rejected:
            first = report.errors[0]
            raise ServiceError(
                f"strict: {report.rows_rejected} row(s) rejected, so nothing was imported (strict mode). "
                f"First: row {first['row']}, field {first['field']}: {first['reason']}."
            )
        first_version = not dataset.documents.exists()
        if first_version:
            # Nothing to compare with: every staged row is new (no join, no index on the stage).
            added, changed, unchanged = report.rows_accepted, 0, 0
        else:
            cursor.execute(f"CREATE INDEX ON {STAGE_TABLE} (external_key)")
            cursor.execute(f"ANALYZE {STAGE_TABLE}")
            cursor.execute(
                f"SELECT count(*) FILTER (WHERE d.id IS NULL), "
                f"count(*) FILTER (WHERE d.id IS NOT NULL AND d.content_hash <> s.content_hash), "
                f"count(*) FILTER (WHERE d.content_hash = s.content_hash) "
                f"FROM {STAGE_TABLE} s LEFT JOIN training_document d "
                f"ON d.dataset_id = %s AND d.external_key = s.external_key",
                [dataset.pk],
            )
            added, changed, unchanged = cursor.fetchone()
        vector = (
            "setweight(to_tsvector(%(config)s::regconfig, s.title), 'A') || "
            "setweight(to_tsvector(%(config)s::regconfig, s.body), 'B')"
        )
        params = {"dataset": dataset.pk, "version": number, "config": dataset.language}
        if changed:
            # Vectors of changed documents are kept (search keeps answering with
            # them) until the refresh job re-embeds exactly those documents: their
            # stored content hash no longer matches (search.embedding.pending_documents).
            # Links added by a separate links upload (extra_links) survive a newer export.
            cursor.execute(
                f"UPDATE training_document d SET title = s.title, body = s.body, "
                f"metadata = CASE WHEN d.metadata ? 'extra_links' "
                f"THEN s.metadata || jsonb_build_object('extra_links', d.metadata -> 'extra_links') "
                f"ELSE s.metadata END, "
                f"content_hash = s.content_hash, changed_in_version = %(version)s, search_vector = {vector} "
                f"FROM {STAGE_TABLE} s WHERE d.dataset_id = %(dataset)s AND d.external_key = s.external_key "
                "AND d.content_hash <> s.content_hash",
                params,
            )
        if added:
            # COPY filled the stage in file order and a sequential scan reads it back
            # that way, so documents keep the file's order without an ORDER BY (a
            # sort of a 1 GB stage spills to disk with the default 4 MB work_mem).
            only_new = "" if first_version else (
                "WHERE NOT EXISTS (SELECT 1 FROM training_document d "
                "WHERE d.dataset_id = %(dataset)s AND d.external_key = s.external_key)"
            )
            cursor.execute(
                "INSERT INTO training_document "
                "(dataset_id, external_key, title, body, metadata, content_hash, changed_in_version, search_vector) "
                f"SELECT %(dataset)s, s.external_key, s.title, s.body, s.metadata, s.content_hash, %(version)s, "
                f"{vector} FROM {STAGE_TABLE} s {only_new}",
                params,
            )
        cursor.execute(f"DROP TABLE {STAGE_TABLE}")
    if added or changed:
        bm25.refresh_statistics(dataset_id=dataset.pk, version=number)
    summary = report.as_dict()
    summary.update(version=number, added=added, changed=changed, unchanged=unchanged)
    version = DatasetVersion.objects.create(
        dataset=dataset,
        number=number,
        source_filename=filename[:255],
        detected_format=upload.format,
        strict=strict,
        added=added,
        changed=changed,
        unchanged=unchanged,
        report=summary,
        rejected_rows=report.all_errors,
    )
    dataset.import_report = summary
    dataset.save(update_fields=["import_report"])
    return version
