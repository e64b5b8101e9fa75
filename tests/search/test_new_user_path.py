"""The new user's path (issue 16): searchable at once after an import, index builds off the training queue,
the search page remembers its index, a stable per-dataset search endpoint."""

from __future__ import annotations

import pytest
import redis
from django.conf import settings

from search import indexing, serving
from search.models import SearchIndex
from training import datasets
from training.models import Dataset, Document, ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)

CSV = (
    "Summary,Issue id,Status,Priority,Description\n"
    "NameNode fails to start after upgrade,13404344,Open,Blocker,The namenode crashes with an IOException\n"
    "DataNode disk full,13404345,Open,Major,A datanode volume fills up and the node stops\n"
    "Balancer too slow,13404346,Open,Minor,Balancer moves blocks at 1 MB/s between datanode hosts\n"
)


@pytest.fixture
def broker():
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    queues = ("default", settings.GPU_QUEUE, settings.EMBED_QUEUE)
    client.delete(*queues)
    yield client
    client.delete(*queues)


@pytest.fixture
def imported(user, tmp_path, settings, broker) -> Dataset:
    settings.BASE_INDEX = True
    path = tmp_path / "export.csv"
    path.write_text(CSV)
    return datasets.import_dataset(owner=user, name="hadoop", path=path, filename="export.csv")


def _ready(index: SearchIndex) -> SearchIndex:
    """Mark a base index built (embedding with the real base model is not what these tests are about)."""
    SearchIndex.objects.filter(pk=index.pk).update(status=SearchIndex.Status.READY)
    index.refresh_from_db()
    return index


def _production_index(user, dataset: Dataset, tiny_model_dir) -> SearchIndex:
    version = ModelVersion.objects.create(owner=user, name="hadoop", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=dataset,
                                          stage=ModelVersion.Stage.PRODUCTION)
    index = SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version)
    return indexing.build_index(index=index)


def test_import_queues_base_model_index_on_embed_queue(imported, broker):
    # Given a dataset just imported, then one index with the base model is queued on the embed queue, not gpu
    index = SearchIndex.objects.select_related("model_version").get(dataset=imported)
    assert (index.status, index.model_version.artifact_path, index.model_version.dimensions) == (
        SearchIndex.Status.QUEUED, settings.DEFAULT_BASE_MODEL, 384)
    assert indexing.is_base_version(index.model_version)
    assert index.model_version.dataset_id is None  # never the dataset's production model
    assert (broker.llen(settings.EMBED_QUEUE), broker.llen(settings.GPU_QUEUE)) == (1, 0)


def test_import_without_base_index_setting_creates_no_index(user, tmp_path, settings, broker):
    settings.BASE_INDEX = False
    path = tmp_path / "export.csv"
    path.write_text(CSV)
    dataset = datasets.import_dataset(owner=user, name="hadoop", path=path, filename="export.csv")
    assert SearchIndex.objects.filter(dataset=dataset).count() == 0


def test_search_page_answers_by_keywords_while_base_index_builds(web, imported):
    # Given the base index still queued, when the user searches in the default (hybrid) mode
    response = web.get("/search/", {"q": "datanode disk"})
    html = response.content.decode()
    # Then keyword results come at once, with a notice saying why
    assert response.status_code == 200
    assert "DataNode disk full" in html
    assert "Keyword results: this index is queued; hybrid search follows once it is ready." in html


def test_dataset_search_api_answers_from_base_then_production_index(api, user, imported, tiny_model_dir):
    base = _ready(SearchIndex.objects.get(dataset=imported))
    # Given only the base index, then the dataset endpoint answers from it
    body = api.get(f"/api/datasets/{imported.pk}/search/", {"q": "datanode", "mode": "keyword"}).json()
    assert (body["index"], [r["key"] for r in body["results"]]) == (base.pk, ["13404345", "13404346"])
    # When a production model's index is built, then it answers from that one and the base index is retired
    production = _production_index(user, imported, tiny_model_dir)
    body = api.get(f"/api/datasets/{imported.pk}/search/", {"q": "datanode", "mode": "keyword"}).json()
    assert (body["index"], body["model_version"]) == (production.pk, production.model_version_id)
    assert list(SearchIndex.objects.filter(dataset=imported).values_list("pk", flat=True)) == [production.pk]


