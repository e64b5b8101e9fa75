"""Datasets: importing uploads as versions, previews, mappings, deleting.

Views, API views, tasks and commands call these functions; none of them
mutates datasets or documents on its own.

An upload is staged with COPY into a temporary table and merged into the
dataset's documents by key in one transaction (training.versions): new keys
are added, keys whose content hash differs are changed, the rest are
unchanged, and a DatasetVersion records the counts and the validation report.
Anything that goes wrong rolls the whole upload back, so the dataset keeps
what it had.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from django.conf import settings
from django.contrib.postgres.search import SearchVector
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, connection, transaction
from django.db.models import Max, Q

from embedportal import jobs
from training import artifacts, bm25, importers, versions
from training.corpus import ticket_links
from training.errors import ServiceError
from training.models import (
    Dataset,
    DatasetVersion,
    Document,
    ImportJob,
    JiraConnection,
    ModelVersion,
    TrainingRun,
)
from training.pairs import Example, Ticket
from training.signals import dataset_created, dataset_version_added

# Rows per bulk_update when a links upload touches documents.
LINK_UPDATE_BATCH = 1000
# A preview checks this many rows and stops (its report says so): enough to
# judge a file, while a web request never reads a million-row export.
PREVIEW_CHECK_ROWS = 10_000
# A compressed upload imported during a web request may expand to this many
# times EMBEDPORTAL_BACKGROUND_IMPORT_MB. Uploads whose header declares more go
# to a background job (import_jobs.wants_background), so this stops only headers
# that lie, with room for a concatenated gzip whose trailer covers its last part.
REQUEST_EXPANSION = 2
MAX_NAME_CHARS = 200
# Bidirectional overrides reorder the text around them ("exe.txt" shown as "txt.exe").
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def expanded_limit(*, background: bool) -> int:
    """Bytes a compressed upload may expand to: in a worker, EMBEDPORTAL_MAX_DECOMPRESSED_MB (default: the
    plain upload limit, so compression lets no more data in than an uncompressed file could bring); during
    a web request, at most REQUEST_EXPANSION x EMBEDPORTAL_BACKGROUND_IMPORT_MB."""
    mb = 1024 * 1024
    worker = int(settings.MAX_DECOMPRESSED_MB) * mb
    if background:
        return worker
    return min(worker, settings.BACKGROUND_IMPORT_MB * REQUEST_EXPANSION * mb)


# --- Creating and updating ---------------------------------------------------------


def import_dataset(
    *,
    owner,
    name: str,
    kind: str = "",
    path: Path,
    filename: str,
    strict: bool = False,
    mapping: dict[str, Any] | None = None,
    language: str = "english",
    progress: versions.Progress | None = None,
    background: bool = False,
    repeated_questions: str = "keep",
) -> Dataset:
    """Create a dataset from an uploaded export (version 1), all or nothing.

    background: True in a worker (a compressed file may expand further: expanded_limit).
    repeated_questions: for Q&A, "keep" (each answer its own document) or "merge" (one document per
    question); remembered on the dataset for its next uploads. Merged rows are listed in the report.

    `language` is the PostgreSQL text-search configuration (stemming, stop
    words) of the dataset's keyword index; an unknown one is refused.

    kind "" takes the kind the file's format implies. Side effects: creates the
    Dataset, its Documents (with their full-text vectors) and DatasetVersion 1
    in one transaction and sends dataset_created inside it; raises ServiceError (nothing stored) when the file
    cannot be imported, no row is usable, or strict is set and a row is bad.
    """
    name = name.strip()
    check_new_dataset(owner=owner, name=name, kind=kind, language=language)
    report = importers.ImportReport()
    try:
        upload = importers.read_upload(path, filename, report, kind=kind, mapping=mapping,
                                       max_bytes=expanded_limit(background=background),
                                       repeated_questions=repeated_questions)
        if upload.format == "jira_links":
            raise ServiceError(
                f"file: {filename} holds duplicate links, not tickets. Import the tickets first, then add "
                "this file to that dataset with \"Add duplicate links\"."
            )
        with transaction.atomic():
            dataset = Dataset.objects.create(
                owner=owner,
                name=name,
                kind=upload.kind,
                language=language,
                source_filename=filename[:255],
                column_mapping=upload.mapping if upload.format == "mapped" else {},
                repeated_questions=repeated_questions,
            )
            first = versions.store_version(dataset=dataset, upload=upload, report=report, filename=filename,
                                           strict=strict, progress=progress)
            # Inside the transaction: a receiver's rows (search's base-model index) commit with the dataset.
            dataset_created.send(sender=Dataset, dataset=dataset, version=first)
    except importers.UploadError as exc:
        raise ServiceError(str(exc)) from exc
    except IntegrityError as exc:  # a concurrent upload took the same name
        raise ServiceError(f"name: you already have a dataset called {name!r}; pick another name.") from exc
    return dataset


def check_new_dataset(*, owner, name: str, kind: str, language: str) -> None:
    """What a new dataset needs before its file is read: a free name, a known kind and language.

    Raises ServiceError naming the field. Background imports check this when
    they are queued, so a job does not wait in line only to fail on it.
    """
    if not name:
        raise ServiceError("name: give the dataset a name.")
    check_name(name)
    languages = text_search_configs()
    if language not in languages:
        raise ServiceError(f"language: {language!r} is not a text-search configuration here; one of "
                           f"{', '.join(languages)}.")
    if Dataset.objects.filter(owner=owner, name=name).exists():
        raise ServiceError(f"name: you already have a dataset called {name!r}; pick another name.")
    if kind and kind not in Dataset.Kind.values:
        raise ServiceError(f"kind: {kind!r} is not one of {', '.join(Dataset.Kind.values)}.")


def check_name(name: str) -> None:
    """A dataset name is plain text shown on pages and in download names, never a path.

    Slashes, dots and any other printable character are kept as typed (files
    and keys are named by ids); control characters, which no one types and
    which garble pages, logs and headers, are refused, as is a name longer
    than the column. Raises ServiceError naming the field.
    """
    if len(name) > MAX_NAME_CHARS:
        raise ServiceError(f"name: at most {MAX_NAME_CHARS} characters, got {len(name)}.")
    bad = next((ch for ch in name if unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS), None)
    if bad is not None:
        raise ServiceError(f"name: contains the control character U+{ord(bad):04X} (at position "
                           f"{name.index(bad) + 1}); use printable characters only.")


def add_version(
    *, dataset: Dataset, path: Path, filename: str, strict: bool = False, mapping: dict[str, Any] | None = None,
    progress: versions.Progress | None = None, background: bool = False, repeated_questions: str = "",
) -> DatasetVersion:
    """Upsert a newer export into an existing dataset and record it as a new version.

    The dataset's remembered column mapping is used when none is given; a given
    one is remembered. Documents missing from the new export are kept (exports
    are often partial). Side effects: adds/updates Documents and creates a
    DatasetVersion in one transaction, then queues an incremental refresh of
    the dataset's search indexes (new and changed documents only; the old
    vectors serve until replaced). repeated_questions "" uses the dataset's remembered choice; a given
    one is remembered. Raises ServiceError with nothing changed.
    """
    use_mapping = mapping or dataset.column_mapping or None
    repeats = repeated_questions or dataset.repeated_questions or "keep"
    report = importers.ImportReport()
    try:
        upload = importers.read_upload(path, filename, report, kind=dataset.kind, mapping=use_mapping,
                                       max_bytes=expanded_limit(background=background), repeated_questions=repeats)
        if upload.format == "jira_links":
            return import_links(dataset=dataset, path=path, filename=filename, strict=strict, background=background)
        with transaction.atomic():
            locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
            version = versions.store_version(dataset=locked, upload=upload, report=report, filename=filename,
                                             strict=strict, progress=progress)
            if mapping:
                locked.column_mapping = upload.mapping
            locked.source_filename = filename[:255]
            locked.repeated_questions = repeats
            locked.save(update_fields=["column_mapping", "source_filename", "repeated_questions"])
    except importers.UploadError as exc:
        raise ServiceError(str(exc)) from exc
    dataset.refresh_from_db()
    dataset_version_added.send(sender=Dataset, dataset=dataset, version=version)
    return version


def import_links(
    *, dataset: Dataset, path: Path, filename: str, strict: bool = False, background: bool = False,
) -> DatasetVersion:
    """Add the duplicate links of a separate links file (`Issue id, Duplicate id`) to a ticket dataset.

    Each link is stored on both tickets (outward on the first, inward on the
    second) under metadata["extra_links"], which a newer export of the tickets
    does not overwrite. Rows naming a ticket the dataset lacks are rejected.
    Side effects: updates Documents and creates a DatasetVersion, in one transaction.
    """
    if dataset.kind != Dataset.Kind.TICKETS:
        raise ServiceError("file: duplicate links can only be added to a tickets dataset.")
    report = importers.ImportReport()
    try:
        upload = importers.read_upload(path, filename, report, max_bytes=expanded_limit(background=background))
        if upload.format != "jira_links":
            raise ServiceError(
                f"file: {filename} is a {importers.FORMATS.get(upload.format, upload.format)} file, not duplicate "
                "links. A links file has the columns \"Issue id, Duplicate id\" (or \"Issue key, Duplicate key\")."
            )
        links = list(upload.documents)
    except importers.UploadError as exc:
        raise ServiceError(str(exc)) from exc
    keys = {link.key for link in links} | {other for link in links for other in (link.others or (link.other,))}
    with transaction.atomic():
        locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
        docs = {d.external_key: d for d in Document.objects.filter(dataset=locked, external_key__in=keys)}
        # A links file may name tickets by numeric id while the export's key is "HADOOP-123".
        for doc in Document.objects.filter(dataset=locked, metadata__issue_id__in=list(keys - set(docs))):
            docs.setdefault(doc.metadata["issue_id"], doc)
        touched: dict[int, Document] = {}
        added = 0
        for link in links:
            others = link.others or (link.other,)
            # A row is accepted whole or rejected whole, so rows read = accepted + rejected still holds.
            missing = [(value, name) for value, name in ((link.key, link.key_field),
                                                         *((o, link.other_field) for o in others)) if value not in docs]
            if missing:
                report.reject(row=link.row, key=link.key, field_name=missing[0][1],
                              reason=f"no ticket {missing[0][0]!r} in dataset {locked.name}")
                continue
            report.accept(title=link.key, body=", ".join(others))
            for other_key in others:
                for doc, other, direction in ((docs[link.key], docs[other_key], "outward"),
                                              (docs[other_key], docs[link.key], "inward")):
                    entry = {"type": "Duplicate", "direction": direction, "key": other.external_key}
                    extra = doc.metadata.setdefault("extra_links", [])
                    if entry not in extra and entry not in doc.metadata.get("links", []):
                        extra.append(entry)
                        touched[doc.pk] = doc
                        added += 1
        if report.rows_accepted == 0:
            first = report.errors[0] if report.errors else {}
            raise ServiceError(f"{filename}: no usable link (first problem: row {first.get('row')}, "
                               f"field {first.get('field')}: {first.get('reason')}).")
        if strict and report.rows_rejected:
            first = report.errors[0]
            raise ServiceError(f"strict: {report.rows_rejected} row(s) rejected, so nothing was imported "
                               f"(strict mode). First: row {first['row']}, field {first['field']}: {first['reason']}.")
        number = (locked.versions.aggregate(n=Max("number"))["n"] or 0) + 1
        for doc in touched.values():
            doc.changed_in_version = number
        Document.objects.bulk_update(list(touched.values()), ["metadata", "changed_in_version"],
                                     batch_size=LINK_UPDATE_BATCH)
        report.detected_format = upload.format
        report.columns = upload.columns
        summary = report.as_dict()
        summary.update(version=number, added=0, changed=len(touched), unchanged=0, links_added=added // 2)
        version = DatasetVersion.objects.create(
            dataset=locked, number=number, source_filename=filename[:255], detected_format=upload.format,
            strict=strict, added=0, changed=len(touched), unchanged=0, report=summary,
            rejected_rows=report.all_errors,
        )
        locked.import_report = summary
        locked.source_filename = filename[:255]  # "Last import" names the links file, whose report it shows
        locked.save(update_fields=["import_report", "source_filename"])
    dataset.refresh_from_db()
    return version


def jira_base_url(dataset: Dataset) -> str:
    """Where the dataset's tickets open in Jira ({base}/browse/{key}): its Jira connection's address when it has
    one (that one wins: it is where the tickets come from), else the address set by hand, else ""."""
    connection_url = JiraConnection.objects.filter(dataset=dataset).values_list("base_url", flat=True).first()
    return (connection_url or dataset.jira_base_url or "").rstrip("/")


def set_jira_base_url(*, dataset: Dataset, url: str) -> Dataset:
    """Set (or clear, with "") the dataset's Jira address by hand; ServiceError naming `jira_base_url` unless it
    is an http(s) address of a site (no credentials, query or fragment). Stored without a trailing slash."""
    url = (url or "").strip()
    max_chars = Dataset._meta.get_field("jira_base_url").max_length
    if len(url) > max_chars:
        raise ServiceError(f"jira_base_url: at most {max_chars} characters, got {len(url)}.")
    if url:
        try:
            URLValidator(schemes=["http", "https"])(url)
        except ValidationError:
            raise ServiceError("jira_base_url: give the Jira site's http(s) address, e.g. "
                               "https://your-site.atlassian.net or https://issues.apache.org/jira.") from None
        from training.connectors.jira import check_base_url  # the connector's rule; imported here: it imports us

        try:
            url = check_base_url(url)
        except ServiceError as exc:
            reason = exc.by_field().get("base_url") or str(exc)
            raise ServiceError(f"jira_base_url: {reason}") from None
    dataset.jira_base_url = url
    dataset.save(update_fields=["jira_base_url"])
    return dataset


def save_mapping(*, dataset: Dataset, mapping: dict[str, Any]) -> Dataset:
    """Remember which column plays which role for this dataset's next uploads.

    Only the shape is checked here (known roles, the roles its kind needs);
    the columns are checked against the next file.
    """
    # Only text can be a column; anything else is named by validate_mapping.
    columns = [c for role, c in mapping.items() if role != "attributes" and isinstance(c, str) and c]
    attributes = mapping.get("attributes") or []
    columns += [attributes] if isinstance(attributes, str) else [
        a for a in (attributes if isinstance(attributes, list) else []) if isinstance(a, str)]
    try:
        clean = importers.validate_mapping(mapping, columns=columns, kind=dataset.kind)
    except importers.UploadError as exc:
        raise ServiceError(str(exc)) from exc
    dataset.column_mapping = clean
    dataset.save(update_fields=["column_mapping"])
    return dataset


# --- Previews and reports -----------------------------------------------------------


def preview_file(
    *,
    path: Path,
    filename: str,
    kind: str = "",
    mapping: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    rows: int = importers.PREVIEW_ROWS,
    check_rows: int = PREVIEW_CHECK_ROWS,
    repeated_questions: str = "",
) -> dict[str, Any]:
    """Read and validate the first `check_rows` rows of a file without storing anything.

    Returns format, mapping, the first `rows` rows and the report of the rows
    checked; "partial" is True when the file has more (the import reads them
    all). A file that needs a column mapping gives needs_mapping and its
    columns instead of rows; a file that cannot be read raises ServiceError.
    Runs in a web request: compressed files expand at most expanded_limit(background=False).
    """
    if dataset is not None:
        kind = dataset.kind
        mapping = mapping or dataset.column_mapping or None
        repeated_questions = repeated_questions or dataset.repeated_questions
    report = importers.ImportReport(row_limit=check_rows)
    partial = False
    sample: list[dict[str, Any]] = []
    try:
        upload = importers.read_upload(path, filename, report, kind=kind, mapping=mapping,
                                       max_bytes=expanded_limit(background=False),
                                       repeated_questions=repeated_questions or "keep")
        try:
            if upload.format == "jira_links":
                for link in upload.documents:
                    others = ", ".join(link.others or (link.other,))
                    report.accept(title=link.key, body=others)
                    if len(sample) < rows:
                        sample.append({"row": link.row, "key": link.key, "title": link.key, "body": others,
                                       "metadata": {}})
            else:
                for staged in importers.validate_rows(upload.documents, report):
                    if len(sample) < rows:
                        sample.append(importers.preview_row(staged))
        except importers.RowLimitReached:
            partial = True
    except importers.UploadError as exc:
        if exc.columns:
            _, guess = importers.suggest_mapping(exc.columns)
            return {"needs_mapping": True, "error": str(exc), "columns": exc.columns, "format": "",
                    "kind": kind, "mapping": mapping or guess, "rows": [], "report": report.as_dict()}
        raise ServiceError(str(exc)) from exc
    return {
        "needs_mapping": False,
        "error": "",
        "format": upload.format,
        "format_label": importers.FORMATS.get(upload.format, upload.format),
        "kind": upload.kind,
        "columns": upload.columns,
        "mapping": upload.mapping,
        "rows": sample,
        "report": report.as_dict(),
        "all_errors": report.all_errors,
        "partial": partial,
        "rows_checked": report.rows_read,
    }


def report_csv(*, version: DatasetVersion) -> Iterator[str]:
    """Every rejected row of a version as CSV lines, formula prefixes neutralised."""
    return importers.write_csv(importers.error_csv_rows(version.rejected_rows))


@contextmanager
def upload_on_disk(upload) -> Iterator[Path]:
    """The path of a Django UploadedFile on disk (uploads above 2.5 MB already are)."""
    if hasattr(upload, "temporary_file_path"):
        yield Path(upload.temporary_file_path())
        return
    with tempfile.NamedTemporaryFile(suffix="-upload") as tmp:
        for chunk in upload.chunks():
            tmp.write(chunk)
        tmp.flush()
        yield Path(tmp.name)


def import_upload(
    *, owner, name: str, kind: str = "", upload, strict: bool = False, mapping: dict[str, Any] | None = None,
    language: str = "english", repeated_questions: str = "keep",
) -> Dataset:
    """import_dataset() for a Django UploadedFile (on disk or in memory)."""
    with upload_on_disk(upload) as path:
        return import_dataset(owner=owner, name=name, kind=kind, path=path, filename=upload.name, strict=strict,
                              mapping=mapping, language=language, repeated_questions=repeated_questions)


def check_repeated_questions(value: str) -> None:
    """ServiceError naming the field unless `value` is a choice of importers.REPEATED_QUESTIONS ("" = default)."""
    if value and value not in importers.REPEATED_QUESTIONS:
        raise ServiceError(f"repeated_questions: {value!r} is not one of {', '.join(importers.REPEATED_QUESTIONS)} "
                           f"({'; '.join(f'{k}: {v}' for k, v in importers.REPEATED_QUESTIONS.items())}).")


def text_search_configs() -> list[str]:
    """The text-search configurations this PostgreSQL has (english, german, simple, ...)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT cfgname FROM pg_ts_config ORDER BY cfgname")
        return [row[0] for row in cursor.fetchall()]


