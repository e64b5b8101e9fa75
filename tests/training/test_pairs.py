from training.pairs import Ticket, build_ticket_pairs, duplicate_clusters, is_test_cluster, split_clusters


def _tickets_from_export(issues):
    out = []
    for issue in issues:
        links = []
        for link in issue["fields"].get("issuelinks") or []:
            for direction in ("outwardIssue", "inwardIssue"):
                if direction in link:
                    links.append((link["type"]["name"].lower(), link[direction]["key"]))
        out.append(Ticket(issue["key"], issue["fields"]["summary"], issue["fields"].get("description") or "",
                          tuple(links)))
    return out


def test_split_on_hadoop_matches_shared_protocol(hadoop_issues):
    # shared/DATA.md: 551 test queries (members of TEST clusters), 978 TRAIN pairs.
    tickets = _tickets_from_export(hadoop_issues)
    train, test = split_clusters(duplicate_clusters(tickets))
    assert sum(len(c) for c in test) == 551
    assert sum(len(c) * (len(c) - 1) // 2 for c in train) == 978
    # Both directions of each TRAIN pair are used as (anchor, positive).
    assert len(build_ticket_pairs(tickets, include_self_pairs=False)) == 2 * 978


def test_pairs_never_use_test_clusters(hadoop_issues):
    tickets = _tickets_from_export(hadoop_issues)
    _, test = split_clusters(duplicate_clusters(tickets))
    held_out = {key for cluster in test for key in cluster}
    allowed_titles = {t.title for t in tickets if t.key not in held_out}
    only_held_out_titles = {t.title for t in tickets if t.key in held_out} - allowed_titles
    anchors = {anchor for anchor, _ in build_ticket_pairs(tickets)}
    assert len(only_held_out_titles) > 500
    assert anchors & only_held_out_titles == set()


def test_clusters_join_transitively_and_ignore_outside_keys():
    tickets = [
        Ticket("A-1", "a", "", (("duplicate", "A-2"),)),
        Ticket("A-2", "b", "", (("duplicate", "A-3"),)),
        Ticket("A-3", "c", "", (("duplicate", "OUT-1"),)),
        Ticket("A-4", "d", "", (("reference", "A-1"),)),
    ]
    assert duplicate_clusters(tickets) == [["A-1", "A-2", "A-3"]]


def test_test_cluster_rule_is_sha1_of_min_key():
    import hashlib

    cluster = ["HDFS-2", "HADOOP-10"]
    expected = int(hashlib.sha1(b"HADOOP-10").hexdigest(), 16) % 10 < 3
    assert is_test_cluster(cluster) is expected


def test_self_pairs_built_without_links_and_capped():
    tickets = [Ticket(f"K-{i}", f"summary {i}", "x" * 40, ()) for i in range(10)]
    pairs = build_ticket_pairs(tickets, max_pairs=4)
    assert len(pairs) == 4
    assert all(positive == "x" * 40 for _, positive in pairs)


# --- build_pairs: strategies and splits ---------------------------------------------------

import pytest  # noqa: E402

from training.pairs import (  # noqa: E402
    Example,
    HardNegatives,
    build_pairs,
    duplicate_clusters as _clusters,
    group_split,
    ticket_cluster_split,
)


def test_build_pairs_tickets_follows_data_md_and_carves_validation(hadoop_issues):
    tickets = _tickets_from_export(hadoop_issues)
    pair_set = build_pairs(tickets=tickets, strategy="tickets", include_self_pairs=False, seed=42)
    split = pair_set.split
    assert split["test_queries"] == 551
    # Validation comes out of TRAIN clusters only; train + validation duplicates = the 978 TRAIN pairs, both ways.
    assert pair_set.counts["duplicate"] + len(pair_set.validation) == 2 * 978
    assert split["validation_clusters"] > 0
    clusters = _clusters(tickets)
    by_key = {t.key: t for t in tickets}
    validation_titles = {by_key[k].title for c in clusters if ticket_cluster_split(c, seed=42) == "validation" for k in c}
    test_titles = {by_key[k].title for c in clusters if ticket_cluster_split(c, seed=42) == "test" for k in c}
    train_anchors = {anchor for anchor, _ in pair_set.train}
    assert not train_anchors & (test_titles - {a for a, _ in build_ticket_pairs(tickets, include_self_pairs=False)})
    assert not train_anchors & (validation_titles - {by_key[k].title for c in clusters
                                                     if ticket_cluster_split(c, seed=42) == "train" for k in c})


def test_build_pairs_is_deterministic_given_a_seed(hadoop_issues):
    tickets = _tickets_from_export(hadoop_issues[:3000])
    a = build_pairs(tickets=tickets, strategy="tickets", seed=1)
    b = build_pairs(tickets=tickets, strategy="tickets", seed=1)
    c = build_pairs(tickets=tickets, strategy="tickets", seed=2)
    assert (a.train, a.validation, a.counts) == (b.train, b.validation, b.counts)
    assert a.train != c.train


def test_duplicate_anchor_both_asks_one_direction_with_the_whole_ticket(hadoop_issues):
    tickets = _tickets_from_export(hadoop_issues)
    by_key = {t.key: t for t in tickets}
    title = build_pairs(tickets=tickets, strategy="tickets", include_self_pairs=False, seed=42)
    both = build_pairs(tickets=tickets, strategy="tickets", include_self_pairs=False, seed=42, duplicate_anchor="both")
    # Same pairs, same split: only the anchors of one direction change, to the anchor ticket's whole text.
    assert (both.counts, both.split, both.trained_keys) == (title.counts, title.split, title.trained_keys)
    assert sorted(p for _, p in both.train) == sorted(p for _, p in title.train)
    texts = {t.text[:2000]: t for t in tickets}
    whole = [a for a, _ in both.train if a in texts and a not in {t.title for t in tickets}]
    # One direction of each pair (half of them); a ticket without a description has its title as its text.
    assert 0.45 * len(both.train) < len(whole) <= len(both.train) // 2
    test_keys = {k for c in _clusters(tickets) if ticket_cluster_split(c, seed=42) == "test" for k in c}
    assert not {texts[a].key for a in whole} & test_keys  # no TEST ticket's text becomes an anchor
    assert all(by_key[texts[a].key].text[:2000] == a for a in whole)
    with pytest.raises(ValueError, match="duplicate_anchor"):
        build_pairs(tickets=tickets[:10], strategy="tickets", duplicate_anchor="body")


def test_duplicate_anchor_is_parsed_with_a_clear_error():
    from training.hyperparameters import HyperparameterError, parse

    assert parse({"duplicate_anchor": "both"}).duplicate_anchor == "both"
    assert parse({}).duplicate_anchor == "title"
    with pytest.raises(HyperparameterError) as exc:
        parse({"duplicate_anchor": "summary"})
    assert exc.value.errors == {"duplicate_anchor": "must be one of title, both, got 'summary'"}


def test_other_link_types_and_weak_positives_are_selectable():
    tickets = [
        Ticket("A-1", "Disk full", "x" * 40, (("reference", "A-2"),), "Bug", ("datanode",)),
        Ticket("A-2", "Disk usage", "y" * 40, (("reference", "A-1"),), "Bug", ("datanode",)),
        Ticket("A-3", "Slow UI", "z" * 40, (), "Improvement", ("web",)),
    ]
    plain = build_pairs(tickets=tickets, strategy="tickets", include_self_pairs=False)
    assert plain.train == []
    linked = build_pairs(tickets=tickets, strategy="tickets", include_self_pairs=False,
                         link_types=("duplicate", "Reference"), weak_positives="component")
    assert linked.counts == {"link:reference": 1, "same_component": 2, "train_examples": 3, "validation_examples": 0}
    assert sorted(linked.train) == sorted([
        ("Disk full", "Disk usage\n" + "y" * 40),
        ("Disk full", "Disk usage\n" + "y" * 40),
        ("Disk usage", "Disk full\n" + "x" * 40),
    ])


def test_qa_pairs_keep_each_answer_in_one_split():
    examples = [Example(f"q{i}", f"Question {i}?", f"Answer {i % 20}") for i in range(100)]
    pair_set = build_pairs(examples=examples, strategy="qa", seed=3)
    answers_train = {p for _, p in pair_set.train if p.startswith("Answer")}
    answers_validation = {p for _, p in pair_set.validation if p.startswith("Answer")}
    assert answers_train and answers_validation
    assert not answers_train & answers_validation
    split = pair_set.split
    assert split["train_groups"] + split["validation_groups"] + split["test_groups"] == 20
    assert pair_set.counts["question_answer"] == 5 * split["train_groups"]
    # Five questions share each answer: 5 * 4 ordered question pairs per training group.
    assert pair_set.counts["same_answer_questions"] == 20 * split["train_groups"]


def test_qa_paraphrases_point_at_the_canonical_question():
    example = Example("k", "Strikethrough in GitHub?", "Use ~~", group="g1", paraphrases=("cross out text github",))
    seed = next(s for s in range(50) if group_split("g1", seed=s) == "train")
    pair_set = build_pairs(examples=[example], strategy="qa", seed=seed)
    assert sorted(pair_set.train) == [("Strikethrough in GitHub?", "Use ~~"),
                                      ("cross out text github", "Strikethrough in GitHub?")]


def test_label_triplets_have_same_label_positive_and_other_label_negative():
    examples = [Example(f"t{i}", f"text {i}", label=f"L{i % 6}") for i in range(120)]
    label_of = {e.title: e.label for e in examples}
    pair_set = build_pairs(examples=examples, strategy="labels", seed=5)
    assert pair_set.columns == ("anchor", "positive", "negative")
    assert pair_set.train
    for anchor, positive, negative in pair_set.train:
        assert label_of[anchor] == label_of[positive] != label_of[negative]
    train_labels = {label_of[a] for a, _, _ in pair_set.train}
    validation_labels = {label_of[a] for a, _, _ in pair_set.validation}
    assert not train_labels & validation_labels  # six labels: split by label


def test_ready_pairs_skip_low_scores_and_triplets_keep_their_negative():
    examples = [Example("p1", "a", "b", score=1.0), Example("p2", "c", "d", score=0.0), Example("p3", "e", "f")]
    seed = next(s for s in range(100) if all(group_split(t, seed=s) == "train" for t in ("a", "c", "e")))
    pairs = build_pairs(examples=examples, strategy="pairs", seed=seed)
    assert (sorted(pairs.train), pairs.counts["below_min_score"]) == ([("a", "b"), ("e", "f")], 1)
    triplets = build_pairs(examples=[Example("t1", "a", "b", negative="n")], strategy="triplets", seed=seed)
    assert triplets.train == [("a", "b", "n")]


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="^strategy: 'nope' is not one of"):
        build_pairs(examples=[], strategy="nope")


