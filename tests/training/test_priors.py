"""The ticket prior (training.priors, #15): its fields, its fusion, and weights learned on TRAIN clusters only."""

from __future__ import annotations

import json
import random

import pytest

from training import datasets, priors
from training import evaluation as ev
from training.fusion import fuse_scored, fusion_name, with_prior
from training.pairs import duplicate_clusters, split_clusters
from training.datasets import dataset_tickets


@pytest.mark.parametrize("value, expected", [
    ("2013-05-02T10:11:12.000+0000", 15827.424444),
    ("2013-05-02T10:11:12", 15827.424444),
    ("2013-05-02", 15827.0),
    ("2013-05-02T10:11:12+02:00", 15827.341111),
])
def test_filing_days_read_jira_and_iso_dates(value, expected):
    assert priors.parse_day(value) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("value", [None, "", "yesterday", "2013-13-45", "9" * 10_000, 20130502, ["2013-05-02"],
                                   {"date": "2013-05-02"}, "30/Sep/21 17:20", "\x00" * 12, True])
def test_unreadable_dates_are_unknown_not_errors(value):
    assert priors.parse_day(value) is None


@pytest.mark.parametrize("metadata", [None, [], "text", {"components": "HDFS"}, {"components": [1, None, {"a": 1}]},
                                      {"created": 5, "components": ["", "  "]}, {"components": ["x"] * 100_000}])
def test_odd_metadata_gives_facts_without_errors(metadata):
    facts = priors.facts("HDFS-1", metadata)
    assert facts.project == "HDFS"
    assert len(facts.components) <= 1
    assert priors.prior(facts, facts, {"filed": 1, "component": 1, "project": 1}) >= 1.0


def test_features_and_prior():
    a = priors.facts("HDFS-10", {"created": "2014-01-01T00:00:00.000+0000", "components": ["NameNode", "hdfs-client"]})
    same_day = priors.facts("HDFS-11", {"created": "2014-01-01T12:00:00.000+0000", "components": ["namenode"]})
    years = priors.facts("YARN-3", {"created": "2024-06-01", "components": ["RM"]})
    unknown = priors.facts("12345", {})
    assert priors.features(a, same_day) == (pytest.approx(1 - 0.405465 / 8.202756, abs=1e-5), 1.0, 1.0)
    assert priors.features(a, years) == (0.0, 0.0, 0.0)  # more than FILED_HORIZON_DAYS apart
    assert priors.features(a, unknown) == (0.0, 0.0, 0.0)
    assert priors.features(unknown, unknown) == (0.0, 0.0, 0.0)  # no project on either side is no match
    weights = {"filed": 1.2, "component": 0.1, "project": 0.3}
    assert priors.prior(a, same_day, weights) == pytest.approx(1.2 * priors.closeness(a, same_day) + 0.4)
    assert priors.describe(weights) == "filed 1.2, component 0.1, project 0.3"
    assert priors.describe({"filed": 0.0}) == "none" and not priors.is_active(None)


def test_fusion_with_prior_reorders_only_for_a_ticket_query():
    keyword = [("far", 10.0), ("near", 9.5), ("other", 1.0)]
    vector = [("far", 0.90), ("near", 0.89)]
    query = priors.facts("HDFS-1", {"created": "2015-03-01"})
    facts = {"far": priors.facts("HDFS-2", {"created": "2009-01-01"}),
             "near": priors.facts("HDFS-3", {"created": "2015-03-02"})}
    fusion = with_prior({"method": "weighted", "alpha": 0.5}, {"filed": 1.2, "component": 0.1, "project": 0.3}, 1.0)
    assert fusion["prior"] == {"filed": 1.2, "component": 0.1, "project": 0.3}
    assert fusion_name(fusion) == "weighted alpha=0.5 + prior (filed 1.2, component 0.1, project 0.3)"
    assert [d for d, _ in fuse_scored(keyword, vector, fusion=fusion)] == ["far", "near", "other"]
    ranked = fuse_scored(keyword, vector, fusion=fusion, query_facts=query, facts=facts)
    assert [d for d, _ in ranked] == ["near", "far", "other"]
    # A candidate without facts gets no prior; RRF fusions take the prior the same way
    rrf = with_prior({"method": "rrf", "rrf_k": 60}, {"filed": 1.2}, 1.0)
    assert [d for d, _ in fuse_scored(keyword, vector, fusion=rrf, query_facts=query, facts={})] == [
        "far", "near", "other"]
    assert [d for d, _ in fuse_scored(keyword, vector, fusion=rrf, query_facts=query, facts=facts)][0] == "near"


