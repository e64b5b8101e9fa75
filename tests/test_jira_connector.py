"""The Jira connector against a real HTTP stand-in (tests/jira_standin.py): both paginations, auth, faults, resume.

Everything on our side is real: the client's HTTP, the sync job on the one job
system, datasets.add_version, PostgreSQL. Only the Jira site is a stand-in.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
from datetime import datetime, timedelta, timezone as dt_timezone
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet
from django.contrib.auth import get_user_model
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext

from embedportal import jobs
from tests.jira_standin import CLOUD, DATA_CENTER, JiraStandIn
from training import datasets
from training.connectors import jira
from training.models import Dataset, JiraConnection, JiraSync

EMAIL, TOKEN, PAT = "bot@example.com", "cloud-api-token-123", "dc-personal-access-token-456"


@pytest.fixture(autouse=True)
def sealed_credentials(settings, tmp_path):
    settings.CREDENTIALS_KEYS = [Fernet.generate_key().decode()]
    settings.UPLOADS_DIR = tmp_path / "uploads"


@pytest.fixture
def issues(hadoop_issues) -> list[dict]:
    """230 real HADOOP issues (three pages of 100), in key order."""
    chosen = [i for i in hadoop_issues if i["key"].startswith("HADOOP-")][:230]
    return copy.deepcopy(chosen)


@pytest.fixture
def dataset(user) -> Dataset:
    return Dataset.objects.create(owner=user, name="hadoop from jira", kind="tickets")


def _link(dataset, site: JiraStandIn, *, jql="project = HADOOP", token=None) -> JiraConnection:
    cloud = site.flavor == CLOUD
    return jira.save_connection(dataset=dataset, base_url=site.base_url, flavor=site.flavor, jql=jql,
                                email=EMAIL if cloud else "", token=token or (TOKEN if cloud else PAT))


def _sync(dataset) -> JiraSync:
    sync = jira.create_sync(dataset=dataset, owner=dataset.owner)
    return jira.execute_sync(sync=sync)


def _searches(site: JiraStandIn) -> list[dict]:
    return site.search_requests()


@pytest.mark.django_db
def test_cloud_sync_pages_by_next_page_token_waits_out_429_and_retries_500(dataset, issues):
    # Given a Jira Cloud site whose page 2 answers 429 (Retry-After: 1) and page 3 a 500, once each
    with JiraStandIn(issues, flavor=CLOUD, email=EMAIL, token=TOKEN, faults={1: [429], 2: [500]}) as site:
        _link(dataset, site)
        # When the dataset is synced
        sync = _sync(dataset)
    # Then the sync read three pages through the faults and imported every issue as version 1
    assert (sync.status, sync.error, sync.pages, sync.issues_fetched, sync.up_to_date) == ("succeeded", "", 3, 230, 0)
    assert (sync.version.number, sync.version.added, sync.version.report["rows_read"]) == (1, 230, 230)
    searches = _searches(site)
    assert [r["path"] for r in searches] == ["/rest/api/3/search/jql"] * 5
    assert [r["status"] for r in searches] == [200, 429, 200, 500, 200]
    assert ["nextPageToken" in r["params"] for r in searches] == [False, True, True, True, True]
    assert searches[1]["params"]["nextPageToken"] == searches[2]["params"]["nextPageToken"]
    assert searches[2]["at"] - searches[1]["at"] >= 1.0  # Retry-After honoured
    assert site.served_faults == [(1, 429), (2, 500)]
    assert searches[0]["params"]["jql"] == "(project = HADOOP) ORDER BY key ASC"
    assert searches[0]["params"]["fields"] == ",".join(jira.SEARCH_FIELDS)
    assert searches[0]["authorization"] == "Basic " + base64.b64encode(f"{EMAIL}:{TOKEN}".encode()).decode()
    # The v3 API's Atlassian Document Format descriptions came through as text
    plain = next(i for i in issues if i["fields"].get("description") and "\n" not in i["fields"]["description"])
    assert dataset.documents.get(external_key=plain["key"]).body == plain["fields"]["description"].strip()
    connection = JiraConnection.objects.get(dataset=dataset)
    newest = max(jira.parse_jira_time(i["fields"]["updated"]) for i in issues)
    assert connection.synced_until == newest and connection.time_zone == "UTC"


@pytest.mark.django_db
def test_data_center_sync_pages_by_start_at_with_a_bearer_token_and_reports_like_an_upload(
        user, dataset, issues, tmp_path):
    with JiraStandIn(issues, flavor=DATA_CENTER, token=PAT, page_cap=100) as site:
        _link(dataset, site)
        sync = _sync(dataset)
    searches = _searches(site)
    assert [(r["path"], r["params"]["startAt"]) for r in searches] == [("/rest/api/2/search", "0"),
                                                                       ("/rest/api/2/search", "100"),
                                                                       ("/rest/api/2/search", "200")]
    assert {r["authorization"] for r in searches} == {f"Bearer {PAT}"}
    assert (sync.status, sync.pages, sync.issues_fetched, sync.version.added) == ("succeeded", 3, 230, 230)
    # The same issues uploaded as a file give the same validation report, row for row
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"issues": issues}))
    uploaded = datasets.import_dataset(owner=user, name="uploaded", path=export, filename="export.json")
    assert sync.version.report == uploaded.versions.get().report
    assert set(dataset.documents.values_list("external_key", "content_hash")) == set(
        uploaded.documents.values_list("external_key", "content_hash"))


@pytest.mark.django_db
def test_incremental_sync_asks_from_the_watermark_in_the_users_zone_and_imports_only_what_changed(dataset, issues):
    # Given issues updated a day apart, on a site whose user lives in New York
    base = datetime(2019, 1, 1, 15, 0, tzinfo=dt_timezone.utc)
    first = issues[:50]
    for n, issue in enumerate(first):
        issue["fields"]["updated"] = (base + timedelta(days=n)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
    newest = base + timedelta(days=49)
    with JiraStandIn(first, flavor=DATA_CENTER, token=PAT, time_zone="America/New_York") as site:
        _link(dataset, site)
        assert _sync(dataset).version.added == 50
        # When one issue changes and one is created after the first sync
        changed = copy.deepcopy(first[10])
        changed["fields"]["summary"] = "A new summary after the first sync"
        changed["fields"]["updated"] = (newest + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        created = copy.deepcopy(issues[60])
        created["fields"]["updated"] = (newest + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        site.set_issues([i for i in first if i["key"] != changed["key"]] + [changed, created])
        second = _sync(dataset)
        # And nothing changes before a third sync
        third = _sync(dataset)
    # Then the second asked from an hour before the newest `updated`, in the user's zone, and imported two issues
    since = (newest - timedelta(hours=1)).astimezone(ZoneInfo("America/New_York"))
    assert second.jql == f'(project = HADOOP) AND updated >= "{since:%Y/%m/%d %H:%M}" ORDER BY key ASC'
    assert since.strftime("%H:%M") == "09:00"  # 14:00 UTC in winter
    assert (second.issues_fetched, second.up_to_date) == (3, 1)  # the newest of the first sync came again
    assert (second.version.number, second.version.added, second.version.changed) == (2, 1, 1)
    assert dataset.documents.get(external_key=changed["key"]).title == "A new summary after the first sync"
    # And the third found only issues it already holds: no new version
    assert (third.status, third.version, third.issues_fetched, third.up_to_date) == ("succeeded", None, 2, 2)
    assert dataset.versions.count() == 2


@pytest.mark.django_db
@pytest.mark.parametrize("flavor, fix", [(CLOUD, "create a new API token"), (DATA_CENTER, "Personal Access Tokens")])
def test_refused_credentials_fail_with_401_and_what_to_fix(dataset, issues, flavor, fix):
    with JiraStandIn(issues, flavor=flavor, email=EMAIL, token="the-right-one") as site:
        connection = _link(dataset, site, token="a-wrong-token")
        tested = jira.test_connection(connection=connection)
        sync = _sync(dataset)
    assert (tested["ok"], tested["status"]) == (False, 401)
    assert sync.status == "failed"
    assert sync.error.startswith("Jira answered HTTP 401 (not authenticated): ") and fix in sync.error
    assert dataset.versions.count() == 0


@pytest.mark.django_db
def test_forbidden_account_fails_with_403_naming_the_permission(dataset, issues):
    with JiraStandIn(issues, flavor=DATA_CENTER, token=PAT, forbidden_tokens=(PAT,)) as site:
        _link(dataset, site)
        sync = _sync(dataset)
    assert sync.status == "failed"
    assert sync.error.startswith("Jira answered HTTP 403 (forbidden): the account signed in but may not read")
    assert "Browse Projects" in sync.error


@pytest.mark.django_db
@pytest.mark.parametrize("jql, jira_said", [
    ("project = = HADOOP", "Expecting a value but got '='"),
    ("projekt = HADOOP", "Field 'projekt' does not exist"),
])
def test_bad_jql_fails_with_400_quoting_the_query_and_jiras_words(dataset, issues, jql, jira_said):
    with JiraStandIn(issues, flavor=CLOUD, email=EMAIL, token=TOKEN) as site:
        connection = _link(dataset, site, jql=jql)
        tested = jira.test_connection(connection=connection)
        sync = _sync(dataset)
    assert sync.status == "failed"
    sent = f"({jql}) ORDER BY key ASC"
    assert sync.error.startswith(f"Jira answered HTTP 400 (bad request): it refused the JQL {sent!r}: ")
    assert jira_said in sync.error and "Fix the JQL" in sync.error
    assert (tested["ok"], tested["status"]) == (False, 400) and jira_said in tested["error"]


@pytest.mark.django_db(transaction=True)
def test_sync_resumes_from_its_last_page_after_a_crash(dataset, issues):
    # Given a sync whose worker is taken for dead while page 3 is on its way (the reaper re-queues it)
    reaped = []

    def crash(page: int) -> None:
        if page == 2 and not reaped:
            reaped.append(jobs.reap(JiraSync, timeout_s=0))

    with JiraStandIn(issues, flavor=DATA_CENTER, token=PAT) as site:
        _link(dataset, site)
        site.before_page = crash
        sync = jira.create_sync(dataset=dataset, owner=dataset.owner)
        first = jira.execute_sync(sync=sync)
        # Then the first attempt stopped at its next write, with two pages kept
        assert (reaped[0]["requeued"], first.status, first.attempt, first.pages, first.start_at) == (1, "queued", 1,
                                                                                                     2, 200)
        # When the next attempt runs
        second = jira.execute_sync(sync=first)
    # Then it asked only for the page it lacked, and the version holds every issue once
    assert [r["params"]["startAt"] for r in _searches(site)] == ["0", "100", "200", "200"]
    assert (second.status, second.attempt, second.pages, second.issues_fetched) == ("succeeded", 2, 3, 230)
    assert (second.version.added, second.version.report["rows_read"], second.version.report["duplicates"]) == (
        230, 230, 0)
    assert dataset.documents.count() == 230


@pytest.mark.django_db
def test_token_is_sealed_never_returned_logged_or_shown(api, user, dataset, issues, caplog, client):
    caplog.set_level(logging.DEBUG)
    with JiraStandIn(issues[:20], flavor=CLOUD, email=EMAIL, token=TOKEN) as site:
        base_url = site.base_url
        # When the link is made through the API
        answer = api.put(f"/api/datasets/{dataset.pk}/jira/", {"base_url": base_url + "/", "flavor": "cloud",
                                                                "jql": "project = HADOOP", "email": EMAIL,
                                                                "token": TOKEN}, format="json")
        tested = api.post(f"/api/datasets/{dataset.pk}/jira/test/")
        synced = _sync(dataset)
    # Then the answer says a token is set, without it
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body == {"dataset": dataset.pk, "base_url": base_url, "flavor": "cloud", "jql": "project = HADOOP",
                    "email": EMAIL, "token_set": True, "token_set_at": body["token_set_at"], "time_zone": "UTC",
                    "synced_until": None, "last_synced_at": None}
    assert tested.json() == {"ok": True, "user": "Sync Bot", "time_zone": "UTC", "first_issue": issues[0]["key"],
                             "total": None, "message": f"Signed in as Sync Bot (time zone UTC); the JQL matches "
                                                       f"issues, first {issues[0]['key']}."}
    assert synced.status == "succeeded"
    # And the database holds it sealed: only the configured key opens it
    stored = JiraConnection.objects.get(dataset=dataset)
    assert TOKEN not in stored.token_sealed
    from django.conf import settings

    assert Fernet(settings.CREDENTIALS_KEYS[0]).decrypt(stored.token_sealed.encode()).decode() == TOKEN
    # And it is in no answer, log line or page
    staff = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(staff)
    seen = [api.get(f"/api/datasets/{dataset.pk}/jira/").content.decode(),
            api.get(f"/api/datasets/{dataset.pk}/").content.decode(),
            api.get(f"/api/jira-syncs/{synced.pk}/").content.decode(),
            client.get(f"/admin/training/jiraconnection/{stored.pk}/change/").content.decode(),
            client.get(f"/datasets/{dataset.pk}/retraining/").content.decode(),
            caplog.text]
    assert [TOKEN in text for text in seen] == [False] * 6


@pytest.mark.django_db
def test_new_address_needs_the_token_again_and_bad_input_names_the_field(api, dataset):
    api.put(f"/api/datasets/{dataset.pk}/jira/", {"base_url": "https://a.example.net", "flavor": "data_center",
                                                   "jql": "project = X", "token": PAT}, format="json")
    moved = api.put(f"/api/datasets/{dataset.pk}/jira/", {"base_url": "https://b.example.net",
                                                           "flavor": "data_center", "jql": "project = X"},
                    format="json")
    assert moved.status_code == 400
    assert moved.json()["fields"] == {"token": "give the API token (Cloud) or personal access token (Data Center); "
                                               "a new address or Jira type needs it again."}
    same_site = api.put(f"/api/datasets/{dataset.pk}/jira/", {"base_url": "https://a.example.net",
                                                               "flavor": "data_center", "jql": "project = Y"},
                        format="json")
    assert (same_site.status_code, same_site.json()["jql"], same_site.json()["token_set"]) == (200, "project = Y", True)
    for payload, field in [({"base_url": "ftp://a.example.net", "jql": "x", "token": "t", "flavor": "data_center"},
                            "base_url"),
                           ({"base_url": "https://a.example.net", "jql": "", "token": "t", "flavor": "data_center"},
                            "jql"),
                           ({"base_url": "https://a.example.net", "jql": "x", "token": "t", "flavor": "cloud"},
                            "email"),
                           ({"base_url": "https://a.example.net", "jql": "x", "token": "t", "flavor": "server"},
                            "flavor")]:
        answer = api.put(f"/api/datasets/{dataset.pk}/jira/", payload, format="json")
        assert (answer.status_code, list(answer.json()["fields"])) == (400, [field]), answer.content


@pytest.mark.django_db
def test_without_a_credentials_key_nothing_is_stored(api, dataset, settings):
    settings.CREDENTIALS_KEYS = []
    answer = api.put(f"/api/datasets/{dataset.pk}/jira/", {"base_url": "https://a.example.net", "flavor":
                                                            "data_center", "jql": "project = X", "token": PAT},
                     format="json")
    assert answer.status_code == 400
    assert "EMBEDPORTAL_CREDENTIALS_KEY" in answer.json()["error"]
    assert not JiraConnection.objects.exists()


@pytest.mark.django_db
def test_jira_endpoints_answer_404_for_another_owners_dataset_and_a_missing_one(api, other_user):
    theirs = Dataset.objects.create(owner=other_user, name="theirs", kind="tickets")
    JiraConnection.objects.create(dataset=theirs, base_url="https://their.example.net", flavor="data_center",
                                  jql="project = X", token_sealed="x")
    their_sync = JiraSync.objects.create(owner=other_user, dataset=theirs)
    for pk in (theirs.pk, theirs.pk + 1000):
        calls = [api.get(f"/api/datasets/{pk}/jira/"),
                 api.put(f"/api/datasets/{pk}/jira/", {"base_url": "https://x.example.net", "flavor": "data_center",
                                                       "jql": "x", "token": "t"}, format="json"),
                 api.delete(f"/api/datasets/{pk}/jira/"),
                 api.post(f"/api/datasets/{pk}/jira/test/"),
                 api.post(f"/api/datasets/{pk}/jira/sync/")]
        assert [(c.status_code, c.json()) for c in calls] == [(404, {"error": "Not found."})] * 5
    assert api.get(f"/api/jira-syncs/{their_sync.pk}/").status_code == 404
    assert api.get("/api/jira-syncs/").json()["results"] == []
    assert JiraConnection.objects.get(dataset=theirs).base_url == "https://their.example.net"


@pytest.mark.django_db
@pytest.mark.parametrize("count", [1, 3])
def test_jira_sync_list_takes_the_same_queries_for_one_or_three(api, dataset, count):
    for _ in range(count):
        JiraSync.objects.create(owner=dataset.owner, dataset=dataset, status="succeeded")
    with CaptureQueriesContext(db_connection) as queries:
        answer = api.get(f"/api/jira-syncs/?dataset={dataset.pk}")
    assert (answer.status_code, answer.json()["count"]) == (200, count)
    assert len(queries) == 3  # the token with its user, the count, the rows with their version
    bad = api.get("/api/jira-syncs/?dataset=abc")
    assert (bad.status_code, list(bad.json()["fields"])) == (400, ["dataset"])


@pytest.mark.django_db
def test_a_base_url_that_is_not_jira_never_has_its_answer_repeated(dataset):
    # The base URL is the owner's to choose: an error quotes Jira's errorMessages, never another server's page.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Internal(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            page = b"<html>internal admin: db password hunter2</html>"
            self.send_response(403)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Internal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = jira.save_connection(dataset=dataset, base_url=f"http://127.0.0.1:{server.server_address[1]}",
                                          flavor=DATA_CENTER, jql="project = X", token=PAT)
        tested = jira.test_connection(connection=connection)
    finally:
        server.shutdown()
        server.server_close()
    assert (tested["ok"], tested["status"]) == (False, 403)
    assert tested["error"] == ("Jira answered HTTP 403 (forbidden): the account signed in but may not read these "
                               "issues (no Jira error message). Ask a Jira administrator for the Browse Projects "
                               "permission on the JQL's projects.")
