"""Retrieval quality of the product's default pipeline (issue: training runs).

Runs the product's own path on a Jira JSON export: import, pairs, the
../shared/DATA.md split, a training run with default settings (in this
process, through training.runs), and its held-out evaluation. Prints one
JSON line per system with recall@10, mrr@10 and ndcg@10, then the summary.
Targets: the fine-tuned model beats the base model on nDCG@10, and hybrid
(fine-tuned) beats keyword search.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.harness import SHARED_DATA, emit, setup_django, subset_file, summary


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench quality")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    parser.add_argument("--limit", type=int, default=0,
                        help="first N issues + every duplicate-linked issue instead of the whole file (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a default hyperparameter (not for the reported figures)")
    args = parser.parse_args(argv)
    setup_django()
    from django.contrib.auth import get_user_model

    from training import datasets, runs

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    started = time.perf_counter()
    path = subset_file(args.data, args.limit) if args.limit else args.data
    dataset = datasets.import_dataset(owner=owner, name=args.data.name, kind="tickets", path=path,
                                      filename=path.name)
    overrides = dict(item.split("=", 1) for item in args.set)
    run_row = runs.start_run(owner=owner, dataset=dataset, hyperparameters=overrides, enqueue=False)
    run_row = runs.execute_run(run=run_row, device=args.device, echo=lambda line: print(line, file=sys.stderr))
    if run_row.status != "succeeded":
        raise SystemExit(f"run {run_row.status}: {run_row.error}")
    systems = run_row.evaluation["systems"]
    for name, values in systems.items():
        emit({"system": name, "recall@10": values["recall@10"], "mrr@10": values["mrr@10"],
              "ndcg@10": values["ndcg@10"], "queries": values["queries"]})
    figures = {
        "documents": dataset.documents.count(),
        "queries": systems["base"]["queries"],
        "base_ndcg@10": systems["base"]["ndcg@10"],
        "fine_tuned_ndcg@10": systems["fine_tuned"]["ndcg@10"],
        "keyword_ndcg@10": systems["keyword"]["ndcg@10"],
        "hybrid_fine_tuned_ndcg@10": systems["hybrid_fine_tuned"]["ndcg@10"],
        "fine_tuned_minus_base_ndcg@10": round(systems["fine_tuned"]["ndcg@10"] - systems["base"]["ndcg@10"], 4),
        "hybrid_minus_keyword_ndcg@10": round(systems["hybrid_fine_tuned"]["ndcg@10"] - systems["keyword"]["ndcg@10"], 4),
        "train_pairs": run_row.metrics["train_pairs"],
        "train_steps": run_row.metrics["steps"],
        "train_seconds": run_row.metrics["duration_s"],
        "device": run_row.metrics["device"],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    return summary("quality", figures, {"fine_tuned_minus_base_ndcg@10": "> 0", "hybrid_minus_keyword_ndcg@10": "> 0"})
