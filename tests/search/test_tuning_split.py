"""Fusion is tuned on clusters the model never trained on (issue #15): real runs, real index, real tuning."""

from __future__ import annotations

import pytest

from search import indexing, tuning
from search.models import SearchIndex
from training import datasets, pairs, runs
from training.datasets import dataset_tickets
from training.models import TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)

TINY = {"max_steps": 2, "batch_size": 8, "max_seq_length": 32}


def _clusters_by_split(dataset, seed: int) -> dict[str, set[str]]:
    """Independently of the code under test: the keys of the train / validation / test clusters for a seed."""
    out: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    for cluster in pairs.duplicate_clusters(dataset_tickets(dataset)):
        out[pairs.ticket_cluster_split(cluster, seed=seed)].update(cluster)
    return out


def _index_of(run: TrainingRun) -> SearchIndex:
    index, _ = SearchIndex.objects.get_or_create(dataset=run.dataset, model_version=run.model_version,
                                                 defaults={"owner": run.owner})
    return indexing.build_index(index=index) if index.status != SearchIndex.Status.READY else index


def _run(user, dataset, base_model: str, **hyper) -> TrainingRun:
    run = runs.start_run(owner=user, dataset=dataset, base_model=base_model, hyperparameters={**TINY, **hyper},
                         enqueue=False)
    run = runs.execute_run(run=run, device="cpu")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    return run


@pytest.fixture
def slice_dataset(user, small_jira_file):
    return datasets.import_dataset(owner=user, name="slice", kind="tickets", path=small_jira_file,
                                   filename=small_jira_file.name)


def test_tuning_queries_never_come_from_trained_clusters(web, user, slice_dataset, tiny_model_dir):
    # Given a real default-strategy run on a real Hadoop slice
    run = _run(user, slice_dataset, str(tiny_model_dir))
    split = _clusters_by_split(slice_dataset, seed=42)
    trained = split["train"]
    assert trained and set(run.metrics["training_split"]["trained_keys"]) == trained
    # When its index is built and tuned (what the product does after a build)
    index = _index_of(run)
    fusion = tuning.tune_fusion(index=index)
    # Then no tuning query belongs to a cluster whose pairs were trained on, none is a TEST query,
    # and every one is a validation cluster's ticket (what the run held out from training)
    assert fusion["tuned"] is True and fusion["queries"] == len(fusion["query_keys"]) > 0
    assert set(fusion["query_keys"]) == split["validation"]
    assert not set(fusion["query_keys"]) & (trained | split["test"])
    assert fusion["trained_on"] == f"run #{run.pk}"
    # And the run page's `served` row is exactly what the index serves on the TEST queries
    report = tuning.evaluate_search(index=index, max_queries=None)
    assert run.evaluation["systems"]["served"] == report["systems"]["served"]
    assert run.evaluation["served_fusion"]["query_keys"] == fusion["query_keys"]
    assert {k: run.evaluation["served_fusion"][k] for k in ("method", "rrf_k", "alpha", "prior") if k in fusion} == {
        k: fusion[k] for k in ("method", "rrf_k", "alpha", "prior") if k in fusion}
    # And the ticket prior both carry was learned on the TRAIN clusters (keyword side alone)
    assert run.evaluation["served_fusion"]["learned_prior"] == fusion["learned_prior"]
    assert fusion["learned_prior"]["queries"] == len(split["train"] | split["validation"])
    # And the run page shows the served row and what it was tuned on
    html = web.get(f"/runs/{run.pk}/").content.decode()
    assert "<td>served: fine-tuned model with its index&#x27;s tuned fusion (what similar tickets show)</td>" in html
    assert f"on {fusion['queries']} queries of the validation: TRAIN duplicate clusters none of" in html
    assert ", ".join(fusion["query_keys"]) in html


def test_continued_model_is_not_tuned_on_its_parents_training_clusters(user, slice_dataset, tiny_model_dir):
    # Given a model trained with seed 1, then continued with a seed whose validation share holds both
    # clusters the parent trained on and clusters it did not (the first such seed: the test needs both)
    first = _clusters_by_split(slice_dataset, seed=1)
    seed = next(s for s in range(2, 500) if (v := _clusters_by_split(slice_dataset, seed=s)["validation"])
                & first["train"] and v - first["train"])
    expected = _clusters_by_split(slice_dataset, seed=seed)["validation"] - first["train"]
    parent = _run(user, slice_dataset, str(tiny_model_dir), seed=1)
    child = _run(user, slice_dataset, f"version:{parent.model_version.pk}", seed=seed)
    # When the child's index is tuned
    fusion = tuning.tune_fusion(index=_index_of(child))
    # Then the tuning queries are the child's validation clusters minus those its parent trained on
    assert set(fusion["query_keys"]) == expected
    assert child.evaluation["served_fusion"]["query_keys"] == fusion["query_keys"]
    assert fusion["trained_on"] == f"run #{child.pk}, run #{parent.pk}"
