"""Training pairs and the held-out split, for every kind of dataset.

Tickets follow ../shared/DATA.md so figures compare: duplicate clusters are
the connected components of `Duplicate` links with both ends in the dataset;
a cluster is TEST when int(sha1(min key).hexdigest(), 16) % 10 < 3. Only
TRAIN clusters, and tickets with no duplicate link, feed training pairs.
`build_pairs` also carves a validation share out of TRAIN (by cluster, by
seed), so no cluster crosses splits.

Other kinds split by group: a Q&A answer (or its group column), an anchor
text for pairs and triplets, a label for text + label rows. A group's split
depends only on the group and the seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from training.corpus import ticket_text

DUPLICATE_LINK = "duplicate"
# Descriptions shorter than this carry too little to be a useful positive.
MIN_SELF_PAIR_BODY_CHARS = 30
# The description side of a self-supervised pair is cut to this many characters:
# MiniLM's window is 256 tokens, so longer text is truncated by the tokenizer anyway.
MAX_PAIR_TEXT_CHARS = 2000
VALIDATION_SHARE = 0.1
TEST_SHARE = 0.3  # matches the tickets rule (sha1 % 10 < 3)
# A pair with a score below this (0/1 similarity labels, cosine scores) is not a positive.
MIN_POSITIVE_SCORE = 0.5
# Below this many labels, splitting text + label rows by label would leave the
# training split without negatives; such datasets split by row instead.
MIN_LABELS_FOR_LABEL_SPLIT = 5
STRATEGIES = {
    "tickets": "Tickets: duplicate links, optional other links and same component/type, summary -> description",
    "qa": "Q&A: question -> answer, paraphrase -> question, questions sharing an answer",
    "labels": "Text + label: triplets (same label positive, other label negative)",
    "pairs": "Training-ready pairs (anchor, positive[, score])",
    "triplets": "Training-ready triplets (anchor, positive, negative)",
}
DEFAULT_STRATEGY = {"tickets": "tickets", "qa": "qa", "pairs": "pairs", "triplets": "triplets", "labelled": "labels"}
WEAK_POSITIVES = ("", "component", "issue_type")
# The anchor of a ticket duplicate pair (training.hyperparameters.Hyperparameters.duplicate_anchor).
DUPLICATE_ANCHORS = ("title", "both")


@dataclass(frozen=True)
class Ticket:
    key: str
    title: str
    body: str
    links: tuple[tuple[str, str], ...]  # (link type lowercased, other key)
    issue_type: str = ""
    components: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return ticket_text(self.title, self.body)


@dataclass(frozen=True)
class Example:
    """A row of a Q&A, pairs, triplets or text + label dataset."""

    key: str
    title: str  # question / anchor / text
    body: str = ""  # answer / positive
    label: str = ""
    group: str = ""
    negative: str = ""
    score: float | None = None
    paraphrases: tuple[str, ...] = ()


@dataclass(frozen=True)
class HardNegatives:
    """How to mine hard negatives with a model (sentence_transformers.util.mine_hard_negatives).

    range_min skips the closest candidates, which on tickets are often
    unlinked true duplicates; relative_margin keeps a negative only if it
    scores at least that share below the positive.
    """

    model: str
    range_min: int = 10
    range_max: int = 50
    relative_margin: float | None = 0.05
    batch_size: int = 64


@dataclass
class PairSet:
    strategy: str
    columns: tuple[str, ...]
    train: list[tuple[str, ...]]
    validation: list[tuple[str, ...]]
    counts: dict[str, int] = field(default_factory=dict)
    # Groups (clusters, answers, labels, ...) per split, and test queries for tickets.
    split: dict[str, int] = field(default_factory=dict)
    # Tickets: the keys whose duplicate or link pairs are in `train` (fusion is tuned on none of them).
    trained_keys: list[str] = field(default_factory=list)

    def as_dict(self, *, sample: int = 0, seed: int = 0) -> dict[str, Any]:
        rows = random.Random(seed).sample(self.train, min(sample, len(self.train))) if sample else []
        return {
            "strategy": self.strategy,
            "columns": list(self.columns),
            "train_examples": len(self.train),
            "validation_examples": len(self.validation),
            "counts": self.counts,
            "split": self.split,
            "sample": [dict(zip(self.columns, (text[:500] for text in row))) for row in rows],
        }


# --- The DATA.md ticket protocol -------------------------------------------------------


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


def _bucket(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by the text and the seed."""
    return int(hashlib.sha1(f"{seed}\x1f{text}".encode("utf-8", "surrogatepass")).hexdigest()[:12], 16) / 16**12


