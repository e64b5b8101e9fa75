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
    args = parser.parse_args(argv)
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
