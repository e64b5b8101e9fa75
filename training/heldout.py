"""The proof of a training run: held-out evaluation before and after, and validation data.

Tickets: systems on the TEST split of ../shared/DATA.md: keyword (BM25, summary weighted: training.bm25), the
base model, the fine-tuned model, plain hybrid (RRF k=60) with each model, and
`served` (the fusion the model's index will serve, tuned on validation
clusters the model never trained on). The fine-tuned model's corpus vectors are
returned so the caller can store them as the new version's embeddings instead
of encoding the corpus a third time. Q&A: held-out questions of TEST answer
groups retrieve their answer, base vs fine-tuned (QAHeldOutEvaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from training import evaluation as ev
from training import priors
from training.finetune import Validation, load_model
from training.fusion import TUNING_MAX_QUERIES, TUNING_METRIC, TUNING_SPLIT, fusion_name
from training.models import Dataset

# Validation corpus: the validation clusters plus this many other tickets as
# distractors, so one validation pass encodes ~2-3k texts instead of the whole
# dataset (20k Hadoop tickets take ~11 min to encode on 2 CPU cores).
VALIDATION_DISTRACTORS = 2000
# Per-query drill-down keeps this many top results per system.
DRILLDOWN_TOP = 5


def validation_from_pairs(rows: list[tuple[str, ...]], distractors: list[str]) -> Validation | None:
    """An information-retrieval validation set from held-out (anchor, positive[, ...]) rows.

    Each anchor is a query whose relevant document is its positive; the
    corpus is the validation positives plus up to VALIDATION_DISTRACTORS texts
    from the training side, so one validation pass encodes a few thousand
    texts rather than the whole dataset.
    """
    if not rows:
        return None
    corpus_ids: dict[str, str] = {}
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for i, row in enumerate(rows):
        anchor, positive = row[0], row[1]
        cid = corpus_ids.setdefault(positive, f"d{len(corpus_ids)}")
        qid = f"q{i}"
        queries[qid] = anchor
        relevant.setdefault(qid, set()).add(cid)
    for text in distractors[:VALIDATION_DISTRACTORS]:
        corpus_ids.setdefault(text, f"d{len(corpus_ids)}")
    return Validation(queries=queries, corpus={cid: text for text, cid in corpus_ids.items()}, relevant=relevant)


@dataclass
class ModelEvaluation:
    vector: ev.EvalResult
    hybrid: ev.EvalResult | None
    embeddings: np.ndarray


class HeldOutEvaluation:
    """Evaluate models on a dataset's TEST split, sharing the keyword ranking."""

    unavailable = ("The dataset has no held-out duplicate clusters (no Duplicate links inside the dataset), "
                   "so there is nothing to evaluate on.")

    def __init__(self, *, dataset: Dataset, log: Callable[[str], None]):
        self.dataset = dataset
        self.log = log
        self.eval_set = ev.ticket_eval_set(dataset=dataset, split="test")
        self._keyword: ev.EvalResult | None = None
        self._models: dict[str, ModelEvaluation] = {}
        self._matrices = None

    @property
    def available(self) -> bool:
        return bool(self.eval_set.queries)

    def keyword(self) -> ev.EvalResult:
        if self._keyword is None:
            self.log(f"evaluating keyword search (BM25) on {len(self.eval_set.queries)} held-out queries")
            rankings = ev.bm25_rankings(dataset=self.dataset, eval_set=self.eval_set, matrices=self._bm25())
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

    def _bm25(self):
        if self._matrices is None:
            self._matrices = ev.bm25_matrices(self.dataset)
        return self._matrices

    def served(self, path: str, *, trained_keys: set[str], max_seq_length: int, device: str) -> dict | None:
        """The `served` system: fusion chosen on the tuning queries, then run on the TEST queries.

        The tuning queries are the TRAIN-cluster tickets none of whose
        cluster was trained on (`trained_keys`: the run's and its ancestors'),
        picked with the same rule and candidates as search.tuning.tune_fusion,
        so the index built from this model serves this fusion. None when there
        are no such queries (the index then keeps RRF k=60, untuned).
        Returns {"system": metrics, "fusion": {..., "queries", "query_keys"}}.
        """
        model = self.model(path, max_seq_length=max_seq_length, device=device)
        tuning_set = ev.ticket_eval_set(dataset=self.dataset, split="tuning", trained_keys=trained_keys)
        tuning_set.queries = ev.sample_queries(tuning_set.queries, TUNING_MAX_QUERIES)
        if not tuning_set.queries:
            return None
        self.log(f"tuning the fusion on {len(tuning_set.queries)} queries of untrained TRAIN clusters")
        keyword = ev.bm25_scored_rankings(dataset=self.dataset, eval_set=tuning_set, matrices=self._bm25())
        vector = ev.vector_scored_rankings(embeddings=model.embeddings, eval_set=tuning_set)
        learned = ev.learn_prior(dataset=self.dataset, matrices=self._bm25())
        if learned is not None:
            self.log(f"ticket prior learned on {learned['queries']} TRAIN-cluster queries (keyword side): "
                     f"{priors.describe(learned)}")
        fusion, table = ev.choose_fusion(keyword, vector, eval_set=tuning_set, prior=learned)
        test_keyword = ev.bm25_scored_rankings(dataset=self.dataset, eval_set=self.eval_set, matrices=self._bm25())
        test_vector = ev.vector_scored_rankings(embeddings=model.embeddings, eval_set=self.eval_set)
        result = ev.evaluate(ev.fused_rankings(test_keyword, test_vector, fusion=fusion, eval_set=self.eval_set),
                             self.eval_set)
        return {
            "system": result.summary(),
            "fusion": {**fusion, "metric": TUNING_METRIC, "split": TUNING_SPLIT, "queries": len(tuning_set.queries),
                       "query_keys": sorted(tuning_set.keys[q] for q in tuning_set.queries),
                       "tuning_ndcg@10": table[fusion_name(fusion)][TUNING_METRIC], "learned_prior": learned},
        }

    def before_systems(self, base: ModelEvaluation) -> dict[str, dict]:
        """The table's rows known before training: keyword, base model, plain hybrid with it."""
        return {"keyword": self.keyword().summary(), "base": base.vector.summary(),
                "hybrid_base": base.hybrid.summary()}

    def after_systems(self, tuned: ModelEvaluation) -> dict[str, dict]:
        return {"fine_tuned": tuned.vector.summary(), "hybrid_fine_tuned": tuned.hybrid.summary()}

    def stored_embeddings(self, tuned: ModelEvaluation):
        """(document ids, vectors) the new version keeps as its search vectors."""
        return self.eval_set.doc_ids, tuned.embeddings

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