def group_split(group: str, *, seed: int, validation: float = VALIDATION_SHARE, test: float = TEST_SHARE) -> str:
    """"train", "validation" or "test" for a group, deterministic given the seed."""
    value = _bucket(group, seed)
    if value < test:
        return "test"
    if value < test + validation:
        return "validation"
    return "train"


def ticket_cluster_split(cluster: Sequence[str], *, seed: int, validation: float = VALIDATION_SHARE) -> str:
    """DATA.md decides test; a seeded share of the TRAIN clusters becomes validation."""
    if is_test_cluster(cluster):
        return "test"
    return "validation" if _bucket(min(cluster), seed) < validation else "train"


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


# --- Strategies -------------------------------------------------------------------------


def build_pairs(
    *,
    dataset=None,
    strategy: str = "",
    tickets: Sequence[Ticket] | None = None,
    examples: Sequence[Example] | None = None,
    seed: int = 42,
    max_pairs: int | None = None,
    link_types: Sequence[str] = (DUPLICATE_LINK,),
    include_self_pairs: bool = True,
    weak_positives: str = "",
    weak_per_ticket: int = 1,
    include_paraphrases: bool = True,
    hard_negatives: HardNegatives | None = None,
    duplicate_anchor: str = "title",
) -> PairSet:
    """Training examples of a dataset (or of given tickets/examples) with one strategy.

    strategy "" takes the dataset kind's default. Training examples come from
    the train split only; the validation split is returned apart; the test
    split is never used. Duplicate/link pairs are kept before weaker ones when
    max_pairs cuts the list. With hard_negatives, pairs become (anchor,
    positive, negative) triplets mined with that model (pairs for which no
    negative passes the margin are dropped and counted). duplicate_anchor
    "both" makes one direction of each ticket duplicate pair text -> text
    (see Hyperparameters.duplicate_anchor).
    """
    if dataset is not None:
        from training.datasets import dataset_examples, dataset_tickets

        strategy = strategy or DEFAULT_STRATEGY.get(dataset.kind, "")
        if strategy == "tickets":
            tickets = dataset_tickets(dataset)
        else:
            examples = dataset_examples(dataset)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not one of {', '.join(sorted(STRATEGIES))}.")
    if strategy == "tickets":
        if weak_positives not in WEAK_POSITIVES:
            raise ValueError(f"weak_positives: {weak_positives!r} is not one of component, issue_type.")
        if duplicate_anchor not in DUPLICATE_ANCHORS:
            raise ValueError(f"duplicate_anchor: {duplicate_anchor!r} is not one of {', '.join(DUPLICATE_ANCHORS)}.")
        result = _ticket_pairs(list(tickets or []), seed=seed, link_types=link_types,
                               include_self_pairs=include_self_pairs, weak_positives=weak_positives,
                               weak_per_ticket=weak_per_ticket, duplicate_anchor=duplicate_anchor)
    elif strategy == "qa":
        result = _qa_pairs(list(examples or []), seed=seed, include_paraphrases=include_paraphrases)
    elif strategy == "labels":
        result = _label_triplets(list(examples or []), seed=seed)
    else:
        result = _ready_pairs(list(examples or []), seed=seed, triplets=strategy == "triplets")
    rng = random.Random(seed)
    if max_pairs is not None:
        result.train = result.train[:max_pairs]
    if hard_negatives is not None and result.columns == ("anchor", "positive"):
        groups = _text_groups(strategy, tickets=tickets, examples=examples, seed=seed)
        result.train, mined = mine_hard_negatives(pairs=result.train, options=hard_negatives, text_groups=groups)
        result.columns = ("anchor", "positive", "negative")
        result.counts.update(mined)
    rng.shuffle(result.train)
    result.counts["train_examples"] = len(result.train)
    result.counts["validation_examples"] = len(result.validation)
    return result


