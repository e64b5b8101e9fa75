"""Hybrid search at 100,000 documents (issue: hybrid search).

What it builds, in its own throwaway PostgreSQL + pgvector:
- dataset "hadoop": the 20,859 real tickets of the Hadoop export, with their
  real vectors (for quality on the ../shared/DATA.md protocol);
- dataset "hadoop-100k": the same real tickets plus perturbed copies up to
  --docs (default 100,000): each copy keeps the ticket's metadata, its title
  with one word dropped and a shuffled ~70% of its body sentences, and the
  real vector plus Gaussian noise, renormalised (cosine ~0.9 to the
  original). So 79% of the 100k rows are synthetic: they exercise the
  indexes and the planner at that size, they are not 100k distinct tickets.

The real tickets are encoded once (all-MiniLM-L6-v2 by default, or --model
PATH, at max_seq_length 128) and cached under var/bench-cache/, keyed by
model + data file hash. Figures:
- hybrid latency p50/p95 over ticket titles as queries, with precomputed
  query vectors and with the query embedding on CPU (targets p95 <= 30 / <= 50 ms);
- HNSW recall@10 against exact cosine search (numpy), unfiltered and with a
  created-in-2015 filter that keeps ~10% of rows, and whether those filtered
  queries return 10 results (target >= 0.95, all return 10);
- 20 concurrent HTTP clients for --load-seconds (60) against gunicorn on a
  free 127.0.0.1 port: errors (target 0), throughput, p95;
- quality on "hadoop": keyword, vector and hybrid (the index's default fusion
  tuned on the TRAIN clusters) nDCG@10 on the TEST clusters (target hybrid >=
  the better of the two halves).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.harness import SHARED_DATA, emit

BASE_DIR = Path(__file__).resolve().parent.parent
CACHE_DIR = BASE_DIR / "var" / "bench-cache"
DEFAULT_DATA = SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz"
# MiniLM truncates at max_seq_length tokens; 128 instead of 256 halves the
# one-off encoding of the real set (~6 min instead of ~11 on 2 shared cores).
MAX_SEQ_LENGTH = 128


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_issues(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path) as fh:
        payload = json.load(fh)
    return payload["issues"] if isinstance(payload, dict) else payload


def issue_text(issue: dict) -> str:
    fields = issue["fields"]
    summary = (fields.get("summary") or "").strip()
    description = (fields.get("description") or "").strip()
    return f"{summary}\n{description}" if description else summary


def cached_vectors(*, model_path: str, data: Path, texts_by_key: dict[str, str]) -> dict[str, np.ndarray]:
    """Vectors of the real tickets, encoded once and kept under var/bench-cache/.

    Keyed by model folder + data file hash + max_seq_length, so a new model or
    file is encoded again; a cache hit costs a file read.
    """
    from training.evaluation import encode_corpus
    from training import finetune

    resolved = finetune.resolve_base_model(model_path)
    model_tag = hashlib.sha1(str(Path(resolved).resolve()).encode()).hexdigest()[:12]
    stem = f"{Path(resolved).name}-{model_tag}-{file_sha1(data)[:12]}-seq{MAX_SEQ_LENGTH}"
    vec_file, key_file = CACHE_DIR / f"{stem}.npy", CACHE_DIR / f"{stem}.keys.json"
    if vec_file.exists() and key_file.exists():
        keys = json.loads(key_file.read_text())
        vectors = np.load(vec_file)
        emit({"step": "encode", "cached": str(vec_file), "documents": len(keys)})
        return dict(zip(keys, vectors))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    model = finetune.load_model(resolved, device="cpu", max_seq_length=MAX_SEQ_LENGTH)
    keys = list(texts_by_key)
    t0 = time.perf_counter()
    vectors = encode_corpus(model, [texts_by_key[k] for k in keys], batch_size=64)
    emit({"step": "encode", "documents": len(keys), "seconds": round(time.perf_counter() - t0, 1)})
    np.save(vec_file, vectors)
    key_file.write_text(json.dumps(keys))
    return dict(zip(keys, vectors))


# Noise per dimension added to a copy's vector before renormalising: at 384
# dims, sigma 0.025 puts copies at cosine ~0.89 to their original.
COPY_NOISE_SIGMA = 0.025
FILTER_FROM, FILTER_TO = "2015-01-01", "2015-12-31"
# HTTP runs of one bench (see --load-configs): today's server (PyTorch queries, no cache, 2 workers x 4
# threads), the ONNX int8 query encoder alone, and the product's defaults (ONNX int8 + query cache, bin/run's
# web sizing). 60 s each by default.
DEFAULT_LOAD_CONFIGS = "today:torch:0:2x4,onnx:auto:0:2x4,new:auto:1024:product"


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 2) if values else float("nan")


def _variant(rng: np.random.Generator, title: str, body: str) -> tuple[str, str]:
    words = title.split()
    if len(words) > 3:
        del words[int(rng.integers(len(words)))]
    sentences = [s for s in body.replace("\r", "").split(". ") if s.strip()]
    if sentences:
        keep = max(1, int(len(sentences) * 0.7))
        chosen = sorted(rng.choice(len(sentences), size=keep, replace=False))
        order = list(chosen)
        rng.shuffle(order)
        body = ". ".join(sentences[i] for i in order)
    return " ".join(words), body


def _copy_vectors(conn, rows: list[tuple[int, int, np.ndarray]]) -> None:
    """COPY (document, version, vector) rows in binary (pgvector's psycopg adapter).

    search_embedding may carry a content_hash column (incremental embedding
    jobs); the bench's vectors get an empty one, as a fresh job would not.
    """
    from pgvector.psycopg import register_vector

    register_vector(conn)
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1 FROM information_schema.columns WHERE table_name = 'search_embedding' "
                       "AND column_name = 'content_hash'")
        with_hash = cursor.fetchone() is not None
        columns = "document_id, model_version_id, embedding" + (", content_hash" if with_hash else "")
        with cursor.copy(f"COPY search_embedding ({columns}) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int8", "vector"] + (["text"] if with_hash else []))
            for row in rows:
                copy.write_row((*row, "") if with_hash else row)


def _build(args, issues, vectors_by_key) -> dict:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from search import indexing
    from search.models import SearchIndex
    from training import datasets, finetune
    from training.models import Document, ModelVersion

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    dims = int(next(iter(vectors_by_key.values())).shape[0])
    artifact = finetune.resolve_base_model(args.model)
    timings = {}

    t0 = time.perf_counter()
    real = datasets.import_dataset(owner=owner, name="hadoop", kind="tickets", path=args.data, filename=args.data.name)
    big = datasets.import_dataset(owner=owner, name="hadoop-100k", kind="tickets", path=args.data,
                                  filename=args.data.name)
    timings["import_real_x2_s"] = round(time.perf_counter() - t0, 1)

    # Copies: bulk insert without the two GIN indexes, then rebuild them once
    # (an index build is several times faster than 80k incremental updates).
    t0 = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE indexname IN "
                       "('document_search_vector_gin', 'document_identifier_gin')")
        gin_indexes = cursor.fetchall()
        for name, _ in gin_indexes:
            cursor.execute(f'DROP INDEX "{name}"')
    rng = np.random.default_rng(0)
    originals = list(Document.objects.filter(dataset=big).order_by("id").values_list("external_key", "title", "body",
                                                                                        "metadata"))
    missing = max(0, args.docs - len(originals))
    batch: list[Document] = []
    for n in range(missing):
        key, title, body, metadata = originals[n % len(originals)]
        title, body = _variant(rng, title, body)
        meta = {k: v for k, v in metadata.items() if k != "links"}
        batch.append(Document(dataset=big, external_key=f"{key}~{n // len(originals) + 1}", title=title or key,
                              body=body, metadata=meta))
        if len(batch) == 2000:
            Document.objects.bulk_create(batch)
            batch = []
    if batch:
        Document.objects.bulk_create(batch)
    datasets.refresh_search_vectors(dataset=big)
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '512MB'")
        for _, definition in gin_indexes:
            cursor.execute(definition)
        cursor.execute("ANALYZE training_document")
    timings["copies_and_fulltext_s"] = round(time.perf_counter() - t0, 1)

    # Vectors: real ones for real keys, noisy renormalised ones for copies.
    t0 = time.perf_counter()
    v_real = ModelVersion.objects.create(owner=owner, name="bench-real", version=1, base_model=args.model,
                                         artifact_path=artifact, dimensions=dims)
    v_big = ModelVersion.objects.create(owner=owner, name="bench-100k", version=1, base_model=args.model,
                                        artifact_path=artifact, dimensions=dims)
    big_rows = list(Document.objects.filter(dataset=big).order_by("id").values_list("id", "external_key", "metadata"))
    big_ids = np.asarray([r[0] for r in big_rows])
    big_vectors = np.empty((len(big_rows), dims), dtype=np.float32)
    noise_rng = np.random.default_rng(1)
    for i, (_, key, _) in enumerate(big_rows):
        base = vectors_by_key[key.split("~")[0]]
        if "~" in key:
            noisy = base + noise_rng.normal(0.0, COPY_NOISE_SIGMA, size=dims).astype(np.float32)
            base = noisy / np.linalg.norm(noisy)
        big_vectors[i] = base
    in_filter = np.asarray([FILTER_FROM <= (m.get("created") or "")[:10] <= FILTER_TO for _, _, m in big_rows])
    real_rows = list(Document.objects.filter(dataset=real).values_list("id", "external_key"))
    with transaction_atomic():
        _copy_vectors(connection.connection, [(doc_id, v_real.pk, vectors_by_key[key]) for doc_id, key in real_rows])
        _copy_vectors(connection.connection, [(int(d), v_big.pk, big_vectors[i]) for i, d in enumerate(big_ids)])
    timings["store_vectors_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    build_mem_mb, build_workers = hnsw_build_settings(len(big_ids), dims)
    from django.test import override_settings

    # The product's build (search.indexing.ensure_hnsw_index) sizes maintenance_work_mem to the vectors; here
    # its cap is a third of this machine's memory and the leader plus max_parallel_maintenance_workers (the
    # cores less one: PostgreSQL runs on this machine) build the graph together.
    with override_settings(HNSW_BUILD_MEMORY_MB=build_mem_mb, HNSW_BUILD_WORKERS=build_workers):
        indexing.ensure_hnsw_index(model_version=v_big)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE search_embedding")
        cursor.execute("SELECT pg_relation_size(%s)", [indexing.hnsw_index_name(v_big.pk)])
        timings["hnsw_index_mb"] = round(cursor.fetchone()[0] / 2**20, 1)
    timings["hnsw_build_s"] = round(time.perf_counter() - t0, 1)
    timings.update(hnsw_maintenance_work_mem_mb=build_mem_mb, hnsw_parallel_workers=build_workers)

    indexes = {}
    for name, dataset, version in (("real", real, v_real), ("big", big, v_big)):
        total = Document.objects.filter(dataset=dataset).count()
        indexes[name] = SearchIndex.objects.create(
            owner=owner, dataset=dataset, model_version=version, status=SearchIndex.Status.READY,
            embedded_count=total, total_count=total,
        )
    emit({"step": "build", "documents_100k": len(big_rows), "real_documents": len(real_rows),
          "rows_in_filter": int(in_filter.sum()), **timings})
    return {"indexes": indexes, "big_ids": big_ids, "big_vectors": big_vectors, "in_filter": in_filter,
            "owner": owner, "timings": timings}


def hnsw_build_settings(rows: int, dims: int) -> tuple[int, int]:
    """(maintenance_work_mem in MB, parallel maintenance workers) for the bench's HNSW build of `rows` vectors:
    the product's sizing (search.indexing.hnsw_build_memory_mb) capped at a third of this machine's memory,
    and the cores less one."""
    from search import indexing

    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return (indexing.hnsw_build_memory_mb(rows, dims, cap_mb=total_mb // 3),
            max(0, min(7, (os.cpu_count() or 1) - 1)))


def transaction_atomic():
    from django.db import transaction

    return transaction.atomic()


# Query encoding "today" (before issue #17: PyTorch fp32 on one thread, no cache) and the product's default
# (EMBEDPORTAL_QUERY_BACKEND=auto: ONNX Runtime int8 on one thread). The cache is off in both latency loops,
# so every query is encoded.
TODAY_QUERY_SETTINGS = {"QUERY_BACKEND": "torch", "QUERY_CACHE_SIZE": 0}
NEW_QUERY_SETTINGS = {"QUERY_CACHE_SIZE": 0}


COMMON_TERMS = 10
_STOP_WORDS = frozenset("a an and are as at be by for from in is it not of on or the to when with".split())


def common_terms(queries: list[str], n: int) -> list[str]:
    """The n most frequent words (3+ letters, no stop words) of the latency queries (ticket titles)."""
    from collections import Counter

    counts = Counter(w for q in queries for w in set(q.lower().split()) if w.isalpha() and len(w) > 2
                     and w not in _STOP_WORDS)
    return [w for w, _ in counts.most_common(n)]


def _latency(index, queries: list[str], query_vectors: np.ndarray) -> dict:
    from django.test import override_settings

    from search import hybrid

    for q, v in zip(queries[:20], query_vectors[:20]):  # warm caches and the model
        hybrid.hybrid_search(index=index, query=q, k=10, query_vector=v.tolist())
    without, keyword_ms, vector_ms = [], [], []
    for q, v in zip(queries, query_vectors):
        t0 = time.perf_counter()
        result = hybrid.hybrid_search(index=index, query=q, k=10, query_vector=v.tolist())
        without.append((time.perf_counter() - t0) * 1000)
        keyword_ms.append(result.timings_ms.get("keyword", 0.0))
        vector_ms.append(result.timings_ms.get("vector", 0.0))
    # The keyword side on the dataset's most common title words: the queries that match the most rows
    # (ranking every match is the trap at a million documents).
    # The product's cap on ranked matches (settings.KEYWORD_RANK_CAP), then ranking every match (0, as before
    # #17) and other caps, in the same run.
    from django.conf import settings

    words = common_terms(queries, COMMON_TERMS)
    figures = {"keyword_common_terms": ",".join(words), "keyword_rank_cap": settings.KEYWORD_RANK_CAP}
    for label, cap in (("", settings.KEYWORD_RANK_CAP), ("uncapped_", 0), ("cap2000_", 2000), ("cap5000_", 5000)):
        common_ms = []
        with override_settings(KEYWORD_RANK_CAP=cap):
            for word in words:
                for _ in range(3):
                    result = hybrid.hybrid_search(index=index, query=word, k=10,
                                                  query_vector=query_vectors[0].tolist())
                    common_ms.append(result.timings_ms.get("keyword", 0.0))
        figures[f"keyword_common_terms_{label}p95_ms"] = _percentile(common_ms, 95)
    # What the cap changes in the served ranking: each latency query's hybrid top 10 with the product's cap
    # against ranking every keyword match (0), same query vectors.
    same, overlap = 0, []
    for q, v in zip(queries, query_vectors):
        capped = [h.document.pk for h in hybrid.hybrid_search(index=index, query=q, k=10, query_vector=v.tolist()).hits]
        with override_settings(KEYWORD_RANK_CAP=0):
            every = [h.document.pk for h in hybrid.hybrid_search(index=index, query=q, k=10,
                                                                   query_vector=v.tolist()).hits]
        same += capped == every
        overlap.append(len(set(capped) & set(every)) / max(len(every), 1))
    figures.update({"keyword_cap_same_top10_share": round(same / len(queries), 4),
                    "keyword_cap_top10_overlap": round(float(np.mean(overlap)), 4)})
    figures.update({"hybrid_p50_ms": _percentile(without, 50), "hybrid_p95_ms": _percentile(without, 95),
                    "keyword_side_p95_ms": _percentile(keyword_ms, 95),
                    "vector_side_p95_ms": _percentile(vector_ms, 95)})
    for prefix, overrides in (("today_", TODAY_QUERY_SETTINGS), ("", NEW_QUERY_SETTINGS)):
        with override_settings(**overrides):
            for q in queries[:20]:
                hybrid.hybrid_search(index=index, query=q, k=10)
            with_embedding, embed_ms, backends = [], [], set()
            for q in queries:
                t0 = time.perf_counter()
                result = hybrid.hybrid_search(index=index, query=q, k=10)
                with_embedding.append((time.perf_counter() - t0) * 1000)
                embed_ms.append(result.timings_ms.get("embed", 0.0))
                backends.add(result.query_encoder.get("backend", ""))
        figures.update({
            f"{prefix}hybrid_with_embedding_p50_ms": _percentile(with_embedding, 50),
            f"{prefix}hybrid_with_embedding_p95_ms": _percentile(with_embedding, 95),
            f"{prefix}query_embedding_p50_ms": _percentile(embed_ms, 50),
            f"{prefix}query_embedding_p95_ms": _percentile(embed_ms, 95),
            f"{prefix}query_backend": ",".join(sorted(b for b in backends if b)),
        })
    return {
        **figures, "latency_queries": len(queries),
        # The machine is shared: the 1-minute load average when the latency
        # loop ended says how busy the 2 cores were with other work.
        "load_avg_1m_after_latency": round(os.getloadavg()[0], 2),
    }


def _recall(index, built: dict, query_vectors: np.ndarray) -> dict:
    """HNSW recall@10 against exact cosine (numpy), unfiltered and with a created-in-2015 filter (~10% of
    rows), at the product's ef_search (the hnsw_* figures) and at each of EF_SEARCH_SWEEP (the ef<N>_*)."""
    from datetime import date

    from search import filters, hybrid

    flt = filters.SearchFilters.of(created_from=date.fromisoformat(FILTER_FROM), created_to=date.fromisoformat(FILTER_TO))
    figures = {"filter_fraction": round(float(built["in_filter"].mean()), 4), "recall_queries": len(query_vectors),
               "hnsw_ef_search": hybrid.HNSW_EF_SEARCH}
    for ef in sorted({hybrid.HNSW_EF_SEARCH, *EF_SEARCH_SWEEP}):
        at = _recall_at(index, built, query_vectors, flt, ef)
        if ef == hybrid.HNSW_EF_SEARCH:
            figures.update({"hnsw_recall_at_10": at["recall_at_10"],
                            "hnsw_filtered_recall_at_10": at["filtered_recall_at_10"],
                            "filtered_queries_with_10_results": at["filtered_full_pages"]})
        if ef in EF_SEARCH_SWEEP:
            figures.update({f"ef{ef}_{k}": v for k, v in at.items() if k != "filtered_full_pages"})
    return figures


# ef_search values the recall step also measures (the product's is settings.HNSW_EF_SEARCH).
EF_SEARCH_SWEEP = (100, 200, 400)


def _recall_at(index, built: dict, query_vectors: np.ndarray, flt, ef: int) -> dict:
    """Recall@10 (ids, unfiltered and filtered), the share of filtered queries returning 10, the kNN
    statement's p95 and the similarity ratio (sum of the returned top 10's cosines over the exact top 10's:
    1.0 when HNSW only swaps near-ties) at one ef_search, set on this session (hybrid._run_knn's
    one-statement path uses the session's value), then set back to the product's."""
    from django.db import connection

    from search import filters, hybrid

    ids, vectors, mask = built["big_ids"], built["big_vectors"], built["in_filter"]
    position = {int(d): i for i, d in enumerate(ids)}
    recalls, filtered, ratios, knn_ms, full_pages = [], [], [], [], 0
    with connection.cursor() as cursor:
        cursor.execute(f"SET hnsw.ef_search = {int(ef)}")
    try:
        for v in query_vectors:
            scores = vectors @ v
            order = np.argsort(-scores)[:10]
            t0 = time.perf_counter()
            got = [d for d, _ in hybrid._vector_ranking(index, v.tolist(), 10, filters.SearchFilters.of())]
            knn_ms.append((time.perf_counter() - t0) * 1000)
            recalls.append(len(set(ids[order].tolist()) & set(got)) / 10)
            ratios.append(float(sum(scores[position[d]] for d in got) / scores[order].sum()))
            masked = np.where(mask, scores, -np.inf)
            exact_f = set(ids[np.argsort(-masked)[:10]].tolist())
            got_f = [d for d, _ in hybrid._vector_ranking(index, v.tolist(), 10, flt)]
            filtered.append(len(exact_f & set(got_f)) / 10)
            full_pages += len(got_f) == 10
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"SET hnsw.ef_search = {int(hybrid.HNSW_EF_SEARCH)}")
    return {"recall_at_10": round(float(np.mean(recalls)), 4),
            "filtered_recall_at_10": round(float(np.mean(filtered)), 4),
            "similarity_ratio": round(float(np.mean(ratios)), 4), "knn_p95_ms": _percentile(knn_ms, 95),
            "filtered_full_pages": round(full_pages / len(query_vectors), 4)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(index, owner, queries: list[str], *, seconds: int, clients: int, workers: int, threads: int,
          env_extra: dict[str, str] | None = None) -> dict:
    """20 threads hammering GET /api/indexes/{id}/search/ over keep-alive HTTP on loopback.

    env_extra: the server's own settings (EMBEDPORTAL_QUERY_BACKEND, EMBEDPORTAL_QUERY_CACHE_SIZE).
    """
    import http.client
    import os
    import subprocess
    import sys
    import threading
    import urllib.parse

    from rest_framework.authtoken.models import Token

    token = Token.objects.get_or_create(user=owner)[0].key
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", LOG_LEVEL="WARNING", DEBUG="0", ALLOWED_HOSTS="127.0.0.1",
               **(env_extra or {}))
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "embedportal.wsgi", "--bind", f"127.0.0.1:{port}", "--workers",
         str(workers), "--threads", str(threads), "--timeout", "60", "--log-level", "warning"],
        cwd=str(BASE_DIR), env=env,
    )
    headers = {"Authorization": f"Token {token}"}
    path = f"/api/indexes/{index.pk}/search/?"
    try:
        deadline = time.time() + 90
        while True:  # wait for the server, then warm every worker (model load ~2-5 s each)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("GET", path + urllib.parse.urlencode({"q": "namenode"}), headers=headers)
                if conn.getresponse().read() and True:
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("gunicorn did not start")
                time.sleep(0.5)
        def warm(n: int) -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for q in queries[n * 3 : n * 3 + 3]:
                c.request("GET", path + urllib.parse.urlencode({"q": q}), headers=headers)
                c.getresponse().read()

        # Every worker loads its model and query encoder (an ONNX export the first time) before the clock
        # starts: one connection per worker thread, concurrently, so all workers get requests.
        warmers = [threading.Thread(target=warm, args=(n,)) for n in range(workers * threads)]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join()
        latencies: list[float] = []
        errors: list[str] = []
        cached: list[bool] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + seconds

        def client(n: int) -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            i = n
            while time.perf_counter() < stop_at:
                q = queries[i % len(queries)]
                i += clients
                t0 = time.perf_counter()
                try:
                    c.request("GET", path + urllib.parse.urlencode({"q": q, "k": 10}), headers=headers)
                    response = c.getresponse()
                    body = response.read()
                    ok = response.status == 200 and b'"results"' in body
                    hit = b'"cached":true' in body
                except (OSError, http.client.HTTPException) as exc:
                    ok, body, hit = False, repr(exc).encode(), False
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                elapsed = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(elapsed)
                    cached.append(hit)
                    if not ok:
                        errors.append(body[:200].decode(errors="replace"))

        started = time.perf_counter()
        pool = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    if errors:
        emit({"step": "load", "first_errors": errors[:3]})
    return {
        "http_clients": clients, "http_seconds": round(wall, 1), "http_requests": len(latencies),
        "http_errors": len(errors), "http_throughput_rps": round(len(latencies) / wall, 1),
        "http_p50_ms": _percentile(latencies, 50), "http_p95_ms": _percentile(latencies, 95),
        "http_p99_ms": _percentile(latencies, 99),
        "http_query_cache_hit_rate": round(sum(cached) / max(len(cached), 1), 3),
        "gunicorn": f"{workers} workers x {threads} threads", "server_settings": env_extra or {},
        "load_avg_1m_after_http": round(os.getloadavg()[0], 2),
    }


