"""One table of search filters: SQL conditions, facet counts, API/form parameters and labels come from it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from django.core.cache import cache
from django.db import connection

from embedportal.errors import ServiceError
from search.models import Cluster, ClusteringRun
from training.models import Dataset, Document


@dataclass(frozen=True)
class Filter:
    """One filterable attribute of a document (values kept in Document.metadata)."""

    param: str  # query parameter and form field: issue_type=Bug&issue_type=Task
    key: str  # metadata key
    label: str  # shown on the search page
    many: bool = False  # metadata holds a list (components, labels)
    # Where the values live: "metadata" (Document.metadata[key]) or "cluster"
    # (ids of search.Cluster rows; a document matches through its ClusterAssignment).
    source: str = "metadata"

    @property
    def integer(self) -> bool:
        """Values are ids (whole numbers), not text."""
        return self.source == "cluster"


# Q&A importers store the row's class/category as metadata.label.
FILTERS: tuple[Filter, ...] = (
    Filter("issue_type", "issue_type", "Issue type"),
    Filter("priority", "priority", "Priority"),
    Filter("status", "status", "Status"),
    Filter("resolution", "resolution", "Resolution"),
    Filter("component", "components", "Component", many=True),
    Filter("label", "labels", "Label", many=True),
    Filter("category", "label", "Category"),
    Filter("cluster", "", "Cluster", many=True, source="cluster"),
)
FILTER_PARAMS = tuple(f.param for f in FILTERS)
# Largest id a filter value may be (PostgreSQL bigint): a bigger number is refused, not sent to the database.
MAX_ID = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")
# Tickets keep their creation time in metadata.created, Q&A rows in metadata.date (ISO strings).
_DATE_SQL = "left(coalesce(d.metadata->>'created', d.metadata->>'date'), 10)"


@dataclass(frozen=True)
class SearchFilters:
    """Attribute filters: param -> values (any of them matches), plus an inclusive created-date range."""

    values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    created_from: date | None = None
    created_to: date | None = None

    @classmethod
    def of(cls, *, created_from: date | None = None, created_to: date | None = None, **values) -> SearchFilters:
        """SearchFilters.of(priority=("Blocker",), component=("yarn",)); unknown names are refused."""
        unknown = set(values) - set(FILTER_PARAMS)
        if unknown:
            raise ValueError(f"unknown filters: {', '.join(sorted(unknown))}")
        for f in FILTERS:
            if f.integer and values.get(f.param):
                values[f.param] = tuple(_whole(f.param, v) for v in values[f.param])
        return cls({k: tuple(v) for k, v in values.items() if v}, created_from, created_to)

    def sql(self) -> tuple[str, list[Any]]:
        """' AND ...' conditions on alias d and their parameters (values are always bound)."""
        parts: list[str] = []
        params: list[Any] = []
        for f in FILTERS:
            chosen = self.values.get(f.param)
            if chosen and f.source == "cluster":
                parts.append("d.id IN (SELECT ca.document_id FROM search_clusterassignment ca "
                             "WHERE ca.cluster_id = ANY(%s))")
                params.append([int(v) for v in chosen])
            elif chosen:
                # The metadata key is ours (from FILTERS), bound anyway.
                parts.append("d.metadata->%s ?| %s" if f.many else "d.metadata->>%s = ANY(%s)")
                params.extend([f.key, list(chosen)])
        if self.created_from:
            parts.append(f"{_DATE_SQL} >= %s")
            params.append(self.created_from.isoformat())
        if self.created_to:
            parts.append(f"{_DATE_SQL} <= %s")
            params.append(self.created_to.isoformat())
        return "".join(f" AND {p}" for p in parts), params

    @property
    def is_empty(self) -> bool:
        return not self.sql()[1]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.param: list(self.values[f.param]) for f in FILTERS if self.values.get(f.param)}
        if self.created_from:
            out["created_from"] = self.created_from.isoformat()
        if self.created_to:
            out["created_to"] = self.created_to.isoformat()
        return out


def _whole(param: str, value: Any) -> int:
    """A filter id as an int; ServiceError naming the parameter when it is not one."""
    text = str(value).strip()
    if isinstance(value, bool) or not _DIGITS.fullmatch(text) or len(text) > 19 or not 1 <= int(text) <= MAX_ID:
        raise ServiceError(f"{param}: must be ids (whole numbers from 1), got {str(value)[:40]!r}.")
    return int(text)


def filter_options(*, dataset: Dataset) -> dict[str, list[tuple[str, int, str]]]:
    """param -> (value, count, label) of each filterable attribute, most frequent first, for the search form.

    One GROUP BY per metadata attribute, cached for 5 minutes per dataset and
    document count (~40 ms for 20k tickets); the clusters of the dataset's
    current clustering (its latest finished run) are read each time (one small
    query), since a rename or a new run changes them. The label is the value
    itself, or a cluster's name.
    """
    total = Document.objects.filter(dataset=dataset).count()
    cache_key = f"search:filter-options:v3:{dataset.pk}:{total}"
    cached = cache.get(cache_key)
    if cached is None:
        cached = _metadata_options(dataset)
        cache.set(cache_key, cached, 300)
    return {**cached, "cluster": _cluster_options(dataset)}


def _cluster_options(dataset: Dataset) -> list[tuple[str, int, str]]:
    latest = (ClusteringRun.objects.filter(dataset=dataset, status=ClusteringRun.Status.SUCCEEDED)
              .order_by("-created_at", "-id").values("pk")[:1])
    clusters = Cluster.objects.filter(run__in=latest).order_by("-size", "number")
    return [(str(c.pk), c.size, c.label) for c in clusters]


def _metadata_options(dataset: Dataset) -> dict[str, list[tuple[str, int, str]]]:
    out: dict[str, list[tuple[str, int, str]]] = {}
    with connection.cursor() as cursor:
        for f in FILTERS:
            if f.source != "metadata":
                continue
            if f.many:
                cursor.execute(
                    "SELECT v, count(*) FROM training_document d, jsonb_array_elements_text(d.metadata->%s) AS v "
                    "WHERE d.dataset_id = %s AND jsonb_typeof(d.metadata->%s) = 'array' "
                    "GROUP BY v ORDER BY count(*) DESC, v LIMIT 200",
                    [f.key, dataset.pk, f.key],
                )
            else:
                cursor.execute(
                    "SELECT d.metadata->>%s AS v, count(*) FROM training_document d WHERE d.dataset_id = %s "
                    "AND coalesce(d.metadata->>%s, '') <> '' GROUP BY v ORDER BY count(*) DESC, v LIMIT 200",
                    [f.key, dataset.pk, f.key],
                )
            out[f.param] = [(v, n, v) for v, n in cursor.fetchall()]
    return out