def preview_pairs(*, dataset, strategy: str = "", sample: int = 10, seed: int = 42, **options: Any) -> dict[str, Any]:
    """Counts and a random sample of the training examples a run would get (no hard negatives)."""
    options.pop("hard_negatives", None)
    pair_set = build_pairs(dataset=dataset, strategy=strategy, seed=seed, **options)
    return pair_set.as_dict(sample=sample, seed=seed)


def _ticket_pairs(tickets, *, seed, link_types, include_self_pairs, weak_positives, weak_per_ticket,
                  duplicate_anchor="title") -> PairSet:
    by_key = {t.key: t for t in tickets}
    clusters = duplicate_clusters(tickets)
    split_of: dict[str, str] = {}
    split_counts = {"train": 0, "validation": 0, "test": 0}
    for cluster in clusters:
        where = ticket_cluster_split(cluster, seed=seed)
        split_counts[where] += 1
        for key in cluster:
            split_of[key] = where
    train: list[tuple[str, str]] = []
    validation: list[tuple[str, str]] = []
    counts: dict[str, int] = {}

    def add(where: str, source: str, pair: tuple[str, str]) -> None:
        if where == "test":
            return
        (train if where == "train" else validation).append(pair)
        if where == "train":
            counts[source] = counts.get(source, 0) + 1

    rng = random.Random(seed)
    strong: list[tuple[str, str]] = []
    for cluster in clusters:
        where = split_of[cluster[0]]
        for a in cluster:
            for b in cluster:
                if a != b:
                    # "both": the pair's second direction asks with the whole ticket (text -> text).
                    whole = duplicate_anchor == "both" and a > b
                    anchor = by_key[a].text[:MAX_PAIR_TEXT_CHARS] if whole else by_key[a].title
                    add(where, "duplicate", (anchor, by_key[b].text[:MAX_PAIR_TEXT_CHARS]))
    # Other link types: both ends outside TEST (and in the same split), so no text crosses.
    extra_types = {t.lower() for t in link_types} - {DUPLICATE_LINK}
    linked: set[str] = set()
    if extra_types:
        seen: set[tuple[str, str]] = set()
        for t in tickets:
            for link_type, other in t.links:
                if link_type not in extra_types or other not in by_key or other == t.key:
                    continue
                pair_key = (min(t.key, other), max(t.key, other))
                if pair_key in seen:
                    continue
                seen.add(pair_key)
                where_a, where_b = split_of.get(t.key, "train"), split_of.get(other, "train")
                if where_a != where_b:
                    continue
                add(where_a, f"link:{link_type}", (t.title, by_key[other].text[:MAX_PAIR_TEXT_CHARS]))
                if where_a == "train":
                    linked.update((t.key, other))
    strong = list(train)
    weak: list[tuple[str, str]] = []
    if weak_positives:
        buckets: dict[str, list[Ticket]] = {}
        for t in tickets:
            if split_of.get(t.key, "train") != "train":
                continue
            values = t.components if weak_positives == "component" else ((t.issue_type,) if t.issue_type else ())
            for value in values:
                buckets.setdefault(value, []).append(t)
        for t in tickets:
            if split_of.get(t.key, "train") != "train":
                continue
            values = t.components if weak_positives == "component" else ((t.issue_type,) if t.issue_type else ())
            candidates = [o for value in values for o in buckets.get(value, []) if o.key != t.key]
            for other in rng.sample(candidates, min(weak_per_ticket, len(candidates))):
                weak.append((t.title, other.text[:MAX_PAIR_TEXT_CHARS]))
        counts[f"same_{weak_positives}"] = len(weak)
    self_pairs: list[tuple[str, str]] = []
    if include_self_pairs:
        for t in tickets:
            where = split_of.get(t.key, "train")
            if len(t.body) >= MIN_SELF_PAIR_BODY_CHARS and where != "test":
                pair = (t.title, t.body[:MAX_PAIR_TEXT_CHARS])
                if where == "train":
                    self_pairs.append(pair)
                else:
                    validation.append(pair)
        counts["self"] = len(self_pairs)
    rng.shuffle(strong)
    rng.shuffle(weak)
    rng.shuffle(self_pairs)
    split = {f"{k}_clusters": v for k, v in split_counts.items()}
    split["test_queries"] = sum(1 for where in split_of.values() if where == "test")
    split["tickets"] = len(tickets)
    trained = linked | {key for key, where in split_of.items() if where == "train"}
    return PairSet("tickets", ("anchor", "positive"), strong + weak + self_pairs, validation, counts, split,
                   trained_keys=sorted(trained))