def refresh_search_vectors(*, dataset: Dataset) -> None:
    """Fill the weighted tsvector (title A, body B) of every document, and the dataset's BM25 statistics, in SQL."""
    config = dataset.language
    with transaction.atomic():
        Document.objects.filter(dataset=dataset).update(
            search_vector=SearchVector("title", weight="A", config=config)
            + SearchVector("body", weight="B", config=config)
        )
        bm25.refresh_statistics(dataset_id=dataset.pk)


def delete_dataset(*, dataset: Dataset) -> None:
    """Delete a dataset and what was made from it; its jobs are cancelled and its files removed.

    Side effects: every unfinished training run and import job of the dataset
    is cancelled (jobs.request_cancel, committed first, so a running worker
    stops at its next safe point: a run within a second, an import at its next
    progress report or at its fence, rolling back). Then, in one transaction,
    the dataset is deleted with its documents, versions, import jobs and
    training runs; search's indexes, scans and clusterings of it go by cascade.
    A worker still busy with any of these finds its row gone at its next
    fenced write or heartbeat (LostClaim) and stops without writing. After
    commit, the staged uploads of its import jobs and the run folders
    (MODELS_DIR/run-<id>) that no remaining model version's artifact lies in
    are removed. Model versions trained on it stay (their dataset becomes empty).
    """
    from training.runs import run_folder

    unfinished = [*dataset.training_runs.exclude(status__in=TrainingRun.TERMINAL),
                  *dataset.import_jobs.exclude(status__in=ImportJob.TERMINAL)]
    for job in unfinished:
        jobs.request_cancel(job)
    with transaction.atomic():
        # NO KEY: waits for an import merging into the dataset (FOR UPDATE) to reach its fence and roll back,
        # without blocking a run that registers its model version meanwhile (a foreign key to the dataset).
        Dataset.objects.select_for_update(no_key=True).filter(pk=dataset.pk).first()
        staged = list(dataset.import_jobs.exclude(file_path="").values_list("owner_id", "file_path"))
        folders = [run_folder(run=run) for run in dataset.training_runs.only("pk")]
        dataset.training_runs.all().delete()  # protected: they go first, the rest by cascade
        dataset.delete()
        transaction.on_commit(lambda: _remove_files(staged=staged, run_folders=folders))


