"""A dataset's Jira address set by hand (issue 16): owner-scoped form and API field, http(s) only (a 400 naming
the field otherwise), a Jira connection's address wins; ticket pages and result keys link to Jira with the key
URL-quoted, never markup."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from search import indexing
from search.models import SearchIndex
from training import datasets
from training.datasets import refresh_search_vectors
from training.errors import ServiceError
from training.models import Dataset, Document, JiraConnection, ModelVersion

pytestmark = pytest.mark.django_db

BAD_URLS = ["javascript:alert(1)", "ftp://jira.example.com", "jira.example.com", "https://", "https://exa mple.com",
            "https://user:secret@jira.example.com", "https://jira.example.com/?q=1", "http://" + "a" * 600 + ".com"]


@pytest.fixture
def dataset(user) -> Dataset:
    return Dataset.objects.create(owner=user, name="hadoop")


def test_set_by_hand_is_stored_without_trailing_slash_and_cleared_with_empty(dataset):
    datasets.set_jira_base_url(dataset=dataset, url=" https://issues.apache.org/jira/ ")
    dataset.refresh_from_db()
    assert (dataset.jira_base_url, datasets.jira_base_url(dataset)) == (
        "https://issues.apache.org/jira", "https://issues.apache.org/jira")
    datasets.set_jira_base_url(dataset=dataset, url="")
    dataset.refresh_from_db()
    assert (dataset.jira_base_url, datasets.jira_base_url(dataset)) == ("", "")


@pytest.mark.parametrize("url", BAD_URLS)
def test_anything_but_an_http_site_address_is_refused_naming_the_field(dataset, url):
    with pytest.raises(ServiceError) as caught:
        datasets.set_jira_base_url(dataset=dataset, url=url)
    assert list(caught.value.by_field()) == ["jira_base_url"]
    dataset.refresh_from_db()
    assert dataset.jira_base_url == ""


def test_a_jira_connection_address_wins(dataset):
    datasets.set_jira_base_url(dataset=dataset, url="https://by-hand.example.com")
    JiraConnection.objects.create(dataset=dataset, base_url="https://connected.example.com/", jql="project = X",
                                  token_sealed="x")
    assert datasets.jira_base_url(dataset) == "https://connected.example.com"


def test_dataset_page_form_saves_the_address(web, dataset):
    response = web.post(f"/datasets/{dataset.pk}/jira-url", {"jira_base_url": "https://issues.apache.org/jira"})
    assert (response.status_code, response["Location"]) == (302, f"/datasets/{dataset.pk}/")
    html = web.get(f"/datasets/{dataset.pk}/").content.decode()
    assert 'Ticket keys link to <a href="https://issues.apache.org/jira" rel="noopener noreferrer">' in html


def test_dataset_page_form_refuses_a_bad_address_at_the_top_of_the_page(web, dataset):
    response = web.post(f"/datasets/{dataset.pk}/jira-url", {"jira_base_url": "javascript:alert(1)"})
    html = response.content.decode()
    assert response.status_code == 400
    top = html.index("The Jira address was not saved.")
    assert top < html.index("Last import")
    assert "Give the Jira site&#x27;s http(s) address" in html
    dataset.refresh_from_db()
    assert dataset.jira_base_url == ""


def test_dataset_page_form_of_another_users_dataset_is_404(client, other_user, dataset):
    client.force_login(other_user)
    assert client.post(f"/datasets/{dataset.pk}/jira-url", {"jira_base_url": "https://x.example.com"}).status_code \
        == 404
    assert client.get(f"/datasets/{dataset.pk}/jira-url").status_code == 405  # POST only, for anyone
    dataset.refresh_from_db()
    assert dataset.jira_base_url == ""


def test_api_sets_reads_and_refuses_naming_the_field(api, dataset):
    url = f"/api/datasets/{dataset.pk}/jira-url/"
    response = api.put(url, {"jira_base_url": "https://issues.apache.org/jira/"}, format="json")
    assert (response.status_code, response.json()) == (200, {"jira_base_url": "https://issues.apache.org/jira",
                                                             "effective": "https://issues.apache.org/jira"})
    refused = api.put(url, {"jira_base_url": "ftp://x.example.com"}, format="json")
    assert refused.status_code == 400 and list(refused.json()["fields"]) == ["jira_base_url"]
    missing = api.put(url, {}, format="json")
    assert missing.status_code == 400 and list(missing.json()["fields"]) == ["jira_base_url"]
    assert api.get(url).json()["jira_base_url"] == "https://issues.apache.org/jira"
    assert api.get(f"/api/datasets/{dataset.pk}/").json()["jira_base_url"] == "https://issues.apache.org/jira"


def test_api_of_another_users_dataset_is_404(client, other_user, dataset):
    from rest_framework.test import APIClient

    other = APIClient()
    other.force_authenticate(other_user)
    assert other.put(f"/api/datasets/{dataset.pk}/jira-url/", {"jira_base_url": "https://x.example.com"},
                     format="json").status_code == 404


@pytest.fixture
def indexed(user, dataset, tiny_model_dir) -> SearchIndex:
    """Tickets whose keys need quoting (a slash, markup), with a built index and a Jira address set by hand."""
    Document.objects.bulk_create([
        Document(dataset=dataset, external_key="OPS/12<b>", title="Disk full on the gateway", body="disk full"),
        Document(dataset=dataset, external_key="OPS-13", title="Disk quota", body="disk quota exceeded"),
    ])
    refresh_search_vectors(dataset=dataset)
    datasets.set_jira_base_url(dataset=dataset, url="https://jira.example.com")
    version = ModelVersion.objects.create(owner=user, name="hadoop", version=1, base_model="tiny", dimensions=32,
                                          artifact_path=str(tiny_model_dir), dataset=dataset,
                                          stage=ModelVersion.Stage.PRODUCTION)
    return indexing.build_index(index=SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version))


@pytest.mark.django_db(transaction=True)  # the index build commits its vectors before it indexes them
def test_result_keys_link_to_jira_with_the_key_quoted(web, indexed):
    html = web.get("/search/", {"index": indexed.pk, "q": "disk", "mode": "keyword"}).content.decode()
    assert '<a class="jira" href="https://jira.example.com/browse/OPS%2F12%3Cb%3E" rel="noopener noreferrer"' in html
    assert '<a class="jira" href="https://jira.example.com/browse/OPS-13"' in html
    assert "OPS/12<b>" not in html and "OPS/12&lt;b&gt;" in html  # the key is text, never markup


@pytest.mark.django_db(transaction=True)
def test_ticket_page_links_to_jira_by_hand(web, indexed):
    doc = Document.objects.get(dataset=indexed.dataset, external_key="OPS/12<b>")
    html = web.get(f"/search/similar/{indexed.pk}/{doc.pk}").content.decode()
    assert '<a href="https://jira.example.com/browse/OPS%2F12%3Cb%3E" rel="noopener noreferrer">Open OPS/12&lt;b&gt; ' \
           "in Jira</a>" in html
    assert '<a class="jira" href="https://jira.example.com/browse/OPS-13"' in html  # its similar ticket


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=st.one_of(st.text(max_size=80), st.builds(lambda s, h: f"{s}://{h}", st.sampled_from(["http", "https", "ftp",
                                                                                            "javascript", "HTTP"]),
                                                      st.text(max_size=40))))
def test_fuzzed_addresses_are_stored_as_http_or_refused_naming_the_field(dataset, url):
    try:
        datasets.set_jira_base_url(dataset=dataset, url=url)
    except ServiceError as exc:
        assert list(exc.by_field()) == ["jira_base_url"]
        return
    dataset.refresh_from_db()
    assert dataset.jira_base_url == "" or dataset.jira_base_url.lower().startswith(("http://", "https://"))
