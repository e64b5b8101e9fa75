"""The keyword side of query-by-ticket search (training/bm25.py): its weights chosen on TRAIN, reported on TEST.

Imports a Jira JSON export through the product, then ranks with the
product's own BM25 (training.evaluation.bm25_scored_rankings over the stored
tsvectors) under each title weighting: a title occurrence counting
`title` times in a document, a query lexeme from the query ticket's title
weighing `query` times. The ../shared/DATA.md TRAIN clusters choose (no
model is involved, so every TRAIN cluster is fair to choose on); the TEST
clusters only report. Then the candidate cap (EMBEDPORTAL_BM25_CANDIDATES)
at the product's weights: how much of exact BM25's nDCG@10 each cap keeps.
Last, the ticket prior (training.priors): its weights learned on the TRAIN
clusters (training.evaluation.learn_prior), the keyword side re-ranked with
it on TEST. Targets: the product's weights are TRAIN's choice (within 0.002
of the best TRAIN figure) and beat plain BM25 on TEST; the default cap keeps
TEST nDCG@10 within 0.005 of scoring every document; the prior does not
lower TEST nDCG@10.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.harness import SHARED_DATA, emit, setup_django, summary

DEFAULT_DATA = SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz"
WEIGHTS = (1, 2, 3, 5)
CAPS = (500, 1000, 2000, 5000, 0)  # 0: every document holding a query lexeme
ALL = 10**9


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench keyword")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    setup_django()
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from training import bm25, datasets, priors
    from training import evaluation as ev

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    started = time.perf_counter()
    dataset = datasets.import_dataset(owner=owner, name=args.data.name, kind="tickets", path=args.data,
                                      filename=args.data.name)
    splits = {name: ev.ticket_eval_set(dataset=dataset, split=name) for name in ("train", "test")}
    product = (bm25.TITLE_WEIGHT, bm25.QUERY_TITLE_WEIGHT)

    def ndcg(split: str, matrices) -> float:
        rankings = ev.bm25_rankings(dataset=dataset, eval_set=splits[split], matrices=matrices)
        return ev.evaluate(rankings, splits[split]).summary()["ndcg@10"]

    grid = {}
    try:
        for title in WEIGHTS:
            for query in WEIGHTS[:3]:
                bm25.TITLE_WEIGHT, bm25.QUERY_TITLE_WEIGHT = title, query
                matrices = ev.bm25_matrices(dataset, candidate_cap=ALL)
                grid[(title, query)] = {split: ndcg(split, matrices) for split in splits}
                emit({"title_weight": title, "query_title_weight": query, "train_ndcg@10": grid[(title, query)]["train"],
                      "test_ndcg@10": grid[(title, query)]["test"], "candidates": "all"})
    finally:
        bm25.TITLE_WEIGHT, bm25.QUERY_TITLE_WEIGHT = product
    chosen = max(grid, key=lambda weights: grid[weights]["train"])
    caps = {}
    matrices = ev.bm25_matrices(dataset)
    for cap in CAPS:
        matrices.candidate_cap = cap or ALL
        caps[cap] = ndcg("test", matrices)
        emit({"title_weight": product[0], "query_title_weight": product[1], "candidates": cap or "all",
              "test_ndcg@10": caps[cap]})
    default_cap = settings.BM25_CANDIDATES
    if default_cap not in caps:
        matrices.candidate_cap = default_cap
        caps[default_cap] = ndcg("test", matrices)
    # The ticket prior (training.priors): weights learned on TRAIN with this keyword side, applied on TEST.
    matrices.candidate_cap = default_cap
    learned = ev.learn_prior(dataset=dataset, matrices=matrices)
    test = splits["test"]
    scored = ev.bm25_scored_rankings(dataset=dataset, eval_set=test, matrices=matrices)
    with_prior = {}
    for query, ranked in scored.items():
        values = [priors.prior(test.facts[query], test.facts[doc], learned or {}) for doc, _ in ranked]
        with_prior[query] = [doc for doc, _ in priors.rerank(ranked, values)]
    prior_test = ev.evaluate(with_prior, test).summary()["ndcg@10"]
    emit({"prior": {k: (learned or {}).get(k) for k in priors.FEATURES}, "learned_on_train_queries":
          (learned or {}).get("queries"), "train_ndcg@10": (learned or {}).get("with_prior_ndcg"),
          "test_ndcg@10": prior_test, "candidates": default_cap})
    figures = {
        "documents": dataset.documents.count(),
        "train_queries": len(splits["train"].queries),
        "test_queries": len(splits["test"].queries),
        "plain_bm25_train_ndcg@10": grid[(1, 1)]["train"],
        "plain_bm25_test_ndcg@10": grid[(1, 1)]["test"],
        "train_choice": f"title {chosen[0]}, query title {chosen[1]}",
        "product_weights": f"title {product[0]}, query title {product[1]}",
        "product_train_ndcg@10": grid[product]["train"],
        "product_test_ndcg@10": grid[product]["test"],
        "product_minus_train_best_ndcg@10": round(grid[product]["train"] - grid[chosen]["train"], 4),
        "product_minus_plain_test_ndcg@10": round(grid[product]["test"] - grid[(1, 1)]["test"], 4),
        "default_candidates": default_cap,
        "default_cap_test_ndcg@10": caps[default_cap],
        "default_cap_minus_all_test_ndcg@10": round(caps[default_cap] - caps[0], 4),
        "prior_weights": priors.describe(learned),
        "keyword_plus_prior_test_ndcg@10": prior_test,
        "prior_minus_keyword_test_ndcg@10": round(prior_test - caps[default_cap], 4),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    return summary("keyword", figures, {
        "product_minus_train_best_ndcg@10": ">= -0.002",
        "product_minus_plain_test_ndcg@10": "> 0",
        "default_cap_minus_all_test_ndcg@10": ">= -0.005",
        "prior_minus_keyword_test_ndcg@10": ">= 0",
    })
