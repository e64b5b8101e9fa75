"""Similar tickets serve what the held-out evaluation measures (#15): BM25 (title weighted) fused with the vectors.

The evaluation's `served` row and the index's tuning replay query-by-ticket
through training.evaluation (BM25 matrices over every document, exact kNN);
the similar-tickets page answers from PostgreSQL (stored lexeme
frequencies, HNSW). These tests hold the two to the same rankings.
"""

from __future__ import annotations

import json

import pytest

from search import hybrid, indexing
from search.filters import SearchFilters
from search.keyword import ticket_keyword_ranking
from search.models import SearchIndex
from search.tuning import index_embeddings
from training import bm25, datasets
from training import evaluation as ev
from training.models import Document, LexemeFrequency, ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)

TOPICS = [
    ("NameNode", "fails to start after upgrade", "fsimage load throws IOException during startup"),
    ("DataNode", "volume failure is not reported", "disk errors on one volume keep the node alive"),
    ("Balancer", "moves blocks too slowly", "bandwidth setting ignored when the cluster is busy"),
    ("ResourceManager", "leaks memory in the scheduler", "container allocations are never released"),
    ("Client", "retries forever on timeout", "the socket timeout setting is not honoured by the retry loop"),
]


# Lexemes with quotes, backslashes and tsquery operators travel as bound data; an empty ticket has no terms.
ODD = [
    {"key": "ODD-1", "fields": {"summary": "Can't open 'C:\\tmp\\x' & a|b !c <d> :* (e)",
                                "description": "it''s O'Brien's back\\slash namenode ''quoted'' 'fsimage' & | !"}},
    {"key": "ODD-2", "fields": {"summary": "...", "description": ""}},
]


def _issues(count: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + count):
        component, problem, detail = TOPICS[i % len(TOPICS)]
        title = f"{component} {problem}" + (" again" if i % 3 == 0 else "")
        body = f"{detail}. Seen on node{i % 4} with release 2.{i % 7}; namenode logs attached ({i})."
        out.append({"key": f"{'HDFS' if i % 2 else 'HADOOP'}-{1000 + i}", "fields": {
            "summary": title, "description": body, "components": [component] if i % 4 else [],
            "created": f"{2010 + i % 5}-{1 + i % 12:02d}-{1 + i % 27:02d}T08:00:00.000+0000" if i % 6 else ""}})
    return out


def _import(user, tmp_path, issues, name="served"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(issues))
    return datasets.import_dataset(owner=user, name=name, kind="tickets", path=path, filename=path.name)


def _all_queries(dataset):
    eval_set = ev.ticket_eval_set(dataset=dataset, split="test")
    eval_set.queries = list(eval_set.doc_ids)
    return eval_set


def test_candidate_lexemes_take_the_rarest_within_the_cap():
    frequencies = {"common": 50, "rare": 3, "only-me": 1, "also-rare": 3, "middle": 10}
    assert bm25.candidate_lexemes(frequencies, cap=6) == ["also-rare", "rare"]  # ties by lexeme; 3 + 3 <= 6
    assert bm25.candidate_lexemes(frequencies, cap=16) == ["also-rare", "rare", "middle"]
    assert bm25.candidate_lexemes(frequencies, cap=1000) == ["also-rare", "rare", "middle", "common"]
    assert bm25.candidate_lexemes(frequencies, cap=2) == []  # even the rarest usable one is over the cap
    assert bm25.candidate_lexemes({"only-me": 1}, cap=1000) == []


def test_field_counts_split_title_and_body_positions():
    assert bm25.field_counts("'crash':1A,7B 'namenod':2A 'log':9B,12B,15 'it''s':4B") == {
        "crash": (1, 1), "namenod": (1, 0), "log": (0, 3), "it's": (0, 1)}
    assert bm25.query_terms("'crash':1A,7B 'log':9B") == {"crash": 2.0, "log": 1.0}


def test_statistics_follow_every_import(user, tmp_path):
    dataset = _import(user, tmp_path, _issues(20))
    dataset.refresh_from_db()
    matrices = ev.bm25_matrices(dataset)
    stored = dict(LexemeFrequency.objects.filter(dataset=dataset).values_list("lexeme", "documents"))
    assert stored == {lexeme: int(f) for lexeme, f in zip(matrices.vocabulary, matrices.frequencies)}
    lengths = matrices.term_weights.shape[0]
    assert dataset.bm25_documents == lengths == 20
    # A second export adds five tickets and changes one: the statistics are rewritten with the documents.
    changed = _issues(1)[0]
    changed["fields"]["summary"] = "Zookeeper quorum lost"
    path = tmp_path / "v2.json"
    path.write_text(json.dumps([changed, *_issues(5, start=20)]))
    datasets.add_version(dataset=dataset, path=path, filename=path.name)
    dataset.refresh_from_db()
    assert dataset.bm25_documents == 25
    stored = dict(LexemeFrequency.objects.filter(dataset=dataset).values_list("lexeme", "documents"))
    assert stored["zookeep"] == 1
    # Every document's stored length (the changed one and the new ones recomputed) is its title-weighted count.
    for vector, length in Document.objects.filter(dataset=dataset).values_list("search_vector", "bm25_length"):
        assert length == sum(bm25.document_tf(t, o) for t, o in bm25.field_counts(str(vector)).values())
    assert dataset.bm25_average_length == pytest.approx(
        sum(Document.objects.filter(dataset=dataset).values_list("bm25_length", flat=True)) / 25)
    assert stored == {lexeme: int(f) for lexeme, f in zip(*(lambda m: (m.vocabulary, m.frequencies))(
        ev.bm25_matrices(dataset)))}