def _load_configs(spec: str) -> list[tuple[str, dict[str, str], int, int]]:
    """--load-configs "name:backend:cache:WxT,...": (label, server env, workers, threads) per HTTP run.

    "product" as WxT is bin/run's sizing (embedportal.launcher.web_size()).
    """
    from embedportal.launcher import web_size

    configs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        label, backend, cache, size = item.split(":")
        workers, threads = web_size() if size == "product" else map(int, size.split("x"))
        configs.append((label, {"EMBEDPORTAL_QUERY_BACKEND": backend, "EMBEDPORTAL_QUERY_CACHE_SIZE": cache},
                        workers, threads))
    return configs


def _query_encoding(queries: list[str], artifact_path: str) -> dict:
    """CPU and wall time per query of today's query encoder (PyTorch fp32, one thread) and the product's
    (EMBEDPORTAL_QUERY_BACKEND=auto), interleaved query by query so both see the same load; cosine of the two."""
    from search import encoders, query_vectors

    for backend in ("torch", "auto"):  # load, export, warm
        query_vectors.encode(artifact_path=artifact_path, text=queries[0], backend=backend)
    wall: dict[str, list[float]] = {"torch": [], "auto": []}
    cpu = {"torch": 0.0, "auto": 0.0}
    vectors: dict[str, list[list[float]]] = {"torch": [], "auto": []}
    for q in queries:
        for backend in ("torch", "auto"):
            c0, t0 = time.thread_time(), time.perf_counter()
            vectors[backend].append(query_vectors.encode(artifact_path=artifact_path, text=q, backend=backend)[0])
            wall[backend].append((time.perf_counter() - t0) * 1000)
            cpu[backend] += time.thread_time() - c0
    cosines = (np.asarray(vectors["torch"]) * np.asarray(vectors["auto"])).sum(axis=1)
    return {
        "encode_queries": len(queries), "encode_backend_new": encoders.get_query_encoder(artifact_path, "auto")[1],
        "encode_cpu_ms_today": round(cpu["torch"] / len(queries) * 1000, 2),
        "encode_cpu_ms_new": round(cpu["auto"] / len(queries) * 1000, 2),
        "encode_p50_ms_today": _percentile(wall["torch"], 50), "encode_p95_ms_today": _percentile(wall["torch"], 95),
        "encode_p50_ms_new": _percentile(wall["auto"], 50), "encode_p95_ms_new": _percentile(wall["auto"], 95),
        "encode_cosine_new_vs_fp32_min": round(float(cosines.min()), 4),
        "encode_cosine_new_vs_fp32_mean": round(float(cosines.mean()), 4),
        "load_avg_1m_after_encode": round(os.getloadavg()[0], 2),
    }


