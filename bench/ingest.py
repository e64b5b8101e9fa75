"""Import speed and memory of a Jira JSON export (issue: datasets).

Baseline in the same run: json.load of the same file, which any importer has
to beat or match; the ratio shows what storing and indexing add on top.
Targets: the 20,859-issue Hadoop export parsed, validated and stored in
<= 15 s with peak RSS <= 400 MB on 2 cores.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from bench.harness import SHARED_DATA, emit, peak_rss_mb, setup_django, summary


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench ingest")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz")
    args = parser.parse_args(argv)
    setup_django()
    from django.contrib.auth import get_user_model

    from training import datasets

    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    with gzip.open(args.data, "rt") if args.data.suffix == ".gz" else open(args.data) as fh:
        baseline_count = len(json.load(fh)["issues"])
    baseline_s = time.perf_counter() - t0
    emit({"system": "baseline json.load", "seconds": round(baseline_s, 2), "issues": baseline_count})

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    t1 = time.perf_counter()
    dataset = datasets.import_dataset(
        owner=owner, name=f"bench-{time.time()}", kind="tickets", path=args.data, filename=args.data.name
    )
    import_s = time.perf_counter() - t1
    documents = dataset.documents.count()
    figures = {
        "documents": documents,
        "import_seconds": round(import_s, 2),
        "documents_per_second": round(documents / import_s, 1),
        "baseline_json_load_seconds": round(baseline_s, 2),
        "import_vs_json_load_ratio": round(import_s / baseline_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_mb": round(rss_before, 1),
    }
    emit({"system": "embedportal import", **figures})
    return summary("ingest", figures, {"import_seconds": "<= 15", "peak_rss_mb": "<= 400"})