def answer_group(example: Example) -> str:
    """A Q&A row's group: its group column, else its answer (whitespace and case folded), so the
    questions of one answer always land in one split (training.evaluation.qa_eval_set relies on it)."""
    if example.group:
        return example.group
    return "a-" + hashlib.sha1(" ".join(example.body.lower().split()).encode("utf-8", "surrogatepass")).hexdigest()


def _qa_pairs(examples: Sequence[Example], *, seed: int, include_paraphrases: bool) -> PairSet:
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(answer_group(example), []).append(example)
    out = {"train": [], "validation": []}
    counts = {"question_answer": 0, "paraphrase_question": 0, "same_answer_questions": 0}
    split_counts = {"train_groups": 0, "validation_groups": 0, "test_groups": 0}
    for group, members in groups.items():
        where = group_split(group, seed=seed)
        split_counts[f"{where}_groups"] += 1
        if where == "test":
            continue
        pairs: list[tuple[str, str]] = []
        for example in members:
            pairs.append((example.title, example.body[:MAX_PAIR_TEXT_CHARS]))
            if where == "train":
                counts["question_answer"] += 1
            if include_paraphrases:
                for paraphrase in example.paraphrases:
                    pairs.append((paraphrase, example.title))
                    if where == "train":
                        counts["paraphrase_question"] += 1
        # Questions that share one answer are paraphrases of each other.
        for a in members:
            for b in members:
                if a.key != b.key and a.title != b.title:
                    pairs.append((a.title, b.title))
                    if where == "train":
                        counts["same_answer_questions"] += 1
        out[where].extend(pairs)
    return PairSet("qa", ("anchor", "positive"), out["train"], out["validation"], counts, split_counts)


def _label_triplets(examples: Sequence[Example], *, seed: int) -> PairSet:
    labelled = [e for e in examples if e.label]
    labels = sorted({e.label for e in labelled})
    by_label = len(labels) >= MIN_LABELS_FOR_LABEL_SPLIT
    rng = random.Random(seed)
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for example in labelled:
        splits[group_split(example.label if by_label else example.key, seed=seed)].append(example)
    counts = {"label_triplets": 0, "without_partner": 0}

    def triplets(members: list[Example], count: bool) -> list[tuple[str, str, str]]:
        per_label: dict[str, list[Example]] = {}
        for e in members:
            per_label.setdefault(e.label, []).append(e)
        out = []
        for e in members:
            same = [o for o in per_label[e.label] if o.key != e.key]
            other_labels = [label for label in per_label if label != e.label]
            if not same or not other_labels:
                if count:
                    counts["without_partner"] += 1
                continue
            positive = rng.choice(same)
            negative = rng.choice(per_label[rng.choice(other_labels)])
            out.append((e.title, positive.title, negative.title))
        if count:
            counts["label_triplets"] = len(out)
        return out

    train = triplets(splits["train"], True)
    validation = triplets(splits["validation"], False)
    split = {"labels": len(labels), "split_by": 0 if by_label else 1}
    split.update({f"{k}_rows": len(v) for k, v in splits.items()})
    return PairSet("labels", ("anchor", "positive", "negative"), train, validation, counts, split)