def test_dataset_search_api_of_dataset_without_index_is_404(api, user):
    dataset = Dataset.objects.create(owner=user, name="empty")
    response = api.get(f"/api/datasets/{dataset.pk}/search/", {"q": "x"})
    assert (response.status_code, response.json()["error"]) == (
        404, "This dataset has no search index yet; its base-model index is created at import.")


def test_dataset_search_api_of_another_users_dataset_is_404(api, other_user):
    dataset = Dataset.objects.create(owner=other_user, name="theirs")
    assert api.get(f"/api/datasets/{dataset.pk}/search/", {"q": "x"}).status_code == 404


def test_search_page_opens_on_the_index_last_used(web, user, imported, tmp_path):
    # Given two datasets' indexes and a search on the first (older) one
    first = _ready(SearchIndex.objects.get(dataset=imported))
    path = tmp_path / "other.csv"
    path.write_text(CSV)
    other = datasets.import_dataset(owner=user, name="other", path=path, filename="other.csv")
    second = SearchIndex.objects.get(dataset=other)
    web.get("/search/", {"index": first.pk, "q": "datanode"})
    # When the user opens /search/ again, then the index last used is selected
    html = web.get("/search/").content.decode()
    assert f'<option value="{first.pk}" selected>' in html
    assert f'<option value="{second.pk}" >' in html


def test_search_page_clears_filters_when_another_index_is_chosen(web, user, imported, tmp_path):
    first = _ready(SearchIndex.objects.get(dataset=imported))
    path = tmp_path / "other.csv"
    path.write_text(CSV.replace("Blocker", "Critical"))
    other = datasets.import_dataset(owner=user, name="other", path=path, filename="other.csv")
    second = SearchIndex.objects.get(dataset=other)
    # Given a form showing the first index with a priority filter, when the second index is chosen
    response = web.get("/search/", {"index": second.pk, "shown_index": first.pk, "q": "namenode",
                                    "mode": "keyword", "priority": "Blocker"})
    html = response.content.decode()
    # Then the filter is dropped (the other dataset has no Blocker) and its ticket is found
    assert "NameNode fails to start after upgrade" in html
    assert 'value="Blocker"' not in html
    # And the same filter on the same index still applies
    kept = web.get("/search/", {"index": first.pk, "shown_index": first.pk, "q": "namenode", "mode": "keyword",
                                "priority": "Minor"}).content.decode()
    assert "No document matches this query with these filters." in kept


def test_serving_index_prefers_searchable_production_over_base(user, imported, tiny_model_dir):
    base = _ready(SearchIndex.objects.get(dataset=imported))
    assert serving.serving_index(dataset=imported) == base
    assert Document.objects.filter(dataset=imported).count() == 3


# --- Tickets found by key (issue 16, "Tickets you can open and find by key") ---------------------------


@pytest.fixture
def keyed(user, tiny_model_dir) -> SearchIndex:
    """Jira-keyed tickets where one key is mentioned in another ticket's text, with a built production index."""
    from training.datasets import refresh_search_vectors

    dataset = Dataset.objects.create(owner=user, name="jira")
    Document.objects.bulk_create([
        Document(dataset=dataset, external_key="HDFS-6602", title="PendingDeletionBlocks metric is wrong",
                 body="The metric never goes down after deletes"),
        Document(dataset=dataset, external_key="HDFS-7000", title="Metric regression",
                 body="Looks like HDFS-6602 came back after the upgrade"),
        Document(dataset=dataset, external_key="HDFS-7001", title="Balancer too slow", body="Moves blocks slowly"),
    ])
    refresh_search_vectors(dataset=dataset)
    return _production_index(user, dataset, tiny_model_dir)


@pytest.mark.parametrize("mode", ["keyword", "vector", "hybrid"])
def test_ticket_key_query_puts_that_ticket_first_in_every_mode(keyed, mode):
    from search import hybrid

    result = hybrid.hybrid_search(index=keyed, query="hdfs-6602", mode=mode, k=3)
    keys = [hit.document.external_key for hit in result.hits]
    assert keys[0] == "HDFS-6602"
    assert result.hits[0].identifier_match is True
    assert result.key_document_id == result.hits[0].document.pk
    if mode == "keyword":  # then the ticket that mentions it
        assert keys == ["HDFS-6602", "HDFS-7000"]
    else:  # then its similar tickets (every other ticket here), each once
        assert sorted(keys[1:]) == ["HDFS-7000", "HDFS-7001"]


