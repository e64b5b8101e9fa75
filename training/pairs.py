"""Training pairs and the held-out split for ticket datasets.

The split follows ../shared/DATA.md so figures compare: duplicate clusters are
the connected components of `Duplicate` links with both ends in the dataset;
a cluster is TEST when int(sha1(min key).hexdigest(), 16) % 10 < 3. Only
TRAIN clusters, and tickets with no duplicate link, feed training pairs.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

DUPLICATE_LINK = "duplicate"
# Descriptions shorter than this carry too little to be a useful positive.
MIN_SELF_PAIR_BODY_CHARS = 30
# The description side of a self-supervised pair is cut to this many characters:
# MiniLM's window is 256 tokens, so longer text is truncated by the tokenizer anyway.
MAX_PAIR_TEXT_CHARS = 2000


@dataclass(frozen=True)
class Ticket:
    key: str
    title: str
    body: str
    links: tuple[tuple[str, str], ...]  # (link type lowercased, other key)

    @property
    def text(self) -> str:
        return f"{self.title}\n{self.body}" if self.body else self.title


def duplicate_clusters(tickets: Sequence[Ticket]) -> list[list[str]]:
    """Connected components (size >= 2) of Duplicate links inside the set, keys sorted."""
    keys = {t.key for t in tickets}
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for t in tickets:
        for link_type, other in t.links:
            if link_type == DUPLICATE_LINK and other in keys and other != t.key:
                ra, rb = find(t.key), find(other)
                if ra != rb:
                    parent[ra] = rb
    groups: dict[str, list[str]] = {}
    for key in parent:
        groups.setdefault(find(key), []).append(key)
    return sorted((sorted(g) for g in groups.values() if len(g) >= 2), key=lambda g: g[0])


def is_test_cluster(cluster: Sequence[str]) -> bool:
    return int(hashlib.sha1(min(cluster).encode()).hexdigest(), 16) % 10 < 3


def split_clusters(clusters: Iterable[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """(train, test) clusters per the shared/DATA.md rule."""
    train, test = [], []
    for cluster in clusters:
        (test if is_test_cluster(cluster) else train).append(cluster)
    return train, test


def build_ticket_pairs(
    tickets: Sequence[Ticket], *, include_self_pairs: bool = True, max_pairs: int | None = None, seed: int = 42
) -> list[tuple[str, str]]:
    """(anchor, positive) pairs from TRAIN duplicate clusters plus summary -> description.

    Duplicate pairs: every ordered pair inside a TRAIN cluster, anchor = summary,
    positive = summary + description of the other ticket. Self pairs: a ticket's
    summary -> its description, for tickets not in a TEST cluster; they let a
    dataset with no links at all still be trained on. Duplicate pairs are kept
    first when `max_pairs` cuts the list.
    """
    by_key = {t.key: t for t in tickets}
    train_clusters, test_clusters = split_clusters(duplicate_clusters(tickets))
    held_out = {key for cluster in test_clusters for key in cluster}

    dup_pairs = []
    for cluster in train_clusters:
        for a in cluster:
            for b in cluster:
                if a != b:
                    dup_pairs.append((by_key[a].title, by_key[b].text[:MAX_PAIR_TEXT_CHARS]))

    self_pairs = []
    if include_self_pairs:
        for t in tickets:
            if t.key not in held_out and len(t.body) >= MIN_SELF_PAIR_BODY_CHARS:
                self_pairs.append((t.title, t.body[:MAX_PAIR_TEXT_CHARS]))

    rng = random.Random(seed)
    rng.shuffle(dup_pairs)
    rng.shuffle(self_pairs)
    pairs = dup_pairs + self_pairs
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    rng.shuffle(pairs)
    return pairs
