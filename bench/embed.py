"""Embedding job throughput into pgvector (issue: registry and embedding jobs).

Baseline, measured in the same run: `SentenceTransformer.encode` (PyTorch
fp32) over the documents in id order, then one INSERT per row. The product's
job (search.embedding.embed_documents) with its default encoder on CPU (ONNX
Runtime int8, search/onnx_encoder.py; the one-off export is timed inside the
job) encodes longest-first in chunks and COPYs each chunk. `--torch-job` also
times the job on the PyTorch fp32 model, to separate the encoder's share from
batching + COPY. Quality is checked on the ../shared/DATA.md protocol from the
vectors each path stored.
Targets: throughput ratio (default job vs baseline) >= 1.5, nDCG@10 drop <= 0.01.

`--limit N` embeds the first N issues plus every issue of a duplicate cluster
(so the protocol's queries stay complete) instead of the whole file.

`--workers 1,2` measures sharded index builds instead (search.indexing: chunks
of EMBEDPORTAL_EMBED_CHUNK_DOCS taken by every idle embed worker): for each
count, that many real `celery worker -Q embed --pool solo` processes (bin/run's
embed worker) with one encoder thread each (EMBEDPORTAL_EMBED_THREADS=1, so
the cores are split, not fought over) on the bench's own Redis build a fresh
index of the file with the same model; documents/s from the build's queueing
to READY (HNSW included). The encoder's one-off ONNX export is made before
the first build, so no count pays it. Targets: the last count's documents/s
over the first's >= 1.7, and every vector within cosine 0.9999 of the first
build's. `--device cuda` sets the workers' EMBEDPORTAL_DEVICE (no GPU
figure has been taken yet: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.harness import SHARED_DATA, emit, setup_django, subset_file, summary


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench embed")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz")
    parser.add_argument("--limit", type=int, default=0, help="first N issues + all duplicate-cluster issues (0: all)")
    parser.add_argument("--backend", default="auto", help="encoder of the job: auto (default), torch, onnx, onnx-int8")
    parser.add_argument("--torch-job", action="store_true", help="also time the job on the PyTorch fp32 model")
    parser.add_argument("--workers", default="", help="e.g. 1,2: sharded builds with that many embed workers")
    parser.add_argument("--chunk-docs", type=int, default=1024, help="EMBEDPORTAL_EMBED_CHUNK_DOCS of --workers")
    parser.add_argument("--device", default="cpu", help="EMBEDPORTAL_DEVICE of the --workers processes")
    args = parser.parse_args(argv)
    if args.workers:
        return sharded(args)
    setup_django()
    from django.contrib.auth import get_user_model

    from search import encoders
    from training import evaluation as ev
    from search.embedding import document_text, embed_documents
    from search.models import Embedding
    from training import datasets
    from training.finetune import embedding_dimension, resolve_base_model
    from training.models import Document, ModelVersion

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    path = subset_file(args.data, args.limit) if args.limit else args.data
    dataset = datasets.import_dataset(owner=owner, name="embed-bench", kind="tickets", path=path, filename=path.name)
    artifact = resolve_base_model("sentence-transformers/all-MiniLM-L6-v2")
    model = encoders.get_model(artifact)
    dims = embedding_dimension(model)
    versions = {
        name: ModelVersion.objects.create(owner=owner, name=name, version=1, base_model=artifact,
                                          artifact_path=artifact, dimensions=dims, dataset=dataset)
        for name in ("baseline", "embedportal", *(["embedportal-torch"] if args.torch_job else []))
    }
    docs = list(Document.objects.filter(dataset=dataset).order_by("id").values_list("id", "title", "body"))
    emit({"documents": len(docs), "model": "all-MiniLM-L6-v2", "max_seq_length": model.max_seq_length})

    # Baseline: encode in id order, then row-by-row INSERTs.
    started = time.perf_counter()
    vectors = model.encode([document_text(t, b) for _, t, b in docs], batch_size=64, normalize_embeddings=True,
                           convert_to_numpy=True)
    for (doc_id, _, _), vec in zip(docs, vectors):
        Embedding.objects.create(document_id=doc_id, model_version=versions["baseline"], embedding=vec)
    baseline_s = time.perf_counter() - started
    emit({"system": "baseline encode + row-by-row insert", "seconds": round(baseline_s, 1),
          "docs_per_s": round(len(docs) / baseline_s, 2)})

    if args.torch_job:
        started = time.perf_counter()
        embed_documents(dataset=dataset, model_version=versions["embedportal-torch"], backend="torch")
        torch_s = time.perf_counter() - started
        emit({"system": "embedportal job, torch fp32 (length-sorted chunks + COPY)", "seconds": round(torch_s, 1),
              "docs_per_s": round(len(docs) / torch_s, 2)})

    started = time.perf_counter()
    result = embed_documents(dataset=dataset, model_version=versions["embedportal"], backend=args.backend)
    ours_s = time.perf_counter() - started
    emit({"system": f"embedportal job, {result.backend} (length-sorted chunks + COPY)", "seconds": round(ours_s, 1),
          "docs_per_s": round(len(docs) / ours_s, 2)})

    eval_set = ev.ticket_eval_set(dataset=dataset)
    ndcg = {}
    matrices = {}
    for name, version in versions.items():
        stored = dict(Embedding.objects.filter(model_version=version).values_list("document_id", "embedding"))
        matrices[name] = np.asarray([stored[d] for d in eval_set.doc_ids], dtype=np.float32)
        ndcg[name] = ev.evaluate(ev.vector_rankings(embeddings=matrices[name], eval_set=eval_set),
                                 eval_set).metrics["ndcg@10"]
    # As search uses them: queries encoded by the fp32 model, documents by the job's encoder.
    mixed = ev.evaluate(ev.vector_rankings(embeddings=matrices["embedportal"], eval_set=eval_set,
                                           query_embeddings=matrices["baseline"]), eval_set).metrics["ndcg@10"]
    agreement = (matrices["embedportal"] * matrices["baseline"]).sum(axis=1)
    figures = {
        "documents": len(docs),
        "queries": len(eval_set.queries),
        "baseline_docs_per_s": round(len(docs) / baseline_s, 2),
        "embedportal_backend": result.backend,
        "embedportal_docs_per_s": round(len(docs) / ours_s, 2),
        "throughput_ratio": round(baseline_s / ours_s, 3),
        "baseline_ndcg@10": round(ndcg["baseline"], 4),
        "embedportal_ndcg@10": round(ndcg["embedportal"], 4),
        "ndcg_drop": round(ndcg["baseline"] - ndcg["embedportal"], 4),
        "fp32_queries_on_job_vectors_ndcg@10": round(mixed, 4),
        "mixed_ndcg_drop": round(ndcg["baseline"] - mixed, 4),
        "cosine_to_fp32_mean": round(float(agreement.mean()), 4),
        "cosine_to_fp32_min": round(float(agreement.min()), 4),
    }
    if args.torch_job:
        figures["torch_job_docs_per_s"] = round(len(docs) / torch_s, 2)
        figures["torch_job_ratio"] = round(baseline_s / torch_s, 3)
        figures["torch_job_ndcg@10"] = round(ndcg["embedportal-torch"], 4)
    return summary("embed", figures, {"throughput_ratio": ">= 1.5", "ndcg_drop": "<= 0.01",
                                      "mixed_ndcg_drop": "<= 0.01"})


def sharded(args) -> dict:
    """`--workers 1,2`: the same file indexed by 1, then 2 (...) real embed workers; documents/s and agreement."""
    import os
    import shutil
    import sys
    import tempfile

    from bench.retrain import Processes

    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit("--workers: a comma-separated list of worker counts, e.g. 1,2")
    folder = Path(tempfile.mkdtemp(prefix="embedportal-bench-embed-"))
    processes = Processes(folder)
    load_before = os.getloadavg()
    try:
        # No base-model index at import: it would be queued before the first count's workers and built by them.
        os.environ.update({"REDIS_URL": processes.redis(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                           "EMBEDPORTAL_BASE_INDEX": "0"})
        os.environ.setdefault("SECRET_KEY", "bench-only-" + "x" * 50)
        os.environ.pop("CELERY_BROKER_URL", None)
        setup_django()  # a throwaway embedded PostgreSQL under a new EMBEDPORTAL_VAR_DIR, shared with the workers
        from django.contrib.auth import get_user_model

        from embedportal.celery import app
        from embedportal.launcher import product_processes
        from search import encoders, indexing
        from search.models import EmbedChunk, Embedding, SearchIndex
        from training import datasets
        from training.finetune import embedding_dimension, resolve_base_model
        from training.models import ModelVersion

        owner, _ = get_user_model().objects.get_or_create(username="bench")
        path = subset_file(args.data, args.limit) if args.limit else args.data
        dataset = datasets.import_dataset(owner=owner, name="embed-bench", kind="tickets", path=path,
                                          filename=path.name)
        artifact = resolve_base_model("sentence-transformers/all-MiniLM-L6-v2")
        _, backend = encoders.get_job_encoder(artifact, args.backend)  # the one-off ONNX export, before any timing
        dims = embedding_dimension(encoders.get_model(artifact))
        documents = dataset.documents.count()
        emit({"documents": documents, "chunk_docs": args.chunk_docs, "backend": backend, "workers": counts,
              "load_before": [round(x, 2) for x in load_before]})
        env = {**os.environ, "EMBEDPORTAL_EMBED_THREADS": "1", "EMBEDPORTAL_EMBED_CHUNK_DOCS": str(args.chunk_docs),
               "EMBEDPORTAL_EMBED_BACKEND": args.backend, "EMBEDPORTAL_DEVICE": args.device}
        command = product_processes(python=sys.executable, host="127.0.0.1", port="0")["embed-worker"]
        name_at = command.index("-n") + 1
        rows, vectors = [], {}
        for count in counts:
            version = ModelVersion.objects.create(owner=owner, name=f"workers-{count}", version=1, base_model=artifact,
                                                  artifact_path=artifact, dimensions=dims, dataset=dataset)
            names = [f"embed{count}-{i}" for i in range(1, count + 1)]
            for name in names:
                processes._spawn(name, [*command[:name_at], f"{name}@%h", *command[name_at + 1:]], env=env)
            deadline = time.monotonic() + 300
            while len(app.control.ping(timeout=1.0)) < count:
                processes.check()
                if time.monotonic() > deadline:
                    raise SystemExit(f"{count} embed workers did not answer in 300 s; see {folder}")
            index = indexing.create_index(owner=owner, dataset=dataset, model_version=version)
            while not index.is_terminal:
                time.sleep(1.0)
                processes.check()
                index.refresh_from_db()
            if index.status != SearchIndex.Status.READY:
                raise SystemExit(f"the build with {count} worker(s) ended {index.status}: {index.error}")
            seconds = (index.finished_at - index.created_at).total_seconds()
            chunks = EmbedChunk.objects.filter(index=index)
            per_worker = {}
            for worker in chunks.values_list("worker", flat=True):
                per_worker[worker.split("@")[0]] = per_worker.get(worker.split("@")[0], 0) + 1
            if SearchIndex.objects.exclude(pk=index.pk).exclude(status__in=SearchIndex.TERMINAL).exists():
                raise SystemExit("another index build ran during the measurement")
            rows.append({"workers": count, "index": index.pk, "seconds": round(seconds, 1), "docs_per_s": round(documents / seconds, 2),
                         "chunks": chunks.count(), "chunks_per_worker": per_worker,
                         "load": [round(x, 2) for x in os.getloadavg()]})
            emit(rows[-1])
            stored = dict(Embedding.objects.filter(model_version=version).values_list("document_id", "embedding"))
            vectors[count] = stored
            for name in names:
                proc = processes.procs.pop(name)
                os.killpg(proc.pid, 15)
                proc.wait(timeout=60)
        first = vectors[counts[0]]
        keys = sorted(first)
        reference = np.asarray([first[k] for k in keys], dtype=np.float32)
        figures = {"documents": documents, "chunk_docs": args.chunk_docs, "backend": backend,
                   "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
        for row in rows:
            figures[f"docs_per_s_{row['workers']}_workers"] = row["docs_per_s"]
        for count in counts[1:]:
            other = np.asarray([vectors[count][k] for k in keys], dtype=np.float32)
            cosine = (reference * other).sum(axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
            figures[f"cosine_min_{count}_vs_{counts[0]}"] = round(float(cosine.min()), 6)
        last = counts[-1]
        figures["ratio"] = round(figures[f"docs_per_s_{last}_workers"] / figures[f"docs_per_s_{counts[0]}_workers"], 3)
        targets = {"ratio": ">= 1.7"} if len(counts) > 1 else {}
        targets.update({f"cosine_min_{count}_vs_{counts[0]}": ">= 0.9999" for count in counts[1:]})
        return summary("embed", figures, targets)
    finally:
        processes.stop()
        shutil.rmtree(folder, ignore_errors=True)