def test_hard_negatives_mined_with_a_model_never_come_from_the_anchors_group(tiny_model_dir):
    tickets = [Ticket(f"K-{i}", f"node {i} fails with error code {i}", f"stack trace number {i} " * 3,
                      (("duplicate", f"K-{i + 1}"),) if i % 10 == 0 else ()) for i in range(60)]
    plain = build_pairs(tickets=tickets, strategy="tickets", seed=0)
    options = HardNegatives(model=str(tiny_model_dir), range_min=0, range_max=20, relative_margin=None)
    pair_set = build_pairs(tickets=tickets, strategy="tickets", seed=0, hard_negatives=options)
    assert pair_set.columns == ("anchor", "positive", "negative")
    assert pair_set.counts["hard_negatives"] == len(pair_set.train) > 0
    assert pair_set.counts["hard_negatives"] + pair_set.counts["without_negative"] == len(plain.train)
    group_of = {t.key: t.key for t in tickets} | {k: c[0] for c in _clusters(tickets) for k in c}
    text_key = {}
    for t in tickets:
        text_key[t.title] = text_key[t.text] = text_key[t.body[:2000]] = t.key
    for anchor, positive, negative in pair_set.train:
        assert negative != positive
        assert group_of[text_key[anchor]] != group_of[text_key[negative]]
