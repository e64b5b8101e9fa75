"""HNSW recall at a million vectors, by how the synthetic copies are made (issue #17).

`python -m bench hnsw-recall [--docs 1000000] [--copies clumped,blend] [--ef 100,200,400]`

`bench search --docs N` grows the real Hadoop vectors (20,859) to N with noisy copies of each ticket
(cosine ~0.9 to it): at a million that is 47 copies of every ticket, 20,859 tight clumps of 48 points.
This bench builds the same HNSW index (the product's opclass, m 16, ef_construction 64, memory sized by
search.indexing.hnsw_build_memory_mb) on vectors only, once per copy mode, and measures recall@10 against
exact cosine search with the same 200 title queries:
- clumped: bench search's copies (the real vector + Gaussian noise, renormalised);
- blend: each copy is its ticket's vector blended with another random ticket's (weight 0.3-0.7) plus the
  same noise, so copies do not share one centre: a million distinct points on the real vectors' manifold.
Figures per mode and ef_search: recall@10 (ids), similarity ratio (sum of the returned cosines over the
exact top 10's), kNN p95. Target: recall@10 >= 0.97 at the product's ef_search in blend mode.
"""

from __future__ import annotations

import os
import time

import numpy as np

from bench.harness import emit, setup_django, summary


def _table_vectors(mode: str, real: np.ndarray, total: int, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    n_real, dims = real.shape
    out = np.empty((total, dims), dtype=np.float32)
    out[:n_real] = real
    for start in range(n_real, total, 100_000):
        stop = min(total, start + 100_000)
        base = real[np.arange(start, stop) % n_real]
        if mode == "blend":
            other = real[rng.integers(0, n_real, size=stop - start)]
            weight = rng.uniform(0.3, 0.7, size=(stop - start, 1)).astype(np.float32)
            base = weight * base + (1 - weight) * other
            base /= np.linalg.norm(base, axis=1, keepdims=True)
        noisy = base + rng.normal(0.0, sigma, size=base.shape).astype(np.float32)
        out[start:stop] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def run(argv: list[str]) -> dict:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench hnsw-recall")
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--copies", default="clumped,blend")
    parser.add_argument("--ef", default="100,200,400")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args(argv)
    setup_django()
    from django.conf import settings
    from django.db import connection
    from pgvector.psycopg import register_vector

    from bench import search as bench_search
    from search import indexing
    from training import finetune

    model_name = "sentence-transformers/all-MiniLM-L6-v2"
    issues = bench_search.load_issues(bench_search.DEFAULT_DATA)
    by_key = bench_search.real_vectors(issues, model_path=model_name, data=bench_search.DEFAULT_DATA)
    real = np.stack([by_key[k] for k in sorted(by_key)]).astype(np.float32)
    dims = real.shape[1]
    queries = bench_search._latency_queries(issues, args.queries)
    query_vectors = bench_search.title_query_vectors(finetune.resolve_base_model(model_name), queries)
    efs = [int(x) for x in args.ef.split(",")]
    figures: dict = {"documents": args.docs, "queries": len(queries), "product_ef_search": settings.HNSW_EF_SEARCH}
    targets: dict = {}
    connection.ensure_connection()
    register_vector(connection.connection)
    for mode in args.copies.split(","):
        vectors = _table_vectors(mode, real, args.docs, bench_search.COPY_NOISE_SIGMA)
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS bench_hnsw")
            cursor.execute(f"CREATE TABLE bench_hnsw (id int PRIMARY KEY, embedding vector({dims}))")
        t0 = time.perf_counter()
        with connection.connection.cursor() as cursor:
            with cursor.copy("COPY bench_hnsw (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "vector"])
                for i in range(len(vectors)):
                    copy.write_row((i, vectors[i]))
        store_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        memory_mb = indexing.hnsw_build_memory_mb(len(vectors), dims)
        workers = max(0, min(7, (os.cpu_count() or 1) - 1))
        with connection.cursor() as cursor:
            cursor.execute(f"SET maintenance_work_mem = '{int(memory_mb)}MB'")
            cursor.execute(f"SET max_parallel_maintenance_workers = {int(workers)}")
            cursor.execute("CREATE INDEX bench_hnsw_idx ON bench_hnsw USING hnsw (embedding vector_cosine_ops)")
            cursor.execute("RESET maintenance_work_mem; RESET max_parallel_maintenance_workers; ANALYZE bench_hnsw")
        build_s = time.perf_counter() - t0
        exact = [np.argsort(-(vectors @ v))[:10] for v in query_vectors]
        row = {"mode": mode, "store_s": round(store_s, 1), "hnsw_build_s": round(build_s, 1),
               "hnsw_memory_mb": memory_mb, "hnsw_parallel_workers": workers}
        for ef in efs:
            recalls, ratios, knn_ms = [], [], []
            with connection.cursor() as cursor:
                cursor.execute(f"SET hnsw.ef_search = {int(ef)}")
                for v, want in zip(query_vectors, exact):
                    t1 = time.perf_counter()
                    cursor.execute("SELECT id FROM bench_hnsw ORDER BY embedding <=> %s LIMIT 10", [v])
                    got = [r[0] for r in cursor.fetchall()]
                    knn_ms.append((time.perf_counter() - t1) * 1000)
                    recalls.append(len(set(got) & set(want.tolist())) / 10)
                    ratios.append(float((vectors[got] @ v).sum() / (vectors[want] @ v).sum()))
            row.update({f"ef{ef}_recall_at_10": round(float(np.mean(recalls)), 4),
                        f"ef{ef}_similarity_ratio": round(float(np.mean(ratios)), 4),
                        f"ef{ef}_knn_p95_ms": round(float(np.percentile(knn_ms, 95)), 2)})
        emit({"step": "mode", **row})
        figures.update({f"{mode}_{k}": v for k, v in row.items() if k != "mode"})
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE bench_hnsw")
    if "blend" in args.copies.split(",") and settings.HNSW_EF_SEARCH in efs:
        targets[f"blend_ef{settings.HNSW_EF_SEARCH}_recall_at_10"] = ">= 0.97"
    figures["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return summary("hnsw-recall", figures, targets)