class QAHeldOutEvaluation:
    """A Q&A run's proof: held-out questions (and paraphrases) of TEST answer groups retrieve their answer.

    The split is the one the run's pairs come from (training.pairs.answer_group
    + group_split, the run's seed), so no held-out answer was trained on. The
    corpus is every distinct answer. Systems: the base and the fine-tuned
    model (exact cosine); there is no keyword row (the keyword side indexes
    documents, not answers) and no `served` row (an index serves documents).
    Same table, drill-down and promotion guard as ticket runs
    (evaluation.scores_from_run reads per_query).
    """

    unavailable = ("The dataset has no held-out answer groups (too few distinct answers), so there is "
                   "nothing to evaluate on.")

    def __init__(self, *, dataset: Dataset, seed: int, log: Callable[[str], None]):
        from training.datasets import dataset_examples

        self.dataset = dataset
        self.log = log
        self.eval_set = ev.qa_eval_set(examples=dataset_examples(dataset), seed=seed)
        self._models: dict[str, ModelEvaluation] = {}

    @property
    def available(self) -> bool:
        return bool(self.eval_set.queries)

    def model(self, path: str, *, max_seq_length: int, device: str) -> ModelEvaluation:
        if path in self._models:
            return self._models[path]
        self.log(f"encoding {len(self.eval_set.texts)} answers and {len(self.eval_set.queries)} held-out "
                 f"questions with {path}")
        model = load_model(path, device=device, max_seq_length=max_seq_length)
        embeddings = ev.encode_corpus(model, self.eval_set.texts)
        rankings = ev.text_query_rankings(model=model, eval_set=self.eval_set, embeddings=embeddings)
        result = ModelEvaluation(vector=ev.evaluate(rankings, self.eval_set), hybrid=None, embeddings=embeddings)
        self._models[path] = result
        return result

    def before_systems(self, base: ModelEvaluation) -> dict[str, dict]:
        return {"base": base.vector.summary()}

    def after_systems(self, tuned: ModelEvaluation) -> dict[str, dict]:
        return {"fine_tuned": tuned.vector.summary()}

    def stored_embeddings(self, tuned: ModelEvaluation):
        return None  # answers are not the dataset's documents: the index build embeds those

    def served(self, *args, **kwargs) -> None:
        return None

    drilldown = HeldOutEvaluation.drilldown


def for_run(*, dataset: Dataset, strategy: str, seed: int, log: Callable[[str], None]):
    """The held-out evaluation a run of this strategy gets (tickets, Q&A), or None (pairs, triplets, labels)."""
    if dataset.kind == Dataset.Kind.TICKETS:
        return HeldOutEvaluation(dataset=dataset, log=log)
    if strategy == "qa":
        return QAHeldOutEvaluation(dataset=dataset, seed=seed, log=log)
    return None
