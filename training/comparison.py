"""Training runs side by side: which settings differ, and their validation and held-out figures.

Validation nDCG@10 is measured during training on the validation split (a
seeded share of the TRAIN duplicate clusters or Q&A groups, held back from the
training pairs; it picks the checkpoint). Held-out nDCG@10 is measured after
training on the TEST split, which no run trains or selects on: the figure to
compare models by. The page and this module keep the two apart by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from training.models import TrainingRun

# Held-out metrics shown per run (the fine-tuned model on the TEST split).
HELD_OUT_METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "map@100")
# Held-out nDCG@10 of the other systems of the same evaluation, for context.
HELD_OUT_SYSTEMS = (("base", "base model"), ("hybrid_fine_tuned", "hybrid with the fine-tuned model"),
                    ("keyword", "keyword (BM25)"))


@dataclass
class Row:
    """One line of the comparison: a label and one value per run (None: the run has none)."""

    label: str
    values: list[Any]
    differs: bool = False
    best: int | None = None  # index of the best value (metrics, higher is better) when they differ


@dataclass
class Comparison:
    runs: list[TrainingRun]
    settings: list[Row] = field(default_factory=list)
    validation: list[Row] = field(default_factory=list)
    held_out: list[Row] = field(default_factory=list)

    @property
    def differing(self) -> int:
        return sum(1 for row in self.settings if row.differs)


def _shown(value: Any) -> str:
    """A setting as compared and shown: lists and dicts as JSON, None as "–"."""
    if value is None:
        return "–"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _metric_row(label: str, values: list[Any]) -> Row:
    numbers = [v if isinstance(v, (int, float)) else None for v in values]
    present = [v for v in numbers if v is not None]
    differs = len(set(present)) > 1
    best = numbers.index(max(present)) if differs else None
    return Row(label, numbers, differs=differs, best=best)


def held_out_ndcg(run: TrainingRun) -> float | None:
    """The fine-tuned model's nDCG@10 on the held-out TEST split, None before the run has evaluated it."""
    return ((run.evaluation or {}).get("systems", {}).get("fine_tuned") or {}).get("ndcg@10")


def compare_runs(*, runs: Iterable[TrainingRun]) -> Comparison:
    """The settings of the runs (base model, dataset, every hyperparameter set on any of them; `differs`
    when they are not all equal), their validation figures and their held-out figures, side by side."""
    runs = list(runs)
    result = Comparison(runs=runs)
    names = sorted({name for run in runs for name in (run.hyperparameters or {})})
    rows = [("dataset", [run.dataset.name for run in runs]), ("base model", [run.base_model for run in runs])]
    rows += [(name, [(run.hyperparameters or {}).get(name) for run in runs]) for name in names]
    for label, values in rows:
        shown = [_shown(v) for v in values]
        result.settings.append(Row(label, shown, differs=len(set(shown)) > 1))
    metrics = [run.metrics or {} for run in runs]
    result.validation = [
        _metric_row("best validation nDCG@10", [m.get("best_validation_ndcg") for m in metrics]),
        _metric_row("validation checks", [len(m.get("validation_history") or []) or None for m in metrics]),
        _metric_row("final training loss", [m.get("final_loss", m.get("loss")) for m in metrics]),
    ]
    result.validation[2].best = None  # lower loss is not "best" across runs of other data or losses
    systems = [(run.evaluation or {}).get("systems", {}) for run in runs]
    result.held_out = [_metric_row(f"held-out {name}", [s.get("fine_tuned", {}).get(name) for s in systems])
                       for name in HELD_OUT_METRICS]
    result.held_out += [_metric_row(f"held-out nDCG@10, {label}", [s.get(system, {}).get("ndcg@10") for s in systems])
                        for system, label in HELD_OUT_SYSTEMS]
    return result
