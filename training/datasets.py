"""Datasets: importing uploads, keeping their full-text vectors, deleting.

Views, API views, tasks and commands call these functions; none of them
mutates datasets or documents on its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from django.contrib.postgres.search import SearchVector
from django.db import IntegrityError, transaction

from training import importers
from training.errors import ServiceError
from training.models import Dataset, Document, TrainingRun
from training.pairs import Ticket

# Rows per INSERT batch. 2,000 Hadoop tickets (~4 MB of text) per statement
# kept the 20,859-issue import at ~9 s with flat memory on 2 cores.
IMPORT_BATCH_SIZE = 2000


def import_dataset(*, owner, name: str, kind: str, path: Path, filename: str) -> Dataset:
    """Parse an uploaded export and store it as a new dataset, all or nothing.

    Side effects: creates the Dataset and its Documents and fills their
    full-text vectors in one transaction; raises ServiceError (nothing stored)
    when the file cannot be imported or no row is usable.
    """
    name = name.strip()
    if not name:
        raise ServiceError("name: give the dataset a name.")
    if Dataset.objects.filter(owner=owner, name=name).exists():
        raise ServiceError(f"name: you already have a dataset called {name!r}; pick another name.")
    if kind != Dataset.Kind.TICKETS:
        raise ServiceError("kind: only Jira ticket exports (kind 'tickets') can be imported so far.")

    report = importers.ImportReport()
    try:
        with transaction.atomic():
            dataset = Dataset.objects.create(owner=owner, name=name, kind=kind, source_filename=filename[:255])
            _store_documents(dataset, importers.parse_jira_json(path, filename, report))
            if report.rows_accepted == 0:
                first = report.errors[0] if report.errors else {}
                raise ServiceError(
                    f"{filename}: no usable issue in the file (first problem: row {first.get('row')}, "
                    f"field {first.get('field')}: {first.get('reason')})."
                )
            dataset.import_report = report.as_dict()
            dataset.save(update_fields=["import_report"])
            refresh_search_vectors(dataset=dataset)
    except importers.UploadError as exc:
        raise ServiceError(str(exc)) from exc
    except IntegrityError as exc:  # a concurrent upload took the same name
        raise ServiceError(f"name: you already have a dataset called {name!r}; pick another name.") from exc
    return dataset


def import_upload(*, owner, name: str, kind: str, upload) -> Dataset:
    """import_dataset() for a Django UploadedFile (on disk or in memory)."""
    if hasattr(upload, "temporary_file_path"):
        return import_dataset(owner=owner, name=name, kind=kind, path=Path(upload.temporary_file_path()), filename=upload.name)
    with tempfile.NamedTemporaryFile(suffix="-upload") as tmp:
        for chunk in upload.chunks():
            tmp.write(chunk)
        tmp.flush()
        return import_dataset(owner=owner, name=name, kind=kind, path=Path(tmp.name), filename=upload.name)


def _store_documents(dataset: Dataset, parsed) -> None:
    seen: set[str] = set()
    batch: list[Document] = []
    for doc in parsed:
        if doc.external_key in seen:
            # A later row with the same key replaces nothing: first one wins.
            continue
        seen.add(doc.external_key)
        batch.append(
            Document(
                dataset=dataset,
                external_key=doc.external_key,
                title=doc.title,
                body=doc.body,
                metadata=doc.metadata,
            )
        )
        if len(batch) >= IMPORT_BATCH_SIZE:
            Document.objects.bulk_create(batch)
            batch = []
    if batch:
        Document.objects.bulk_create(batch)


def refresh_search_vectors(*, dataset: Dataset) -> None:
    """Fill the weighted tsvector (title A, body B) of every document, in SQL."""
    config = dataset.language
    Document.objects.filter(dataset=dataset).update(
        search_vector=SearchVector("title", weight="A", config=config)
        + SearchVector("body", weight="B", config=config)
    )


def delete_dataset(*, dataset: Dataset) -> None:
    """Delete a dataset and its documents; refused while a run uses it."""
    active = dataset.training_runs.exclude(status__in=TrainingRun.TERMINAL).count()
    if active:
        raise ServiceError(f"This dataset is used by {active} unfinished training run(s); cancel them first.")
    with transaction.atomic():
        dataset.training_runs.all().delete()
        dataset.delete()


def dataset_tickets(dataset: Dataset) -> list[Ticket]:
    rows = Document.objects.filter(dataset=dataset).values_list("external_key", "title", "body", "metadata")
    return [
        Ticket(
            key=key,
            title=title,
            body=body,
            links=tuple(
                (str(link.get("type", "")).lower(), str(link.get("key", "")))
                for link in (metadata or {}).get("links", [])
            ),
        )
        for key, title, body, metadata in rows.iterator(chunk_size=5000)
    ]