def _remove_files(*, staged: list[tuple[int, str]], run_folders: list[Path]) -> None:
    """Remove staged uploads [(owner id, path)] (here and in the artifact store), and run folders unless a
    model version's artifact lies inside (it still serves)."""
    artifacts.remove_uploads(staged)
    if not run_folders:
        return
    in_use = Q()
    for folder in run_folders:
        in_use |= Q(artifact_path__startswith=f"{folder}{os.sep}") | Q(artifact_path=str(folder))
    used = list(ModelVersion.objects.filter(in_use).values_list("artifact_path", flat=True))
    for folder in run_folders:
        if not any(path == str(folder) or path.startswith(f"{folder}{os.sep}") for path in used):
            shutil.rmtree(folder, ignore_errors=True)  # a stopping worker may still be writing: best effort


# --- Reading documents for training -------------------------------------------------------


def dataset_tickets(dataset: Dataset) -> list[Ticket]:
    """Every document of a tickets dataset as a Ticket (links from the export and from links uploads)."""
    rows = Document.objects.filter(dataset=dataset).values_list("external_key", "title", "body", "metadata")
    return [
        Ticket(
            key=key,
            title=title,
            body=body,
            links=ticket_links(metadata),
            issue_type=str((metadata or {}).get("issue_type") or ""),
            components=tuple(str(c) for c in (metadata or {}).get("components") or []),
        )
        for key, title, body, metadata in rows.iterator(chunk_size=5000)
    ]


def dataset_examples(dataset: Dataset) -> list[Example]:
    """Every document of any dataset as an Example (Q&A, pairs, triplets, text + label)."""
    rows = Document.objects.filter(dataset=dataset).values_list("external_key", "title", "body", "metadata")
    out = []
    for key, title, body, metadata in rows.iterator(chunk_size=5000):
        metadata = metadata or {}
        score = metadata.get("score")
        out.append(
            Example(
                key=key,
                title=title,
                body=body,
                label=str(metadata.get("label") or ""),
                group=str(metadata.get("group") or ""),
                negative=str(metadata.get("negative") or ""),
                score=float(score) if isinstance(score, (int, float)) else None,
                paraphrases=tuple(str(p) for p in metadata.get("paraphrases") or []),
            )
        )
    return out
