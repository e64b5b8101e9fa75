"""The duplicate finder: near pairs of a dataset's documents by their vectors, and a person's review.

The scan is an IndexJob (embedportal.jobs): chunked INSERT ... SELECT over
HNSW with the heartbeat and progress saved between chunks.
"""

from __future__ import annotations

from django.db import connection, transaction
from django.utils import timezone

from embedportal import jobs
from search import index_jobs
from search.hybrid import HNSW_EF_SEARCH, SearchError
from search.models import DuplicatePair, IndexJob, SearchIndex
from search.vectors import vector_cast
from training.models import Dataset, Document

DEFAULT_DUPLICATE_THRESHOLD = 0.9
# Neighbours looked at per document; pairs beyond the 5th neighbour are rare
# above a 0.85 threshold and each extra one costs HNSW work for every document.
DUPLICATE_NEIGHBOURS = 5
# Documents per INSERT ... SELECT statement (one HNSW lookup each, ~1-3 ms),
# with the heartbeat/progress saved in between.
DUPLICATE_CHUNK = 500


def start_duplicate_scan(*, index: SearchIndex, owner, threshold: float = DEFAULT_DUPLICATE_THRESHOLD) -> IndexJob:
    """Queue a duplicate scan of the index's dataset (after commit); refused while one is under way."""
    if not 0.5 <= threshold < 1.0:
        raise SearchError(f"threshold: must be at least 0.5 and below 1, got {threshold}.")
    return index_jobs.start(index=index, owner=owner, kind=IndexJob.Kind.DUPLICATES, params={"threshold": threshold})


def latest_scan(*, index: SearchIndex) -> IndexJob | None:
    return index.jobs.filter(kind=IndexJob.Kind.DUPLICATES).order_by("-created_at", "-id").first()


def scan_duplicates(attempt: jobs.Attempt, job: IndexJob) -> None:
    """Store every pair of the dataset whose cosine similarity is >= the job's threshold.

    Side effects: deletes the dataset's unreviewed pairs, then inserts the
    pairs found (each document's DUPLICATE_NEIGHBOURS nearest, via HNSW),
    chunk by chunk with progress; reviewed pairs keep their decision and are
    not re-added as pending. A resumed attempt starts over (pending pairs are
    cheap to find again; decisions are never touched).
    """
    index = job.index
    threshold = float(job.params.get("threshold") or DEFAULT_DUPLICATE_THRESHOLD)
    cast, version_id = vector_cast(index.model_version.dimensions)[0], int(index.model_version_id)
    sql = (
        "INSERT INTO search_duplicatepair (dataset_id, document_a_id, document_b_id, similarity, found_with_id, "
        "decision, created_at) "
        "SELECT DISTINCT ON (a, b) %s, a, b, sim, %s, 'pending', now() FROM ("
        "  SELECT LEAST(src.document_id, nn.document_id) AS a, GREATEST(src.document_id, nn.document_id) AS b, nn.sim "
        "  FROM search_embedding src CROSS JOIN LATERAL ("
        f"    SELECT e.document_id, 1 - ((e.embedding::{cast}) <=> (src.embedding::{cast})) AS sim "
        "    FROM search_embedding e JOIN training_document d ON d.id = e.document_id "
        f"    WHERE e.model_version_id = {version_id} AND d.dataset_id = %s "
        f"    ORDER BY (e.embedding::{cast}) <=> (src.embedding::{cast}) LIMIT %s"
        "  ) nn "
        f"  WHERE src.model_version_id = {version_id} AND src.document_id = ANY(%s) "
        "  AND nn.document_id <> src.document_id AND nn.sim >= %s"
        ") found ORDER BY a, b, sim DESC "
        "ON CONFLICT (document_a_id, document_b_id) DO NOTHING"
    )
    attempt.set_phase("clearing unreviewed pairs", 0.0)
    with transaction.atomic():
        attempt.update(result={"found": 0, "threshold": threshold})
        DuplicatePair.objects.filter(dataset_id=index.dataset_id, decision=DuplicatePair.Decision.PENDING).delete()
    ids = list(Document.objects.filter(dataset_id=index.dataset_id).order_by("id").values_list("id", flat=True))
    found = 0
    attempt.set_phase("scanning", 0.0)
    for start in range(0, len(ids), DUPLICATE_CHUNK):
        attempt.check()
        with transaction.atomic(), connection.cursor() as cursor:
            # Fenced inside the chunk's transaction: a stale attempt's insert rolls back with LostClaim.
            attempt.update(progress=round(start / max(len(ids), 1), 4), result={"found": found, "threshold": threshold})
            cursor.execute(f"SET LOCAL hnsw.ef_search = {HNSW_EF_SEARCH}")
            cursor.execute(
                sql,
                [index.dataset_id, version_id, index.dataset_id, DUPLICATE_NEIGHBOURS + 1,
                 ids[start : start + DUPLICATE_CHUNK], threshold],
            )
            found += cursor.rowcount
    attempt.update(result={"found": found, "threshold": threshold, "documents": len(ids)})


def decide_duplicate(*, pair: DuplicatePair, decision: str, user) -> DuplicatePair:
    """Record a reviewer's verdict on a pair (duplicate / not_duplicate / pending to undo)."""
    if decision not in DuplicatePair.Decision.values:
        raise SearchError(f"decision: must be one of {', '.join(DuplicatePair.Decision.values)}, got {decision!r}.")
    undo = decision == DuplicatePair.Decision.PENDING
    pair.decision = decision
    pair.decided_by = None if undo else user
    pair.decided_at = None if undo else timezone.now()
    pair.save(update_fields=["decision", "decided_by", "decided_at"])
    return pair


def duplicate_pairs(*, dataset: Dataset, decision: str | None = None):
    """The dataset's pairs, most similar first, with both documents (one query)."""
    pairs = DuplicatePair.objects.filter(dataset=dataset).select_related("document_a", "document_b", "decided_by")
    if decision:
        pairs = pairs.filter(decision=decision)
    return pairs.order_by("-similarity", "id")
