"""Ticket priors: what a ticket's Jira fields say about another ticket being its duplicate, before any text is read.

Duplicates of a ticket are mostly filed close to it in time (on the shared
Hadoop file half of the 1,007 Duplicate pairs were filed within 51 days of
each other, in a file spanning 13 years), in the same component (73% of the
pairs where both have one, against 5% of random pairs) and the same project
(87% against 26%). Duplicate-bug-report retrieval has used such fields next
to the text since Sun et al. (REP, ASE 2011: BM25F plus product, component,
type, priority and version) and Alipour et al.'s time windows.

A candidate's prior, for a query ticket q and a candidate d:
    filed * closeness(|created(q) - created(d)|)
  + component * [q and d share a component]
  + project * [same project: key prefix before the last "-"]
closeness = 1 - log(1 + days) / log(1 + FILED_HORIZON_DAYS), at least 0.
The three weights are learned per dataset, on its own TRAIN duplicate
clusters with the keyword side alone (learn_weights: no model is involved,
so nothing the model trained on leaks into them); how much of the prior joins
the served fusion is then tuned with the fusion on the untrained validation
clusters (training.evaluation.choose_fusion). A dataset whose Duplicate
links show no such pattern learns zero weights and serves no prior. A field
that is missing or unreadable on either side adds nothing.

Pure functions: shared by the held-out evaluation (training.evaluation) and
serving (search.hybrid.similar_documents).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import product
from typing import Any

# Beyond ten years apart, filing dates say nothing.
FILED_HORIZON_DAYS = 3650
# The weights tried on the TRAIN clusters (each against min-max BM25 scores in [0, 1]); the
# first of the best wins, and the all-zero triple comes first, so no pattern means no prior.
FILED_WEIGHTS = (0.0, 0.4, 0.8, 1.2, 1.6)
COMPONENT_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4)
PROJECT_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4)
# TRAIN-cluster queries the weights are learned on, at most (evenly spaced): ~5 ms each.
LEARNING_MAX_QUERIES = 1000
# Components compared per ticket, at most (a bound on a field users fill).
MAX_COMPONENTS = 50
FEATURES = ("filed", "component", "project")


@dataclass(frozen=True)
class Facts:
    """The fields of one ticket the prior reads: filing day, components, project."""

    day: float | None = None  # days since 1970-01-01 (UTC), None when unknown
    components: frozenset[str] = frozenset()
    project: str = ""


def parse_day(value: Any) -> float | None:
    """Days since the epoch of an ISO 8601 date or date-time ("2013-05-02T10:11:12.000+0000"), None otherwise."""
    if not isinstance(value, str) or not 10 <= len(value.strip()) <= 64:
        return None
    text = value.strip()
    for candidate in (text, text[:19], text[:10]):
        try:
            moment = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp() / 86400.0
    return None


def facts(key: str, metadata: Any) -> Facts:
    """A ticket's Facts from its key and stored metadata (anything unreadable is left unknown)."""
    metadata = metadata if isinstance(metadata, Mapping) else {}
    components = metadata.get("components")
    names = frozenset(
        c.strip().lower() for c in (components[:MAX_COMPONENTS] if isinstance(components, list) else [])
        if isinstance(c, str) and c.strip()
    )
    key = key if isinstance(key, str) else ""
    project = key.rsplit("-", 1)[0].upper() if "-" in key else ""
    return Facts(day=parse_day(metadata.get("created")), components=names, project=project)


def closeness(a: Facts, b: Facts) -> float:
    """1 for the same day, falling with the log of the days between them, 0 at FILED_HORIZON_DAYS or unknown."""
    if a.day is None or b.day is None:
        return 0.0
    return max(0.0, 1.0 - math.log1p(abs(a.day - b.day)) / math.log1p(FILED_HORIZON_DAYS))


def features(query: Facts, doc: Facts) -> tuple[float, float, float]:
    """(filed closeness, shared component, same project) of a candidate for a query ticket."""
    return (
        closeness(query, doc),
        1.0 if query.components & doc.components else 0.0,
        1.0 if query.project and query.project == doc.project else 0.0,
    )


def prior(query: Facts, doc: Facts, weights: Mapping[str, float]) -> float:
    """The weighted sum of a candidate's features (weights as learn_weights returns them)."""
    return sum(float(weights.get(name, 0.0)) * value for name, value in zip(FEATURES, features(query, doc)))


def is_active(weights: Mapping[str, Any] | None) -> bool:
    return bool(weights) and any(float(weights.get(name, 0.0)) > 0 for name in FEATURES)


def describe(weights: Mapping[str, Any] | None) -> str:
    """'filed 0.8, component 0.2, project 0.1' (the non-zero weights), or 'none'."""
    if not is_active(weights):
        return "none"
    return ", ".join(f"{name} {float(weights[name]):g}" for name in FEATURES if float(weights.get(name, 0.0)) > 0)


def weight_grid() -> list[dict[str, float]]:
    return [dict(zip(FEATURES, triple)) for triple in product(FILED_WEIGHTS, COMPONENT_WEIGHTS, PROJECT_WEIGHTS)]


def min_max(scores: Sequence[float]) -> list[float]:
    """Scores rescaled to [0, 1] within one list; equal scores map to 1."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    span = high - low
    return [1.0 if span <= 0 else (s - low) / span for s in scores]


def rerank(
    scored: Sequence[tuple[Hashable, float]], priors: Sequence[float], *, weight: float = 1.0
) -> list[tuple[Hashable, float]]:
    """A scored list re-ordered by min-max(score) + weight * prior; ties keep the list's order."""
    normalised = min_max([s for _, s in scored])
    combined = [(item, n + weight * p) for (item, _), n, p in zip(scored, normalised, priors)]
    order = {item: i for i, (item, _) in enumerate(scored)}
    return sorted(combined, key=lambda kv: (-kv[1], order[kv[0]]))