# --- learned on the dataset's own TRAIN clusters -------------------------------------------------------

WORDS = ["disk", "quota", "lease", "socket", "replica", "token", "block", "journal", "audit", "cache",
         "codec", "shuffle", "reducer", "mapper", "scheduler", "queue", "container", "heartbeat"]


def _issues(*, dated: bool, seed: int = 7) -> list[dict]:
    """60 duplicate pairs whose two tickets share some words with many others; a pair is filed on one day when dated.

    Every ticket also shares words with unrelated tickets, so the text alone ranks duplicates imperfectly and
    the filing date is what separates them.
    """
    rng = random.Random(seed)
    issues = []
    for pair in range(60):
        words = rng.sample(WORDS, 3)
        day = rng.randrange(0, 3000)
        for member in range(2):
            key = f"HDFS-{pair * 2 + member + 1}"
            other = f"HDFS-{pair * 2 + (1 - member) + 1}"
            created = (f"{2008 + day // 365}-{1 + day % 365 // 31:02d}-{1 + day % 28:02d}T10:00:00.000+0000"
                       if dated else "")
            issues.append({"key": key, "fields": {
                "summary": f"{words[0]} {rng.choice(WORDS)} problem",
                "description": f"{words[1]} {words[2]} {rng.choice(WORDS)} {rng.choice(WORDS)}",
                "created": created,
                "issuelinks": [{"type": {"name": "Duplicate"}, "outwardIssue": {"key": other}}] if member == 0 else [],
            }})
    return issues


def _import(user, tmp_path, issues, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"issues": issues}))
    return datasets.import_dataset(owner=user, name=name, kind="tickets", path=path, filename=path.name)


@pytest.mark.django_db(transaction=True)
def test_prior_is_learned_when_duplicates_are_filed_together(user, tmp_path):
    dated = _import(user, tmp_path, _issues(dated=True), "dated")
    learned = ev.learn_prior(dataset=dated)
    assert learned["filed"] > 0 and learned["with_prior_ndcg"] > learned["keyword_ndcg"]
    train, test = split_clusters(duplicate_clusters(dataset_tickets(dated)))
    assert learned["queries"] == sum(len(c) for c in train)  # every TRAIN-cluster ticket, no TEST one
    undated = _import(user, tmp_path, _issues(dated=False), "undated")
    learned = ev.learn_prior(dataset=undated)
    assert learned["filed"] == 0 and learned["with_prior_ndcg"] == learned["keyword_ndcg"]


@pytest.mark.django_db(transaction=True)
def test_test_clusters_never_reach_the_learned_prior(user, tmp_path):
    # Given two datasets that differ only in the filing dates of their TEST clusters' tickets
    issues = _issues(dated=True)
    first = _import(user, tmp_path, issues, "first")
    _, test = split_clusters(duplicate_clusters(dataset_tickets(first)))
    test_keys = {key for cluster in test for key in cluster}
    assert test_keys
    moved = [{**i, "fields": {**i["fields"], "created": "2001-01-01T00:00:00.000+0000"}} if i["key"] in test_keys
             else i for i in issues]
    second = _import(user, tmp_path, moved, "second")
    # Then the learned weights and their figures are the same
    assert ev.learn_prior(dataset=first) == ev.learn_prior(dataset=second)


@pytest.mark.django_db(transaction=True)
def test_choose_fusion_takes_the_prior_only_where_it_scores(user, tmp_path):
    dataset = _import(user, tmp_path, _issues(dated=True), "choose")
    eval_set = ev.ticket_eval_set(dataset=dataset, split="train")
    keyword = ev.bm25_scored_rankings(dataset=dataset, eval_set=eval_set)
    learned = ev.learn_prior(dataset=dataset)
    fusion, table = ev.choose_fusion(keyword, keyword, eval_set=eval_set, prior=learned)
    assert priors.is_active(fusion.get("prior"))
    assert table[fusion_name(fusion)]["ndcg@10"] > table["rrf k=60"]["ndcg@10"]
    # Without a learned prior, or without facts (a Q&A set), only the plain fusions are tried
    plain, table = ev.choose_fusion(keyword, keyword, eval_set=eval_set, prior=None)
    assert "prior" not in plain and not any("prior" in name for name in table)
    eval_set.facts = {}
    plain, _ = ev.choose_fusion(keyword, keyword, eval_set=eval_set, prior=learned)
    assert "prior" not in plain
