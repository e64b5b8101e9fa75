"""One definition of a ticket's links: training and evaluation see the same clusters."""

from __future__ import annotations

import json

from django.core.files.uploadedfile import SimpleUploadedFile

from training import evaluation
from tests.conftest import SHARED_DATA
from training import datasets
from training.pairs import build_pairs, duplicate_clusters, is_test_cluster, split_clusters

GITBUGS = SHARED_DATA / "jira" / "gitbugs-hadoop-export.csv"
GITBUGS_LINKS = SHARED_DATA / "jira" / "gitbugs-hadoop-duplicates.csv"


def _import(user, name, content: bytes, filename: str):
    with SimpleUploadedFile(filename, content) as fh:
        return datasets.import_upload(owner=user, name=name, upload=fh)


def _add(dataset, content: bytes, filename: str):
    with datasets.upload_on_disk(SimpleUploadedFile(filename, content)) as path:
        return datasets.add_version(dataset=dataset, path=path, filename=filename)


def test_csv_export_with_links_csv_is_evaluated_on_its_test_clusters(user):
    # Given a Jira CSV export whose duplicate links all come from a links CSV
    dataset = _import(user, "gitbugs", GITBUGS.read_bytes(), "gitbugs-hadoop-export.csv")
    _add(dataset, GITBUGS_LINKS.read_bytes(), "gitbugs-hadoop-duplicates.csv")
    # When the held-out evaluation set is built
    eval_set = evaluation.ticket_eval_set(dataset=dataset, split="test")
    # Then it has exactly the TEST clusters that training holds out
    _, test_clusters = split_clusters(duplicate_clusters(datasets.dataset_tickets(dataset)))
    assert len(test_clusters) > 0
    assert len(eval_set.queries) == sum(len(c) for c in test_clusters)
    keys = {eval_set.keys[q] for q in eval_set.queries}
    assert keys == {key for cluster in test_clusters for key in cluster}


def _find_attached_leak(hadoop_issues):
    """Keys (a, b, c): a-b linked in the export, c < a attached to a by a links upload.

    Chosen so the export's cluster {a, b} is TEST by the DATA.md rule while the
    cluster {a, b, c} (with the uploaded link) is TRAIN: the case where a split
    computed from export links only would score tickets that training used.
    """
    keys = sorted(i["key"] for i in hadoop_issues)
    for i in range(1, len(keys) - 1):
        c, a, b = keys[i - 1], keys[i], keys[i + 1]
        if is_test_cluster([a, b]) and not is_test_cluster([a, b, c]):
            return a, b, c
    raise AssertionError("no such keys in the Hadoop export")


def test_test_cluster_never_reaches_training_when_links_come_from_two_uploads(user, hadoop_issues):
    # Given tickets a-b linked as duplicates in the export and c attached to a by a links upload
    a, b, c = _find_attached_leak(hadoop_issues)
    by_key = {i["key"]: i for i in hadoop_issues}

    def issue(key, links=()):
        fields = {"summary": by_key[key]["fields"]["summary"] + f" ({key})", "description": f"body of {key} " * 5}
        fields["issuelinks"] = [{"type": {"name": "Duplicate"}, "outwardIssue": {"key": other}} for other in links]
        return {"key": key, "fields": fields}

    export = {"issues": [issue(a, [b]), issue(b), issue(c)]}
    dataset = _import(user, "leak", json.dumps(export).encode(), "export.json")
    links_csv = f"Issue key,Duplicate key\n{c},{a}\n".encode()
    version = _add(dataset, links_csv, "duplicates.csv")
    assert version.report["links_added"] == 1
    # When training examples and the held-out evaluation set are built
    pairs = build_pairs(dataset=dataset, strategy="")
    eval_set = evaluation.ticket_eval_set(dataset=dataset, split="test")
    train_set = evaluation.ticket_eval_set(dataset=dataset, split="train")
    # Then the cluster {a, b, c} is TRAIN on both sides: nothing trained on is scored as a held-out query
    assert eval_set.queries == []
    assert sorted(train_set.keys[q] for q in train_set.queries) == sorted([a, b, c])
    trained_text = " ".join(" ".join(row) for row in pairs.train + pairs.validation)
    assert f"({a})" in trained_text