def _query_path_quality(index) -> dict:
    """The served query path against today's: the DATA.md protocol with each query's text encoded.

    Query by document as in DATA.md, but the query vector is the ticket's text
    encoded the way a search request encodes it (one text at a time): PyTorch
    fp32 (today) and the product's query encoder (ONNX Runtime int8); the
    documents keep their stored vectors. Reports the cosine of the two query
    vectors and nDCG@10 of vector and hybrid (the index's default fusion,
    BM25 keyword side) with each.
    """
    from search import encoders, query_vectors, tuning
    from search.hybrid import resolve_fusion
    from training import evaluation

    eval_set = evaluation.ticket_eval_set(dataset=index.dataset, split="test")
    queries = eval_set.queries
    position = eval_set.position
    texts = [eval_set.texts[position[q]] for q in queries]
    path = index.model_version.artifact_path
    encoded, seconds = {}, {}
    for backend in ("torch", "auto"):
        t0 = time.perf_counter()
        encoded[backend] = np.asarray(
            [query_vectors.encode(artifact_path=path, text=text, backend=backend)[0] for text in texts],
            dtype=np.float32)
        seconds[backend] = round(time.perf_counter() - t0, 1)
    new_backend = encoders.get_query_encoder(path, "auto")[1]
    cosines = (encoded["torch"] * encoded["auto"]).sum(axis=1)
    documents = tuning.index_embeddings(eval_set=eval_set, model_version_id=index.model_version_id)
    keyword = evaluation.bm25_scored_rankings(dataset=index.dataset, eval_set=eval_set, queries=queries)
    fusion = resolve_fusion(index=index)
    doc_ids = np.asarray(eval_set.doc_ids)
    figures: dict = {}
    for name, matrix in (("today", encoded["torch"]), ("new", encoded["auto"])):
        scores = matrix @ documents.T
        vector = {}
        for row, query in enumerate(queries):
            top = np.argsort(-scores[row], kind="stable")[: evaluation.RANK_DEPTH + 1]
            vector[query] = [(int(doc_ids[i]), float(scores[row, i])) for i in top if doc_ids[i] != query]
        systems = evaluation.hybrid_systems(keyword, vector, fusions=[fusion])
        hybrid_name = next(n for n in systems if n not in ("keyword", "vector"))
        for system, label in (("vector", "vector"), (hybrid_name, "hybrid")):
            figures[f"{name}_query_{label}_ndcg_at_10"] = evaluation.evaluate(
                systems[system], eval_set).summary()["ndcg@10"]
    figures.update({
        "query_path_queries": len(queries), "query_backend_new": new_backend,
        "query_cosine_new_vs_fp32_min": round(float(cosines.min()), 4),
        "query_cosine_new_vs_fp32_mean": round(float(cosines.mean()), 4),
        "query_hybrid_ndcg_change": round(figures["new_query_hybrid_ndcg_at_10"]
                                          - figures["today_query_hybrid_ndcg_at_10"], 4),
        "query_vector_ndcg_change": round(figures["new_query_vector_ndcg_at_10"]
                                          - figures["today_query_vector_ndcg_at_10"], 4),
        "query_encode_seconds_today_vs_new": f"{seconds['torch']} / {seconds['auto']}",
    })
    return figures


