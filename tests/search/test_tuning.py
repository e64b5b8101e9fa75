"""Fusion tuned on the validation split (TRAIN clusters) and the search evaluation page (TEST clusters)."""

from __future__ import annotations

import pytest

from search import hybrid, index_jobs, indexing, tuning
from training import evaluation
from search.models import IndexJob, SearchIndex
from training import datasets, priors
from training.fusion import PRIOR_SCALES, with_prior
from training.models import ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slice_index(user, tiny_model_dir, small_jira_file):
    ds = datasets.import_dataset(owner=user, name="slice", kind="tickets", path=small_jira_file,
                                 filename=small_jira_file.name)
    version = ModelVersion.objects.create(owner=user, name="tiny", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=ds)
    index = SearchIndex.objects.create(owner=user, dataset=ds, model_version=version)
    return indexing.build_index(index=index)


def test_build_tunes_fusion_on_train_clusters_only(slice_index):
    fusion = slice_index.fusion
    train = evaluation.ticket_eval_set(dataset=slice_index.dataset, split="train")
    test = evaluation.ticket_eval_set(dataset=slice_index.dataset, split="test")
    assert train.queries and test.queries and not set(train.queries) & set(test.queries)
    # A version with no training run behind it: the default run's validation share is what it never saw.
    tuning_set = evaluation.ticket_eval_set(dataset=slice_index.dataset, split="tuning",
                                            trained_keys=evaluation.trained_keys(slice_index.model_version)[0])
    assert tuning_set.queries and set(tuning_set.queries) < set(train.queries)
    assert (fusion["tuned"], fusion["queries"], fusion["split"]) == (
        True, len(tuning_set.queries), "validation: TRAIN duplicate clusters none of whose tickets the model trained on"
    )
    assert fusion["query_keys"] == sorted(tuning_set.keys[q] for q in tuning_set.queries)
    # Each fusion candidate, and each again with the ticket prior learned on the TRAIN clusters at each scale
    learned = fusion["learned_prior"]
    assert learned == evaluation.learn_prior(dataset=slice_index.dataset)
    assert priors.is_active(learned), "the Hadoop slice's duplicates share filing times or components"
    plain = list(tuning.FUSION_CANDIDATES)
    candidates = {tuning._fusion_name(f) for f in plain} | {
        tuning._fusion_name(with_prior(f, learned, scale)) for f in plain for scale in PRIOR_SCALES}
    assert set(fusion["systems"]) == candidates | {"keyword", "vector"}
    best = max(fusion["systems"][name]["ndcg@10"] for name in candidates)
    chosen = tuning._fusion_name({k: fusion[k] for k in ("method", "rrf_k", "alpha", "prior") if k in fusion})
    assert fusion["systems"][chosen]["ndcg@10"] == best
    # The search default follows the tuned fusion.
    assert hybrid.resolve_fusion(index=slice_index) == {
        k: fusion[k] for k in ("method", "rrf_k", "alpha", "prior") if k in fusion
    }


def test_evaluate_search_runs_test_queries_through_three_systems(slice_index):
    report = tuning.evaluate_search(index=slice_index, max_queries=None)
    test = evaluation.ticket_eval_set(dataset=slice_index.dataset, split="test")
    assert report["queries"] == len(test.queries)
    assert list(report["systems"]) == ["keyword", "vector", "served"]
    assert report["fusion"] == hybrid.resolve_fusion(index=slice_index)
    # The keyword row is BM25 (the DATA.md keyword baseline, the lead's bm25_rankings) on the same queries.
    plain = evaluation.evaluate(evaluation.bm25_rankings(dataset=slice_index.dataset, eval_set=test), test)
    assert report["systems"]["keyword"] == plain.summary()


def _run_latest_job():
    job = IndexJob.objects.latest("id")
    index_jobs.run(job_id=job.pk)
    job.refresh_from_db()
    return job


def test_evaluation_page_shows_metric_table(web, slice_index):
    # Given an evaluation started from the page (a job), when a worker runs it
    response = web.post(f"/search/evaluate/{slice_index.pk}/run", {"queries": "5"})
    job = _run_latest_job()
    assert (response.status_code, response["Location"]) == (302, f"/search/jobs/{job.pk}/")
    assert (job.kind, job.status, job.result["queries"]) == ("evaluation", "succeeded", 5)
    # Then the job page links the result and the evaluation page shows the stored table (no recomputation)
    assert "See the table" in web.get(f"/search/jobs/{job.pk}/").content.decode()
    html = web.get(f"/search/evaluate/{slice_index.pk}").content.decode()
    assert "5 held-out queries" in html
    for system in ("keyword", "vector", "served"):
        assert f"<tr><td>{system}</td>" in html
    assert "Tuned by ndcg@10 on " in html and "queries of the validation: TRAIN duplicate clusters none of" in html


def test_evaluation_page_rejects_bad_query_count(web, slice_index):
    response = web.post(f"/search/evaluate/{slice_index.pk}/run", {"queries": "lots"})
    assert response.status_code == 400
    assert IndexJob.objects.count() == 0
    assert "queries: give a number of held-out queries between 1 and 5000." in response.content.decode()


def test_tune_page_action_records_fusion(web, slice_index):
    SearchIndex.objects.filter(pk=slice_index.pk).update(fusion={})
    response = web.post(f"/search/tune/{slice_index.pk}")
    job = _run_latest_job()
    assert (response.status_code, job.kind, job.status) == (302, "tuning", "succeeded")
    slice_index.refresh_from_db()
    assert job.result == slice_index.fusion
    assert slice_index.fusion["tuned"] is True
