"""`python -m bench NAME [options]`: run a benchmark, print JSON lines.

The last line is the summary: {"bench": NAME, "figures": {...}, "targets":
{"<figure>": {"value": v, "target": "<= 15", "met": true}}, "all_met": bool}.
Benchmarks start their own throwaway embedded PostgreSQL + pgvector (unless
DATABASE_URL is set) so they never touch the product's data.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHES = {"ingest": "bench.ingest"}
BENCHES["search"] = "bench.search"
BENCHES["quality"] = "bench.quality"
BENCHES["train-speed"] = "bench.train_speed"
BENCHES["embed"] = "bench.embed"
BENCHES["chaos"] = "bench.chaos"
BENCHES["cluster"] = "bench.cluster"
BENCHES["retrain"] = "bench.retrain"
BENCHES["hosts"] = "bench.hosts"
BENCHES["hnsw-recall"] = "bench.hnsw_recall"
BENCHES["keyword"] = "bench.keyword"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=sorted(BENCHES))
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(BENCHES[args.name])
    summary = module.run(rest)
    print(json.dumps(summary), flush=True)
    return 0 if summary["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