def _quality(index) -> dict:
    from search import tuning

    t0 = time.perf_counter()
    fusion = tuning.tune_fusion(index=index)  # the product default: 300 validation queries
    report = tuning.evaluate_search(index=index, max_queries=None)
    systems = report["systems"]
    emit({"step": "quality", "fusion": {k: fusion.get(k) for k in ("method", "rrf_k", "alpha", "queries")},
          "validation": fusion.get("systems"), "test": systems})
    return {
        "quality_queries": report["queries"],
        "keyword_ndcg_at_10": systems["keyword"]["ndcg@10"],
        "vector_ndcg_at_10": systems["vector"]["ndcg@10"],
        "hybrid_ndcg_at_10": systems["served"]["ndcg@10"],
        "hybrid_recall_at_10": systems["served"]["recall@10"],
        "hybrid_mrr_at_10": systems["served"]["mrr@10"],
        "hybrid_minus_best_half": round(
            systems["served"]["ndcg@10"] - max(systems["keyword"]["ndcg@10"], systems["vector"]["ndcg@10"]), 4
        ),
        "default_fusion": fusion["method"] + (f" k={fusion['rrf_k']}" if fusion["method"] == "rrf"
                                              else f" alpha={fusion['alpha']}"),
        "quality_seconds": round(time.perf_counter() - t0, 1),
    }


