"""Hybrid search (issue 6): identifiers, filters, fusion, paging, snippets, similar tickets, duplicates."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pytest

from embedportal import jobs
from embedportal.errors import ConflictError
from search import duplicates, filters, hybrid, index_jobs, indexing, keyword
from training.fusion import weighted_score_fusion
from search.models import DuplicatePair, Embedding, IndexJob, SearchIndex
from training.datasets import refresh_search_vectors
from training.models import Dataset, Document, ModelVersion
from django.utils import timezone

# Building creates the HNSW index (DDL): not inside a test transaction.
pytestmark = pytest.mark.django_db(transaction=True)

PRIORITIES = ["Major", "Minor", "Blocker"]
COMPONENTS = ["namenode", "datanode", "yarn"]


def _doc(i: int) -> tuple[str, str, str, dict]:
    return (
        f"HDFS-{100 + i}",
        f"Replication issue number {i} on the cluster",
        f"Block replication stalls when node {i} restarts; the balancer keeps moving blocks.",
        {
            "issue_type": "Bug" if i % 2 else "Improvement",
            "priority": PRIORITIES[i % 3],
            "status": "Open" if i < 10 else "Resolved",
            "components": [COMPONENTS[i % 3]],
            "labels": ["newbie"] if i % 5 == 0 else [],
            "created": f"{2010 + i % 6}-03-0{1 + i % 9}T10:00:00.000+0000",
        },
    )


SPECIAL = [
    ("HDFS-9001", "NPE while reporting blocks",
     "Stack trace: java.lang.NullPointerException at org.apache.hadoop.hdfs.server.namenode.FSNamesystem.getBlockLocations(FSNamesystem.java:1234)",
     {"issue_type": "Bug", "priority": "Critical", "status": "Open", "components": ["namenode"], "labels": [],
      "created": "2019-01-02T00:00:00.000+0000"}),
    ("HDFS-9002", "Web UI escapes <script> tags badly",
     "The page shows <script>alert(1)</script> when the replication column is empty.",
     {"issue_type": "Bug", "priority": "Minor", "status": "Open", "components": ["ui"], "labels": [],
      "created": "2019-01-03T00:00:00.000+0000"}),
    ("YARN-77", "ResourceManager memory accounting wrong", "Memory column is off by 1024 in the scheduler page.",
     {"issue_type": "Bug", "priority": "Major", "status": "Open", "components": ["yarn"], "labels": [],
      "created": "2019-01-04T00:00:00.000+0000"}),
    ("YARN-78", "ResourceManager memory accounting wrong", "Memory column is off by 1024 in the scheduler page.",
     {"issue_type": "Bug", "priority": "Major", "status": "Open", "components": ["yarn"], "labels": [],
      "created": "2019-01-05T00:00:00.000+0000"}),
]


@pytest.fixture
def corpus(user, tiny_model_dir):
    ds = Dataset.objects.create(owner=user, name="corpus")
    rows = [_doc(i) for i in range(30)] + SPECIAL
    Document.objects.bulk_create(
        [Document(dataset=ds, external_key=k, title=t, body=b, metadata=m) for k, t, b, m in rows]
    )
    refresh_search_vectors(dataset=ds)
    version = ModelVersion.objects.create(owner=user, name="tiny", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=ds)
    index = SearchIndex.objects.create(owner=user, dataset=ds, model_version=version)
    indexing.build_index(index=index)
    index.refresh_from_db()
    return index


def _keys(hits) -> list[str]:
    return [h.document.external_key for h in hits]


def test_identifier_inside_dotted_name_is_found_through_side_index(corpus):
    # The English parser keeps "java.lang.NullPointerException" as one token;
    # the 'simple' side index splits it, so the class name alone finds it.
    for query in ("NullPointerException", "FSNamesystem", "getBlockLocations"):
        result = hybrid.hybrid_search(index=corpus, query=query, mode="keyword", k=5)
        assert _keys(result.hits) == ["HDFS-9001"], query
        assert result.hits[0].identifier_match is True
        assert result.hits[0].keyword_rank == 1


def test_query_identifiers_splits_like_the_side_index():
    assert keyword.query_identifiers("NPE in java.lang.NullPointerException on HDFS-1234 with dfs.replication") == [
        "java.lang.NullPointerException", "HDFS-1234", "dfs.replication"
    ]
    assert keyword.query_identifiers("namenode fails to start") == []


def test_hybrid_without_identifier_match_marks_none(corpus):
    result = hybrid.hybrid_search(index=corpus, query="balancer replication", k=3)
    assert [h.identifier_match for h in result.hits] == [False, False, False]
    assert result.fusion == {"method": "rrf", "rrf_k": 60}


@pytest.mark.parametrize("mode", ["keyword", "vector", "hybrid"])
def test_filters_apply_to_every_mode_and_still_fill_k(corpus, mode):
    chosen = filters.SearchFilters.of(priority=("Blocker",), component=("yarn",))
    result = hybrid.hybrid_search(index=corpus, query="replication node restarts", mode=mode, k=5, filters=chosen)
    # 10 Blocker docs (i % 3 == 2) are all in component yarn (i % 3 == 2): k=5 is filled.
    assert len(result.hits) == 5
    assert {(h.document.metadata["priority"], tuple(h.document.metadata["components"])) for h in result.hits} == {
        ("Blocker", ("yarn",))
    }
    assert result.filters == {"priority": ["Blocker"], "component": ["yarn"]}


def test_vector_filter_keeping_few_rows_returns_all_of_them(corpus):
    # Label "newbie" keeps 6 of 34 rows; the iterative HNSW scan must find every one.
    chosen = filters.SearchFilters.of(label=("newbie",))
    result = hybrid.hybrid_search(index=corpus, query="replication", mode="vector", k=10, filters=chosen)
    assert sorted(_keys(result.hits)) == ["HDFS-100", "HDFS-105", "HDFS-110", "HDFS-115", "HDFS-120", "HDFS-125"]


def test_date_range_filter_is_inclusive(corpus):
    chosen = filters.SearchFilters.of(created_from=date(2019, 1, 3), created_to=date(2019, 1, 4))
    result = hybrid.hybrid_search(index=corpus, query="memory OR escapes", mode="keyword", k=10, filters=chosen)
    assert sorted(_keys(result.hits)) == ["HDFS-9002", "YARN-77"]


def test_filter_with_no_match_says_so(corpus):
    chosen = filters.SearchFilters.of(status=("Closed",))
    result = hybrid.hybrid_search(index=corpus, query="replication", mode="hybrid", k=10, filters=chosen)
    assert (result.hits, result.message) == ([], "No document matches this query with these filters.")


def test_pages_do_not_overlap_and_end(corpus):
    first = hybrid.hybrid_search(index=corpus, query="replication", mode="keyword", k=20, page=1)
    second = hybrid.hybrid_search(index=corpus, query="replication", mode="keyword", k=20, page=2)
    # 30 generated tickets + HDFS-9002 mention replication.
    assert (len(first.hits), first.has_more, len(second.hits), second.has_more) == (20, True, 11, False)
    assert not set(_keys(first.hits)) & set(_keys(second.hits))
    third = hybrid.hybrid_search(index=corpus, query="replication", mode="keyword", k=20, page=3)
    assert (third.hits, third.message) == ([], "No more results: this page is past the last one.")


def test_page_beyond_depth_is_refused(corpus):
    with pytest.raises(hybrid.SearchError, match="page: must be between 1 and 5 for k=100"):
        hybrid.hybrid_search(index=corpus, query="replication", k=100, page=6)


def test_snippet_highlights_matches_and_escapes_html(corpus):
    result = hybrid.hybrid_search(index=corpus, query="replication column", mode="keyword", k=1)
    assert _keys(result.hits) == ["HDFS-9002"]
    # PostgreSQL's parser drops the tag; anything else markup-like is escaped.
    assert result.hits[0].snippet_html == (
        "page shows alert(1) when the <mark>replication</mark> <mark>column</mark> is empty"
    )
    assert keyword.marked_html("a <b onclick=x> & \x02c\x03") == "a &lt;b onclick=x&gt; &amp; <mark>c</mark>"


def test_relaxes_to_all_but_one_word_when_no_document_has_all(corpus):
    result = hybrid.hybrid_search(index=corpus, query="memory column scheduler zebra", mode="keyword", k=5)
    assert sorted(_keys(result.hits)) == ["YARN-77", "YARN-78"]
    assert result.notice == "No document has all the words; showing documents with all but 1 of them."


def test_any_word_fallback_is_keyword_mode_only(corpus):
    result = hybrid.hybrid_search(index=corpus, query="scheduler zebra", mode="keyword", k=5)
    assert sorted(_keys(result.hits)) == ["YARN-77", "YARN-78"]
    assert result.notice == "No document has most of the words; showing documents with any of them."
    fused = hybrid.hybrid_search(index=corpus, query="scheduler zebra", mode="hybrid", k=5)
    # The vector side answers alone; no keyword rank anywhere.
    assert (len(fused.hits), fused.notice) == (5, "")
    assert [h.keyword_rank for h in fused.hits] == [None] * 5


def test_tsquery_literal_quotes_lexemes():
    assert keyword._tsquery_literal([["it's", "a\\b"], ["c"]]) == "('it''s' & 'a\\\\b') | ('c')"


def test_very_long_query_is_cut_with_notice(corpus):
    result = hybrid.hybrid_search(index=corpus, query="memory " * 400, mode="keyword", k=5)
    assert len(result.query) == hybrid.MAX_QUERY_CHARS
    assert result.notice == f"The query was cut to its first {hybrid.MAX_QUERY_CHARS} characters."
    assert sorted(_keys(result.hits)) == ["YARN-77", "YARN-78"]


def test_weighted_fusion_mode_uses_alpha(corpus):
    vector_only = hybrid.hybrid_search(index=corpus, query="replication stalls", mode="vector", k=5)
    weighted = hybrid.hybrid_search(index=corpus, query="replication stalls", fusion="weighted", alpha=1.0, k=5)
    assert weighted.fusion == {"method": "weighted", "alpha": 1.0}
    assert _keys(weighted.hits) == _keys(vector_only.hits)
    with pytest.raises(hybrid.SearchError, match="alpha: must be between 0 and 1, got 1.5"):
        hybrid.hybrid_search(index=corpus, query="x", fusion="weighted", alpha=1.5)


def test_weighted_score_fusion_exact_scores():
    fused = weighted_score_fusion([("a", 0.9), ("b", 0.5), ("c", 0.1)], [("b", 0.8), ("d", 0.6)], alpha=0.25)
    # keyword normalised: a 1, b 0.5, c 0; vector: b 1, d 0.
    assert fused == [("a", 0.75), ("b", 0.625), ("c", 0.0), ("d", 0.0)]


def test_similar_documents_vector_side_is_the_exact_cosine_order(corpus):
    """Similar tickets fuse both sides (tests/search/test_similar_served.py); their vector ranks are exact kNN."""
    document = Document.objects.get(dataset=corpus.dataset, external_key="YARN-77")
    hits = hybrid.similar_documents(index=corpus, document=document, k=10)
    vectors = dict(Embedding.objects.filter(model_version=corpus.model_version).values_list("document_id", "embedding"))
    query = np.asarray(vectors.pop(document.pk))
    exact = sorted(vectors, key=lambda d: -float(np.dot(query, np.asarray(vectors[d]))))
    for hit in hits:
        if hit.vector_rank is not None:
            assert exact[hit.vector_rank - 1] == hit.document.pk
    assert hits[0].document.external_key == "YARN-78"  # same text: first on both sides
    assert (hits[0].keyword_rank, hits[0].vector_rank) == (1, 1)
    assert hits[0].vector_similarity == pytest.approx(1.0, abs=1e-5)


def _scan(corpus, user, threshold):
    job = duplicates.start_duplicate_scan(index=corpus, owner=user, threshold=threshold)
    index_jobs.run(job_id=job.pk)
    job.refresh_from_db()
    return job


def test_duplicate_scan_finds_identical_pair_and_keeps_decisions(corpus, user):
    job = _scan(corpus, user, 0.999)
    assert (job.status, job.result["found"], job.attempt, job.progress) == ("succeeded", 1, 1, 1.0)
    pair = DuplicatePair.objects.get()
    assert sorted([pair.document_a.external_key, pair.document_b.external_key]) == ["YARN-77", "YARN-78"]
    duplicates.decide_duplicate(pair=pair, decision="duplicate", user=user)
    again = _scan(corpus, user, 0.999)
    # The reviewed pair is kept as decided, not re-added as pending.
    assert (again.status, again.result["found"]) == ("succeeded", 0)
    assert list(DuplicatePair.objects.values_list("decision", "decided_by__username")) == [("duplicate", "alice")]


def test_duplicate_scan_refuses_bad_threshold_and_double_start(corpus, user):
    with pytest.raises(hybrid.SearchError, match="threshold: must be at least 0.5 and below 1, got 1.0"):
        duplicates.start_duplicate_scan(index=corpus, owner=user, threshold=1.0)
    duplicates.start_duplicate_scan(index=corpus, owner=user, threshold=0.95)
    with pytest.raises(ConflictError, match="already queued or running"):
        duplicates.start_duplicate_scan(index=corpus, owner=user, threshold=0.95)


def test_duplicate_scan_of_a_killed_worker_is_resumed_by_the_reaper(corpus, user):
    # Given a scan whose worker died mid-scan (RUNNING, heartbeat long gone)
    job = duplicates.start_duplicate_scan(index=corpus, owner=user, threshold=0.999)
    IndexJob.objects.filter(pk=job.pk).update(status="running", attempt=1, phase="scanning",
                                              heartbeat_at=timezone.now() - timedelta(hours=1))
    # When the reaper runs, then it is queued again, and the next worker finishes it
    assert jobs.reap(IndexJob, timeout_s=300)["requeued"] == 1
    index_jobs.run(job_id=job.pk)
    job.refresh_from_db()
    assert (job.status, job.attempt, job.result["found"]) == ("succeeded", 2, 1)
    # And a rescan is possible again (nothing stays "running" forever)
    assert _scan(corpus, user, 0.999).status == "succeeded"


def test_stale_attempt_cannot_finish_or_write_after_it_was_reaped(corpus, user):
    job = duplicates.start_duplicate_scan(index=corpus, owner=user, threshold=0.999)
    stale = jobs.claim(IndexJob, job.pk)
    IndexJob.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    jobs.reap(IndexJob, timeout_s=300)
    live = jobs.claim(IndexJob, job.pk)
    assert (stale.number, live.number) == (1, 2)
    with pytest.raises(jobs.LostClaim):
        stale.update(result={"found": 999})
    assert stale.finish() is False
    assert live.finish(result={"found": 1}) is True
    job.refresh_from_db()
    assert (job.status, job.result) == ("succeeded", {"found": 1})


def test_build_records_untuned_fusion_without_validation_clusters(corpus):
    assert corpus.fusion == {
        "method": "rrf", "rrf_k": 60, "tuned": False,
        "reason": "The dataset has no duplicate clusters the model did not train on (outside the TEST split); RRF k=60 is used untuned.",
    }


def test_identifier_query_uses_the_side_index(corpus):
    from django.db import connection, transaction

    # The query's expression must be the migration's, byte for byte, or the index is never used.
    sql = (
        f"EXPLAIN SELECT d.id FROM training_document d WHERE {keyword.IDENTIFIER_TSVECTOR} @@ "
        "websearch_to_tsquery('simple'::regconfig, %s)"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(sql, ["fsnamesystem"])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "document_identifier_gin" in plan


def test_keyword_rank_cap_ranks_few_matches_exactly_and_bounds_common_words(corpus, settings):
    # "replication" is in 31 tickets (30 numbered ones and HDFS-9002); "NullPointerException" in one.
    settings.KEYWORD_RANK_CAP = 0
    every, _, _ = keyword.keyword_ranking(corpus.dataset, "replication", 50, filters.SearchFilters())
    rare, _, _ = keyword.keyword_ranking(corpus.dataset, "NullPointerException", 50, filters.SearchFilters())
    assert len(every) == 31 and len(rare) == 1
    settings.KEYWORD_RANK_CAP = 40  # more than the matches: the same ranking, scores and order
    assert keyword.keyword_ranking(corpus.dataset, "replication", 50, filters.SearchFilters())[0] == every
    settings.KEYWORD_RANK_CAP = 5  # fewer: at most max(cap, limit) matches are ranked, each a real match
    capped, _, _ = keyword.keyword_ranking(corpus.dataset, "replication", 3, filters.SearchFilters())
    assert len(capped) == 3 and set(capped) <= set(every)
    wider, _, _ = keyword.keyword_ranking(corpus.dataset, "replication", 10, filters.SearchFilters())
    assert len(wider) == 10 and set(wider) <= set(every)  # the cap never returns fewer than asked for
    assert keyword.keyword_ranking(corpus.dataset, "NullPointerException", 50, filters.SearchFilters())[0] == rare
    # The identifier side index is capped the same way.
    ids, by_identifier, _ = keyword.keyword_ranking(corpus.dataset, "FSNamesystem", 2, filters.SearchFilters())
    assert len(by_identifier) == 1 and len(ids) == 1