def test_numeric_id_query_puts_that_ticket_first(api, user, imported):
    body = api.get(f"/api/datasets/{imported.pk}/search/", {"q": "13404346", "mode": "keyword"}).json()
    assert ([r["key"] for r in body["results"]], body["key_document"]) == (
        ["13404346"], Document.objects.get(dataset=imported, external_key="13404346").pk)


def test_result_count_is_the_total_not_the_page_size(api, web, keyed):
    body = api.get(f"/api/indexes/{keyed.pk}/search/", {"q": "metric", "mode": "keyword", "k": 1}).json()
    assert ([r["key"] for r in body["results"]], body["total"], body["total_capped"], body["has_more"]) == (
        ["HDFS-6602"], 2, False, True)
    html = web.get("/search/", {"index": keyed.pk, "q": "metric", "mode": "keyword", "k": 1}).content.decode()
    assert "2 results · page 1" in html


def _link_tickets(keyed: SearchIndex) -> None:
    """HDFS-7000 duplicates HDFS-6602 and relates to a ticket outside the dataset; the dataset has a Jira."""
    from training.models import JiraConnection

    Document.objects.filter(dataset=keyed.dataset, external_key="HDFS-7000").update(metadata={
        "priority": "Major", "components": ["namenode", "metrics"],
        "links": [{"type": "Duplicate", "direction": "outward", "key": "HDFS-6602"},
                  {"type": "Relates", "direction": "outward", "key": "YARN-1"}],
    })
    JiraConnection.objects.create(dataset=keyed.dataset, base_url="https://issues.apache.org/jira/",
                                  jql="project = HDFS", token_sealed="x")


def test_ticket_page_shows_fields_links_similar_and_jira(web, keyed):
    _link_tickets(keyed)
    doc = Document.objects.get(dataset=keyed.dataset, external_key="HDFS-7000")
    target = Document.objects.get(dataset=keyed.dataset, external_key="HDFS-6602")
    html = web.get(f"/search/similar/{keyed.pk}/{doc.pk}").content.decode()
    assert "Looks like HDFS-6602 came back after the upgrade" in html
    assert "<tr><th>Components</th><td>namenode, metrics</td></tr>" in html
    assert f'duplicate: <a href="/search/similar/{keyed.pk}/{target.pk}">HDFS-6602</a>' in html
    assert 'relates: YARN-1 <span class="muted">(not in this dataset)</span>' in html
    assert '<a href="https://issues.apache.org/jira/browse/HDFS-7000" rel="noopener noreferrer">' in html
    assert html.count('class="result"') == 2  # its similar tickets: the two others


def test_document_api_returns_ticket_by_key(api, keyed):
    _link_tickets(keyed)
    target = Document.objects.get(dataset=keyed.dataset, external_key="HDFS-6602")
    body = api.get(f"/api/datasets/{keyed.dataset_id}/documents/hdfs-7000/").json()
    assert (body["key"], body["jira_url"], body["links"]) == (
        "HDFS-7000", "https://issues.apache.org/jira/browse/HDFS-7000",
        [{"type": "duplicate", "key": "HDFS-6602", "document": target.pk},
         {"type": "relates", "key": "YARN-1", "document": None}])
    missing = api.get(f"/api/datasets/{keyed.dataset_id}/documents/HDFS-1/")
    assert (missing.status_code, missing.json()["error"]) == (404, "No ticket HDFS-1 in this dataset.")


# --- Duplicate review (issue 16, "Duplicate review that a team can work through") ---------------------


def _pairs(keyed: SearchIndex):
    """Two pairs of the keyed dataset: HDFS-6602/HDFS-7000 (Jira links them) and HDFS-6602/HDFS-7001."""
    from search.models import DuplicatePair

    _link_tickets(keyed)
    docs = {d.external_key: d for d in Document.objects.filter(dataset=keyed.dataset)}
    linked = DuplicatePair.objects.create(dataset=keyed.dataset, document_a=docs["HDFS-6602"],
                                          document_b=docs["HDFS-7000"], similarity=0.97)
    other = DuplicatePair.objects.create(dataset=keyed.dataset, document_a=docs["HDFS-6602"],
                                         document_b=docs["HDFS-7001"], similarity=0.91)
    return linked, other