@pytest.mark.parametrize("cap", [1_000_000, 12])
def test_ticket_keyword_ranking_is_the_evaluations_bm25(user, tmp_path, settings, cap):
    settings.BM25_CANDIDATES = cap  # 12: most tickets' common lexemes are left out of their candidates
    dataset = _import(user, tmp_path, _issues(40) + ODD)
    dataset.refresh_from_db()
    eval_set = _all_queries(dataset)
    expected = ev.bm25_scored_rankings(dataset=dataset, eval_set=eval_set)
    exact = ev.bm25_scored_rankings(dataset=dataset, eval_set=eval_set,
                                    matrices=ev.bm25_matrices(dataset, candidate_cap=10**9))
    left_out = 0
    for document in Document.objects.filter(dataset=dataset).select_related("dataset"):
        served = ticket_keyword_ranking(document, ev.RANK_DEPTH, SearchFilters())
        want = expected[document.pk]
        # The same documents with the same scores in the same order; float32 matrices against float64 SQL may
        # only swap documents whose scores are equal to within 1e-4.
        assert {d for d, _ in served} == {d for d, _ in want}, document.external_key
        assert [s for _, s in served] == pytest.approx([s for _, s in want], rel=1e-4)
        assert dict(served) == pytest.approx(dict(want), rel=1e-4)
        swapped = [i for i, (a, b) in enumerate(zip(served, want)) if a[0] != b[0]]
        assert all(abs(served[i][1] - want[i][1]) <= 1e-4 * want[i][1] for i in swapped)
        left_out += len(want) < len(exact[document.pk])
    assert (left_out > 0) == (cap == 12)
    odd = Document.objects.select_related("dataset").get(dataset=dataset, external_key="ODD-1")
    assert ticket_keyword_ranking(odd, 10, SearchFilters())  # shares "namenode" and "fsimage" with others
    empty = Document.objects.select_related("dataset").get(dataset=dataset, external_key="ODD-2")
    assert ticket_keyword_ranking(empty, 10, SearchFilters()) == expected[empty.pk] == []


PRIOR = {"filed": 1.2, "component": 0.2, "project": 0.3}


@pytest.mark.parametrize("fusion", [None, {"method": "weighted", "alpha": 0.7}, {"method": "rrf", "rrf_k": 20},
                                    {"method": "weighted", "alpha": 0.6, "prior": PRIOR},
                                    {"method": "rrf", "rrf_k": 60, "prior": PRIOR}])
def test_similar_tickets_serve_the_fusion_the_evaluation_measures(user, tmp_path, tiny_model_dir, fusion):
    dataset = _import(user, tmp_path, _issues(30))
    version = ModelVersion.objects.create(owner=user, name="tiny", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=dataset)
    index = indexing.build_index(index=SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version))
    assert index.status == SearchIndex.Status.READY
    if fusion:
        SearchIndex.objects.filter(pk=index.pk).update(fusion={**fusion, "tuned": True})
        index.refresh_from_db()
    eval_set = _all_queries(dataset)
    keyword = ev.bm25_scored_rankings(dataset=dataset, eval_set=eval_set)
    vector = ev.vector_scored_rankings(embeddings=index_embeddings(eval_set=eval_set, model_version_id=version.pk),
                                       eval_set=eval_set)
    measured = ev.fused_rankings(keyword, vector, fusion=hybrid.resolve_fusion(index=index), eval_set=eval_set)
    without_prior = ev.fused_rankings(keyword, vector, fusion={k: v for k, v in (fusion or {"method": "rrf", "rrf_k": 60}).items()
                                                               if k != "prior"})
    reordered = 0
    for document in Document.objects.filter(dataset=dataset).select_related("dataset"):
        hits = hybrid.similar_documents(index=index, document=document, k=10)
        assert [h.document.pk for h in hits] == measured[document.pk][:10], document.external_key
        assert document.pk not in [h.document.pk for h in hits]
        assert all(h.keyword_rank is not None or h.vector_rank is not None for h in hits)
        reordered += measured[document.pk][:10] != without_prior[document.pk][:10]
        if fusion and "prior" in fusion:
            # Each hit says why the prior placed it: days apart (None where either date is missing), shared
            # components, same project
            for hit in hits:
                other = hit.document
                assert hit.prior["same_project"] == (other.external_key.split("-")[0]
                                                     == document.external_key.split("-")[0])
                assert (hit.prior["days_apart"] is None) == (not other.metadata["created"]
                                                             or not document.metadata["created"])
                assert hit.prior["shared_components"] == sorted(
                    {c.lower() for c in other.metadata["components"]} & {c.lower() for c in document.metadata["components"]})
        else:
            assert all(hit.prior is None for hit in hits)
    assert (reordered > 0) == bool(fusion and "prior" in fusion)
