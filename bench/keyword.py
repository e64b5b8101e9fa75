"""The keyword side of query-by-ticket search (training/bm25.py): its weights chosen on TRAIN, reported on TEST.

Imports a Jira JSON export through the product, then ranks with the
product's own BM25 (training.evaluation.bm25_scored_rankings over the stored
tsvectors) under each title weighting: a title occurrence counting
`title` times in a document, a query lexeme from the query ticket's title
weighing `query` times. The ../shared/DATA.md TRAIN clusters choose (no
model is involved, so every TRAIN cluster is fair to choose on); the TEST
clusters only report. Then the candidate cap (EMBEDPORTAL_BM25_CANDIDATES)
at the product's weights: how much of exact BM25's nDCG@10 each cap keeps.
Targets: the product's weights are TRAIN's choice (within 0.002 of the best
TRAIN figure) and beat plain BM25 on TEST; the default cap keeps TEST
nDCG@10 within 0.005 of scoring every document.
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

    from training import bm25, datasets
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
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    return summary("keyword", figures, {
        "product_minus_train_best_ndcg@10": ">= -0.002",
        "product_minus_plain_test_ndcg@10": "> 0",
        "default_cap_minus_all_test_ndcg@10": ">= -0.005",
    })