def test_duplicates_api_filters_by_index_and_jira_link(api, user, keyed, tiny_model_dir):
    from search.models import DuplicatePair

    linked, other = _pairs(keyed)
    # Given a second dataset's index with a pair of its own
    second = Dataset.objects.create(owner=user, name="second")
    a, b = Document.objects.bulk_create([Document(dataset=second, external_key=k, title=k) for k in ("X-1", "X-2")])
    DuplicatePair.objects.create(dataset=second, document_a=a, document_b=b, similarity=0.99)
    second_index = SearchIndex.objects.create(owner=user, dataset=second, model_version=keyed.model_version)
    # When the list is filtered by index, then only that index's dataset's pairs come back
    body = api.get("/api/duplicates/", {"index": keyed.pk}).json()
    assert [(p["id"], p["jira_linked"]) for p in body["results"]] == [(linked.pk, True), (other.pk, False)]
    assert [p["document_a"]["key"] for p in api.get("/api/duplicates/", {"index": second_index.pk}).json()[
        "results"]] == ["X-1"]
    # And by Jira link
    assert [p["id"] for p in api.get("/api/duplicates/", {"index": keyed.pk, "jira": "not_linked"}).json()[
        "results"]] == [other.pk]
    assert [p["id"] for p in api.get("/api/duplicates/", {"jira": "linked"}).json()["results"]] == [linked.pk]
    bad = api.get("/api/duplicates/", {"index": 999999})
    assert (bad.status_code, bad.json()["fields"]) == (400, {"index": "No such index of yours."})


def test_duplicates_page_puts_jira_linked_pairs_apart_and_shows_both_texts(web, keyed):
    linked, other = _pairs(keyed)
    pending = web.get(f"/search/duplicates/{keyed.pk}").content.decode()
    assert (f'id="pair-{other.pk}"' in pending, f'id="pair-{linked.pk}"' in pending) == (True, False)
    assert "<div class=\"snippet\">Moves blocks slowly</div>" in pending
    jira = web.get(f"/search/duplicates/{keyed.pk}", {"decision": "jira"}).content.decode()
    assert f'id="pair-{linked.pk}"' in jira and '<span class="badge ok">linked in Jira</span>' in jira


def test_duplicate_decisions_export_as_csv_from_page_and_api(api, web, user, keyed):
    from search import duplicates

    linked, other = _pairs(keyed)
    duplicates.decide_duplicate(pair=other, decision="not_duplicate", user=user)
    page = b"".join(web.get(f"/search/duplicates/{keyed.pk}/export.csv").streaming_content).decode()
    lines = page.splitlines()
    assert lines[0] == "key_a,title_a,key_b,title_b,similarity,decision,linked_in_jira,decided_by,decided_at"
    assert lines[1].startswith("HDFS-6602,PendingDeletionBlocks metric is wrong,HDFS-7001,Balancer too slow,"
                               "0.9100,not_duplicate,no,alice,")
    assert len(lines) == 2  # pending pairs are not decisions
    response = api.get("/api/duplicates/export/", {"index": keyed.pk})
    assert b"".join(response.streaming_content).decode() == page


def test_six_same_titled_tickets_give_one_group_not_fifteen_pairs(web, user, keyed):
    from itertools import combinations

    from search.models import DuplicatePair

    # Given six tickets filed with the same title, all 15 pairs found at 0.99, and one ordinary pair
    docs = Document.objects.bulk_create([
        Document(dataset=keyed.dataset, external_key=f"HDFS-90{i}", title="Build fails on trunk") for i in range(6)])
    for a, b in combinations(docs, 2):
        DuplicatePair.objects.create(dataset=keyed.dataset, document_a=a, document_b=b, similarity=0.99)
    balancer, metric = (Document.objects.get(dataset=keyed.dataset, external_key=k) for k in ("HDFS-7001", "HDFS-6602"))
    single = DuplicatePair.objects.create(dataset=keyed.dataset, document_a=metric, document_b=balancer,
                                          similarity=0.93)
    groups = duplicates_groups(keyed)
    assert [(len(g.documents), len(g.pair_ids)) for g in groups] == [(6, 15)]
    html = web.get(f"/search/duplicates/{keyed.pk}").content.decode()
    assert html.count('<tr id="pair-') == 1 and f'id="pair-{single.pk}"' in html
    assert "<strong>6 tickets</strong> · 15 pairs" in html
    # When the group is decided at once, then its 15 pairs are duplicates and the group is gone
    web.post(f"/search/duplicates/{keyed.pk}/group", {"pair": groups[0].pair_ids, "decision": "duplicate"})
    assert DuplicatePair.objects.filter(decision="duplicate").count() == 15
    assert duplicates_groups(keyed) == []