def real_vectors(issues: list[dict], *, model_path: str, data: Path) -> dict[str, np.ndarray]:
    """The real tickets' vectors by key (cached_vectors over each keyed ticket's summary + description)."""
    texts = {}
    for issue in issues:
        if (issue["fields"].get("summary") or "").strip() and issue["key"] not in texts:
            texts[issue["key"]] = issue_text(issue)
    return cached_vectors(model_path=model_path, data=data, texts_by_key=texts)


def title_query_vectors(artifact_path: str, queries: list[str]) -> np.ndarray:
    """The latency queries encoded at MAX_SEQ_LENGTH, normalised, float32 (one batch, PyTorch)."""
    from search import encoders

    model = encoders.get_model(artifact_path)
    model.max_seq_length = MAX_SEQ_LENGTH
    return model.encode(queries, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


def _latency_queries(issues: list[dict], n: int) -> list[str]:
    """Ticket titles as queries; every 4th gets a word of another title added,
    so no document has all its words and the keyword side has to relax."""
    rng = np.random.default_rng(7)
    titles = [issue["fields"]["summary"].strip() for issue in issues if (issue["fields"].get("summary") or "").strip()]
    picked = rng.choice(len(titles), size=n, replace=False)
    return [
        titles[i] if k % 4 else f"{titles[i]} {titles[(i + 7919) % len(titles)].split()[-1]}"
        for k, i in enumerate(picked)
    ]


def run(argv: list[str]) -> dict:
    import argparse

    from bench.harness import setup_django, summary

    parser = argparse.ArgumentParser(prog="python -m bench search")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="base model name or a fine-tuned model folder")
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300, help="latency queries (ticket titles)")
    parser.add_argument("--load-seconds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--load-configs", default=DEFAULT_LOAD_CONFIGS,
                        help="HTTP runs, each name:query-backend:cache-size:WORKERSxTHREADS (or 'product'); the "
                             "run named 'new' gives the http_* figures, the others http_<name>_*")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--encode-only", action="store_true",
                        help="only the query encoders' cost per latency query, today's vs the product's (no index)")
    parser.add_argument("--quality-only", action="store_true",
                        help="only the DATA.md quality figures (no 100k index, latency, recall or HTTP load)")
    args = parser.parse_args(argv)
    setup_django()
    from search import encoders

    issues = load_issues(args.data)
    if args.encode_only:
        from training import finetune

        path = finetune.resolve_base_model(args.model)
        encoders.get_model(path).max_seq_length = MAX_SEQ_LENGTH
        figures = {"model": args.model, **_query_encoding(_latency_queries(issues, args.queries), path)}
        return summary("search", figures, {"encode_cosine_new_vs_fp32_min": ">= 0.95"})
    vectors_by_key = real_vectors(issues, model_path=args.model, data=args.data)
    if args.quality_only:
        args.docs = 0
    built = _build(args, issues, vectors_by_key)
    if args.quality_only:
        figures = {"model": args.model, **_quality(built["indexes"]["real"])}
        return summary("search", figures, {"hybrid_minus_best_half": ">= 0"})
    big = built["indexes"]["big"]

    queries = _latency_queries(issues, args.queries)
    query_vectors = title_query_vectors(big.model_version.artifact_path, queries)

    figures: dict = {"documents": len(built["big_ids"]), **built["timings"]}
    figures.update(_latency(big, queries, query_vectors))
    emit({"step": "latency", **figures})
    figures.update(_recall(big, built, query_vectors[:200]))
    emit({"step": "recall", **figures})
    for label, server_env, workers, threads in _load_configs(args.load_configs):
        loaded = _load(big, built["owner"], queries, seconds=args.load_seconds, clients=args.clients,
                       workers=workers, threads=threads, env_extra=server_env)
        emit({"step": "load", "config": label, **loaded})
        figures.update(loaded if label == "new" else {
            (k.replace("http_", f"http_{label}_", 1) if k.startswith("http_") else f"{label}_{k}"): v
            for k, v in loaded.items()})
    recall_target = ">= 0.97" if args.docs >= 1_000_000 else ">= 0.95"
    targets = {
        "hybrid_p95_ms": "<= 30", "hybrid_with_embedding_p95_ms": "<= 50",
        # #17 asks 0.97 of a million documents; the 100k run keeps the hybrid-search issue's 0.95.
        "hnsw_recall_at_10": recall_target, "hnsw_filtered_recall_at_10": recall_target,
        "keyword_common_terms_p95_ms": "<= 30",
        "filtered_queries_with_10_results": ">= 1",
    }
    if "http_errors" in figures:  # --load-configs "" skips the HTTP runs
        targets.update({"http_errors": "<= 0", "http_throughput_rps": ">= 80", "http_p95_ms": "<= 300"})
    if not args.skip_quality:
        figures.update(_quality(built["indexes"]["real"]))
        targets["hybrid_minus_best_half"] = ">= 0"
        figures.update(_query_path_quality(built["indexes"]["real"]))
        emit({"step": "query-path", **{k: v for k, v in figures.items() if k.startswith("query")}})
        targets["query_hybrid_ndcg_change"] = ">= -0.002"
    figures["model"] = args.model
    return summary("search", figures, targets)
