"""The duplicate finder: near pairs of a dataset's documents by their vectors, and a person's review.

The scan is an IndexJob (embedportal.jobs): chunked INSERT ... SELECT over
HNSW with the heartbeat and progress saved between chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from django.db import connection, transaction
from django.db.models import BooleanField
from django.db.models.expressions import RawSQL
from django.utils import timezone

from embedportal import jobs
from search import index_jobs
from search.hybrid import HNSW_EF_SEARCH, SearchError
from search.models import DuplicatePair, IndexJob, SearchIndex
from search.vectors import vector_cast
from training.importers import write_csv
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


# True when either ticket of the pair names the other in a Duplicate link: the export's links or the links
# added by a links CSV (training.corpus.ticket_links reads the same two lists). Only integers of our own
# rows reach it (the outer pair's columns); a non-array value reads as no links.
_JIRA_LINKED_SQL = (
    "EXISTS (SELECT 1 FROM training_document x "
    "JOIN training_document y ON y.id = CASE WHEN x.id = search_duplicatepair.document_a_id "
    "THEN search_duplicatepair.document_b_id ELSE search_duplicatepair.document_a_id END "
    "CROSS JOIN LATERAL jsonb_array_elements("
    "CASE WHEN jsonb_typeof(x.metadata->'links') = 'array' THEN x.metadata->'links' ELSE '[]'::jsonb END || "
    "CASE WHEN jsonb_typeof(x.metadata->'extra_links') = 'array' THEN x.metadata->'extra_links' ELSE '[]'::jsonb END"
    ") l WHERE x.id IN (search_duplicatepair.document_a_id, search_duplicatepair.document_b_id) "
    "AND lower(l->>'type') = 'duplicate' AND l->>'key' = y.external_key)"
)
JIRA_FILTERS = ("linked", "not_linked")


def duplicate_pairs(*, dataset: Dataset, decision: str | None = None, jira: str | None = None):
    """The dataset's pairs, most similar first, with both documents (one query).

    Each pair carries `jira_linked` (Jira, or a links CSV, already links the two as duplicates);
    jira="linked" keeps only those, "not_linked" only the others.
    """
    pairs = (
        DuplicatePair.objects.filter(dataset=dataset)
        .select_related("document_a", "document_b", "decided_by")
        .annotate(jira_linked=RawSQL(_JIRA_LINKED_SQL, [], output_field=BooleanField()))
    )
    if decision:
        pairs = pairs.filter(decision=decision)
    if jira == "linked":
        pairs = pairs.filter(jira_linked=True)
    elif jira == "not_linked":
        pairs = pairs.filter(jira_linked=False)
    return pairs.order_by("-similarity", "id")


# Pairs at least this similar are the same ticket filed again (six same-titled tickets give 15 such pairs):
# shown as one group with one decision. Hadoop's exact re-files score 0.99-1.0 with MiniLM; real
# duplicates with different wording stay below 0.97.
NEAR_IDENTICAL = 0.98


@dataclass
class Group:
    documents: list[Document]
    pair_ids: list[int]
    similarity: float  # the lowest similarity inside the group


def near_identical_groups(*, dataset: Dataset) -> list[Group]:
    """Unreviewed pairs above NEAR_IDENTICAL (not linked in Jira) joined into groups of three or more tickets.

    Two queries: the pairs (with both documents), nothing per group. Largest groups first.
    """
    pairs = list(duplicate_pairs(dataset=dataset, decision=DuplicatePair.Decision.PENDING, jira="not_linked")
                 .filter(similarity__gte=NEAR_IDENTICAL))
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    documents: dict[int, Document] = {}
    for pair in pairs:
        documents[pair.document_a_id], documents[pair.document_b_id] = pair.document_a, pair.document_b
        parent[find(pair.document_a_id)] = find(pair.document_b_id)
    members: dict[int, list[int]] = {}
    for doc_id in documents:
        members.setdefault(find(doc_id), []).append(doc_id)
    groups = []
    for root, ids in members.items():
        if len(ids) < 3:
            continue  # a pair stays a pair
        inside = [p for p in pairs if find(p.document_a_id) == root]
        groups.append(Group(documents=[documents[i] for i in sorted(ids)], pair_ids=sorted(p.pk for p in inside),
                            similarity=min(p.similarity for p in inside)))
    return sorted(groups, key=lambda g: (-len(g.documents), g.documents[0].pk))


def decide_group(*, dataset: Dataset, pair_ids: list[int], decision: str, user) -> int:
    """Record one verdict on every pair of a group (only the dataset's pairs); returns how many were decided."""
    if decision not in (DuplicatePair.Decision.DUPLICATE, DuplicatePair.Decision.NOT_DUPLICATE):
        raise SearchError(f"decision: must be duplicate or not_duplicate, got {decision!r}.")
    return DuplicatePair.objects.filter(dataset=dataset, pk__in=pair_ids).update(
        decision=decision, decided_by=user, decided_at=timezone.now())


def export_rows(*, dataset: Dataset, decision: str | None = None) -> Iterator[list]:
    """The reviewed (or `decision`) pairs as CSV rows with a header, to take the decisions back into Jira."""
    yield ["key_a", "title_a", "key_b", "title_b", "similarity", "decision", "linked_in_jira", "decided_by",
           "decided_at"]
    pairs = duplicate_pairs(dataset=dataset, decision=decision)
    if decision is None:
        pairs = pairs.exclude(decision=DuplicatePair.Decision.PENDING)
    for pair in pairs.iterator(chunk_size=1000):
        yield [pair.document_a.external_key, pair.document_a.title, pair.document_b.external_key,
               pair.document_b.title, f"{pair.similarity:.4f}", pair.decision, "yes" if pair.jira_linked else "no",
               pair.decided_by.username if pair.decided_by else "",
               pair.decided_at.isoformat() if pair.decided_at else ""]


def export_csv(*, dataset: Dataset, decision: str | None = None) -> Iterator[str]:
    """export_rows as CSV lines, formula prefixes neutralised (one write path for the page and the API)."""
    return write_csv(export_rows(dataset=dataset, decision=decision))