def duplicates_groups(index: SearchIndex):
    from search import duplicates

    return duplicates.near_identical_groups(dataset=index.dataset)


# --- Imports that explain themselves (issue 16) -------------------------------------------------------

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


def test_png_renamed_csv_is_refused_saying_what_it_is(user, tmp_path):
    from embedportal.errors import ServiceError

    path = tmp_path / "export.csv"
    path.write_bytes(PNG_HEAD + bytes(range(256)) * 4)
    with pytest.raises(ServiceError) as caught:
        datasets.import_dataset(owner=user, name="picture", path=path, filename="export.csv")
    assert str(caught.value) == ("export.csv: this looks like a PNG image, not a CSV export. "
                                 "Upload a Jira export (CSV, JSON or JSONL; plain, gzip or zip).")
    assert Dataset.objects.count() == 0


def test_png_preview_is_refused_before_any_column_mapping(web, tmp_path):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("export.csv", PNG_HEAD + b"\x00" * 64, content_type="text/csv")
    response = web.post("/api/datasets/preview/", {"file": upload})
    assert "this looks like a PNG image, not a CSV export" in response.content.decode()


def test_links_cell_with_several_ids_becomes_several_links(user, tmp_path, imported):
    path = tmp_path / "links.csv"
    path.write_text('Issue id,Duplicate id\n13404344,"13404345, 13404346"\n13404345,99999999\n')
    version = datasets.import_links(dataset=imported, path=path, filename="links.csv")
    first = Document.objects.get(dataset=imported, external_key="13404344")
    assert [link["key"] for link in first.metadata["extra_links"]] == ["13404345", "13404346"]
    # One row read and accepted whole, one rejected whole: read = accepted + rejected
    assert (version.report["rows_read"], version.report["rows_accepted"], version.report["rows_rejected"]) == (2, 1, 1)


def test_qa_import_accounts_for_every_row(user, tmp_path):
    # Given a Q&A file: one question answered twice the same way, once differently, and an empty answer
    path = tmp_path / "faq.csv"
    path.write_text("id,question,answer\n1,Reset password?,Use the link\n1,Reset password?,Use the link\n"
                    "1,Reset password?,Call us\n2,Open account?,\n3,Close account?,Write to us\n")
    dataset = datasets.import_dataset(owner=user, name="faq", path=path, filename="faq.csv")
    report = dataset.versions.get().report
    # Then read = accepted + rejected + merged, and each merged or rejected row is listed with its reason
    assert (report["rows_read"], report["rows_accepted"], report["rows_rejected"], report["rows_merged"]) == (5, 2, 2, 1)
    assert report["merged"] == [{"row": 2, "key": "1", "reason": "the same as row 1: merged into it"}]
    assert [(e["row"], e["field"]) for e in report["errors"]] == [(3, "key"), (4, "answer")]


def test_links_import_names_its_file_and_shows_link_figures_only(web, user, tmp_path, imported):
    path = tmp_path / "links.csv"
    path.write_text("Issue id,Duplicate id\n13404344,13404345\n")
    datasets.import_links(dataset=imported, path=path, filename="links.csv")
    html = web.get(f"/datasets/{imported.pk}/").content.decode()
    assert "From <code>links.csv</code>" in html
    assert "<tr><th>Links added</th><td>1</td></tr>" in html
    assert "Text length" not in html and "Empty bodies" not in html


def test_upload_error_on_page_has_no_internal_prefix(web):
    import re

    from django.core.files.uploadedfile import SimpleUploadedFile

    from embedportal.errors import ServiceError
    from training.views import _readable

    upload = SimpleUploadedFile("faq.csv", b"id,question,answer\n", content_type="text/csv")
    html = web.post("/datasets/", {"name": "empty", "file": upload}).content.decode()
    assert re.findall(r"<ul class=\"errorlist\"><li>(.*?)</li>", html) == [
        "faq.csv: the file has a header row (id, question, answer) but no data rows."]
    # The API's "field:" prefix is for the API's `fields`; a page shows the sentence
    assert _readable(ServiceError("mapping: no column 'Body' in the file.")) == "No column 'Body' in the file."
