"""The proof of a training run: held-out evaluation before and after, and validation data.

Systems on the TEST split of ../shared/DATA.md: keyword (full text), the base
model, the fine-tuned model, and hybrid (RRF) with each model. The fine-tuned
model's corpus vectors are returned so the caller can store them as the new
version's embeddings instead of encoding the corpus a third time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from search import evaluation as ev
from training.finetune import Validation, load_model
from training.models import Dataset
from training.pairs import Ticket, duplicate_clusters, split_clusters

# Validation corpus: the validation clusters plus this many other tickets as
# distractors, so one validation pass encodes ~2-3k texts instead of the whole
# dataset (20k Hadoop tickets take ~11 min to encode on 2 CPU cores).
VALIDATION_DISTRACTORS = 2000
# Per-query drill-down keeps this many top results per system.
DRILLDOWN_TOP = 5


def _bucket(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10


def validation_split(tickets: list[Ticket]) -> tuple[list[Ticket], Validation | None]:
    """Carve a validation set out of TRAIN duplicate clusters.

    A TRAIN cluster whose min key's sha1 bucket is 3 (the first bucket after
    DATA.md's TEST buckets 0-2) is VALIDATION: its tickets are removed from
    the training tickets and become validation queries. TEST is untouched.
    Returns (tickets to train on, validation set or None when there are no
    such clusters).
    """
    train_clusters, _ = split_clusters(duplicate_clusters(tickets))
    val_clusters = [c for c in train_clusters if _bucket(min(c)) == 3]
    if not val_clusters:
        return tickets, None
    val_keys = {key for cluster in val_clusters for key in cluster}
    by_key = {t.key: t for t in tickets}
    others = sorted((t.key for t in tickets if t.key not in val_keys), key=lambda k: hashlib.sha1(k.encode()).digest())
    corpus_keys = sorted(val_keys) + others[:VALIDATION_DISTRACTORS]
    relevant = {}
    for cluster in val_clusters:
        for key in cluster:
            relevant[key] = set(cluster) - {key}
    validation = Validation(
        queries={key: by_key[key].text for key in sorted(val_keys)},
        corpus={key: by_key[key].text for key in corpus_keys},
        relevant=relevant,
    )
    return [t for t in tickets if t.key not in val_keys], validation


@dataclass
class ModelEvaluation:
    vector: ev.EvalResult
    hybrid: ev.EvalResult
    embeddings: np.ndarray


class HeldOutEvaluation:
    """Evaluate models on a dataset's TEST split, sharing the keyword ranking."""

    def __init__(self, *, dataset: Dataset, log: Callable[[str], None]):
        self.dataset = dataset
        self.log = log
        self.eval_set = ev.ticket_eval_set(dataset=dataset, split="test")
        self._keyword: ev.EvalResult | None = None
        self._models: dict[str, ModelEvaluation] = {}

    @property
    def available(self) -> bool:
        return bool(self.eval_set.queries)

    def keyword(self) -> ev.EvalResult:
        if self._keyword is None:
            self.log(f"evaluating keyword search on {len(self.eval_set.queries)} held-out queries")
            rankings = ev.keyword_rankings(dataset=self.dataset, eval_set=self.eval_set)
            self._keyword = ev.evaluate(rankings, self.eval_set)
        return self._keyword

    def model(self, path: str, *, max_seq_length: int, device: str) -> ModelEvaluation:
        """Vector and hybrid results of one model (cached per path for this evaluation)."""
        if path in self._models:
            return self._models[path]
        self.log(f"encoding {len(self.eval_set.texts)} documents with {path}")
        model = load_model(path, device=device, max_seq_length=max_seq_length)
        embeddings = ev.encode_corpus(model, self.eval_set.texts)
        vector_rankings = ev.vector_rankings(embeddings=embeddings, eval_set=self.eval_set)
        hybrid_rankings = ev.fuse(self.keyword().rankings, vector_rankings)
        result = ModelEvaluation(
            vector=ev.evaluate(vector_rankings, self.eval_set),
            hybrid=ev.evaluate(hybrid_rankings, self.eval_set),
            embeddings=embeddings,
        )
        self._models[path] = result
        return result

    def drilldown(self, before: ev.EvalResult, after: ev.EvalResult) -> list[dict]:
        """Per query: nDCG@10 before/after and the top results of each, biggest changes first."""
        keys = self.eval_set.keys
        rows = []
        for query in self.eval_set.queries:
            b, a = before.per_query[query]["ndcg@10"], after.per_query[query]["ndcg@10"]
            rows.append(
                {
                    "query": keys[query],
                    "relevant": sorted(keys[d] for d in self.eval_set.relevant[query]),
                    "before": round(b, 4),
                    "after": round(a, 4),
                    "delta": round(a - b, 4),
                    "top_before": [keys[d] for d in before.rankings[query] if d != query][:DRILLDOWN_TOP],
                    "top_after": [keys[d] for d in after.rankings[query] if d != query][:DRILLDOWN_TOP],
                }
            )
        rows.sort(key=lambda r: (-abs(r["delta"]), r["query"]))
        return rows
