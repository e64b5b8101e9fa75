"""How search reacts to what training announces (training.signals): vectors and promotions follow new facts."""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from search import indexing, serving
from search.clustering import assignment
from search.vectors import drop_partition, ensure_partition, store_embeddings
from training.models import Document, ModelVersion
from training.signals import dataset_created, dataset_version_added, model_version_registered, promotion_approved


@receiver(post_save, sender=ModelVersion, dispatch_uid="search.create_vector_partition")
def create_vector_partition(sender, *, instance: ModelVersion, created: bool, raw: bool = False, **kwargs) -> None:
    """A new version gets its own partition of search_embedding before any vector is stored (search.vectors)."""
    if created and not raw:
        ensure_partition(instance.pk)


@receiver(post_delete, sender=ModelVersion, dispatch_uid="search.drop_vector_partition")
def drop_vector_partition(sender, *, instance: ModelVersion, **kwargs) -> None:
    """A deleted version's partition goes once the deletion commits (cascades from a dataset's included)."""
    version_id = instance.pk
    transaction.on_commit(lambda: drop_partition(version_id))


@receiver(model_version_registered, dispatch_uid="search.store_run_vectors_and_first_promotion")
def store_run_vectors_and_first_promotion(sender, *, version: ModelVersion, embeddings=None, **kwargs) -> None:
    """Keep the run's corpus vectors as the version's (the index build embeds only what is missing),
    and promote the first model of a dataset."""
    if embeddings is not None:
        doc_ids, vectors = embeddings
        hashes = dict(Document.objects.filter(pk__in=doc_ids).values_list("pk", "content_hash"))
        store_embeddings(
            model_version=version, doc_ids=doc_ids, vectors=vectors,
            content_hashes=[hashes.get(d, "") for d in doc_ids],
        )
    if version.dataset_id and not ModelVersion.objects.filter(
        dataset_id=version.dataset_id, stage=ModelVersion.Stage.PRODUCTION
    ).exists():
        serving.request_promotion(version=version, user=version.owner)


@receiver(dataset_created, dispatch_uid="search.index_new_dataset_with_base_model")
def index_new_dataset_with_base_model(sender, *, dataset, version, **kwargs) -> None:
    """A new dataset is searchable at once: keyword search needs no model, and a base-model index is queued."""
    indexing.create_base_index(dataset=dataset)


@receiver(dataset_version_added, dispatch_uid="search.refresh_indexes_of_new_dataset_version")
def refresh_indexes_of_new_dataset_version(sender, *, dataset, version, **kwargs) -> None:
    """New and changed documents get vectors; the indexes keep serving their current ones meanwhile.

    A dataset imported before base-model indexes existed (so with no index at all) gets one now.
    """
    if version.added or version.changed:
        indexing.refresh_indexes(dataset=dataset)
        indexing.create_base_index(dataset=dataset)


@receiver(dataset_version_added, dispatch_uid="search.assign_new_tickets_to_clusters")
def assign_new_tickets_to_clusters(sender, *, dataset, version, **kwargs) -> None:
    """New tickets join the dataset's current clustering without a refit, once they have vectors.

    Connected after the index refresh above, so the index is already queued
    again: the run is flagged here and the build's end queues the assignment
    (search.clustering.assignment explains the order).
    """
    if version.added:
        assignment.mark_new_tickets(dataset=dataset)


@receiver(promotion_approved, dispatch_uid="search.promote_approved_challenger")
def promote_approved_challenger(sender, *, version: ModelVersion, user=None, decision=None, **kwargs) -> None:
    """A retrain's challenger passed the guard: serve it once its index is ready.

    Without the not-worse check: the retrain's guard (better with confidence)
    is stricter than it, on the same comparison (training.evaluation).
    """
    serving.request_promotion(version=version, user=user)