def _ready_pairs(examples: Sequence[Example], *, seed: int, triplets: bool) -> PairSet:
    out = {"train": [], "validation": [], "test": []}
    counts = {"pairs" if not triplets else "triplets": 0, "below_min_score": 0}
    for example in examples:
        if not triplets and example.score is not None and example.score < MIN_POSITIVE_SCORE:
            counts["below_min_score"] += 1
            continue
        where = group_split(example.group or example.title, seed=seed)
        row = (example.title, example.body, example.negative) if triplets else (example.title, example.body)
        out[where].append(row)
    counts["pairs" if not triplets else "triplets"] = len(out["train"])
    columns = ("anchor", "positive", "negative") if triplets else ("anchor", "positive")
    split = {f"{k}_examples": len(v) for k, v in out.items()}
    return PairSet("triplets" if triplets else "pairs", columns, out["train"], out["validation"], counts, split)


# --- Hard negatives ------------------------------------------------------------------


def _text_groups(strategy, *, tickets, examples, seed) -> dict[str, str]:
    """Text -> group, so a mined negative from the anchor's own group (a duplicate) is refused."""
    groups: dict[str, str] = {}
    if strategy == "tickets":
        for cluster in duplicate_clusters(tickets or []):
            for key in cluster:
                groups[key] = cluster[0]
        out = {}
        for t in tickets or []:
            group = groups.get(t.key, t.key)
            out[t.title] = group
            out[t.text[:MAX_PAIR_TEXT_CHARS]] = group
            out[t.body[:MAX_PAIR_TEXT_CHARS]] = group
        return out
    out = {}
    for e in examples or []:
        group = answer_group(e) if strategy == "qa" else (e.group or e.title)
        for text in (e.title, e.body[:MAX_PAIR_TEXT_CHARS], *e.paraphrases):
            out[text] = group
    return out


def mine_hard_negatives(
    *, pairs: Sequence[tuple[str, str]], options: HardNegatives, text_groups: dict[str, str] | None = None
) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """(anchor, positive, negative) triplets mined with options.model over the positives.

    Wraps sentence_transformers.util.mine_hard_negatives: candidates ranked
    range_min..range_max (the top ranks are skipped) that also pass the
    relative margin; a candidate from the anchor's own group (its duplicate
    cluster or answer) is never taken. Loads the model (CPU or GPU).
    """
    from datasets import Dataset as HFDataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    if not pairs:
        return [], {"hard_negatives": 0, "without_negative": 0}
    model = SentenceTransformer(options.model)
    candidates = 3
    data = HFDataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    mined = st_mine(
        dataset=data,
        model=model,
        range_min=options.range_min,
        range_max=options.range_max,
        relative_margin=options.relative_margin,
        num_negatives=candidates,
        sampling_strategy="top",
        output_format="n-tuple",
        batch_size=options.batch_size,
        verbose=False,
    )
    text_groups = text_groups or {}
    found: dict[tuple[str, str], str] = {}
    for row in mined:
        anchor, positive = row["anchor"], row["positive"]
        group = text_groups.get(anchor)
        for i in range(1, candidates + 1):
            negative = row.get(f"negative_{i}")
            if negative and negative != positive and (group is None or text_groups.get(negative) != group):
                found.setdefault((anchor, positive), negative)
                break
    triplets = [(a, p, found[(a, p)]) for a, p in pairs if (a, p) in found]
    return triplets, {"hard_negatives": len(triplets), "without_negative": len(pairs) - len(triplets)}
