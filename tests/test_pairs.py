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
