"""Jira Cloud and Data Center: the REST client, a dataset's link to a site, and the sync job.

- **Client.** Jira Cloud removed `/rest/api/3/search` in 2025: Cloud is read
  from `/rest/api/3/search/jql`, paged by `nextPageToken`; Data Center keeps
  `/rest/api/2/search`, paged by `startAt`. Cloud signs in with e-mail + API
  token (basic auth), Data Center with a personal access token (bearer). A
  429 waits what its `Retry-After` says (bounded); a 5xx, a timeout or a
  refused connection is retried with bounded exponential backoff; anything
  else fails at once with a message that names the HTTP status and what to
  fix (401: the credentials, 403: the permission, 400: the JQL, 404/410: the
  base URL or the Jira type).
- **Link.** `save_connection` stores the base URL, the JQL and the sealed token
  (training.connectors.credentials); changing the base URL needs the token
  again, so a token is never sent to a host it was not entered for.
- **Sync.** A JiraSync job asks for the issues updated since the last sync
  (`updated >= "..."` in the Jira user's time zone, from GET /myself, a little
  before the newest `updated` seen: an issue changed while the last sync paged
  is asked for again), page by page into a file of the attempt, keeping the
  cursor on the job row after every page so that a new attempt after a crash
  goes on from the next page. The pages are then written as one Jira REST
  search response and imported by datasets.add_version, the one write path
  of uploads (same validation, same row report, upsert by key). Issues the
  dataset already holds at the same `updated` (the overlap) are left out, so
  a sync that brings nothing new adds no version.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from embedportal import jobs
from training import datasets
from training.connectors import credentials
from training.errors import ConflictError, NotFoundError, ServiceError
from training.models import Dataset, Document, JiraConnection, JiraSync

logger = logging.getLogger(__name__)

# What the importer reads (training.importers' Jira JSON reader); nothing else is asked for.
SEARCH_FIELDS = ("summary", "description", "issuetype", "priority", "status", "resolution", "components", "labels",
                 "created", "updated", "issuelinks")
# Issues per page: Cloud's /search/jql gives at most 100 with these fields; Data Center allows more,
# but a page is also what a crash can lose, so both ask for 100.
PAGE_SIZE = 100
REQUEST_TIMEOUT_S = 30
# 5xx answers, timeouts and refused connections: retried this many times, waiting 1, 2, 4, 8, 16 s (~31 s in all).
TRANSIENT_RETRIES = 5
BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 30.0
# 429: waited out this many times per request, each wait at most MAX_RETRY_AFTER_S.
RATE_LIMIT_WAITS = 10
MAX_RETRY_AFTER_S = 300
# The next sync asks from this long before the newest `updated` seen (JQL dates have minutes only, and an
# issue updated while a sync was paging must not fall between two syncs).
SYNC_OVERLAP = timedelta(hours=1)
MAX_JQL_CHARS = 4000
_ORDER_BY = re.compile(r"\border\s+by\b", flags=re.IGNORECASE)
_JIRA_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z")


class JiraError(Exception):
    """A request Jira refused or never answered; the message names the HTTP status and what to fix."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Page:
    issues: list[dict]
    # Where the next page starts: Cloud's token, or Data Center's startAt.
    next_page_token: str
    next_start_at: int
    is_last: bool
    total: int | None


def _messages(response: requests.Response) -> str:
    """Jira's own words from an error body (errorMessages + errors); nothing else of the body.

    Only Jira-shaped errors are repeated: the base URL is the owner's to
    choose, and echoing any answer would let it read pages of hosts this
    server can reach and they cannot.
    """
    try:
        body = response.json()
    except ValueError:
        return "no Jira error message"
    if not isinstance(body, dict):
        return "no Jira error message"
    parts = [str(m) for m in body.get("errorMessages") or [] if isinstance(m, str)]
    errors = body.get("errors")
    parts += [f"{k}: {v}" for k, v in errors.items() if isinstance(v, str)] if isinstance(errors, dict) else []
    return "; ".join(parts)[:600] or "no Jira error message"


def _retry_after(response: requests.Response) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date); None when absent or unreadable."""
    raw = (response.headers.get("Retry-After") or "").strip()
    if not raw:
        return None
    if raw.isdigit():
        return float(raw)
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(moment.tzinfo)).total_seconds())


class JiraClient:
    """One Jira site, read with the credentials of one account. `wait(seconds)` is how it sleeps between tries."""

    def __init__(self, *, base_url: str, flavor: str, token: str, email: str = "",
                 wait: Callable[[float], None] = time.sleep, timeout: float = REQUEST_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.flavor = flavor
        self.wait = wait
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if flavor == JiraConnection.Flavor.CLOUD:
            self.session.auth = (email, token)
        else:
            self.session.headers["Authorization"] = f"Bearer {token}"

    @property
    def cloud(self) -> bool:
        return self.flavor == JiraConnection.Flavor.CLOUD

    @property
    def search_path(self) -> str:
        return "/rest/api/3/search/jql" if self.cloud else "/rest/api/2/search"

    def myself(self) -> dict:
        return self._get(f"/rest/api/{'3' if self.cloud else '2'}/myself", {})

    def search_page(self, *, jql: str, next_page_token: str = "", start_at: int = 0,
                    max_results: int = PAGE_SIZE) -> Page:
        """One page of the search; Cloud continues from `next_page_token`, Data Center from `start_at`."""
        params: dict[str, Any] = {"jql": jql, "maxResults": max_results, "fields": ",".join(SEARCH_FIELDS)}
        if self.cloud:
            if next_page_token:
                params["nextPageToken"] = next_page_token
        else:
            params["startAt"] = start_at
        body = self._get(self.search_path, params, jql=jql)
        issues = body.get("issues") or []
        if not isinstance(issues, list):
            raise JiraError(f"Jira's answer at {self.search_path} has no issue list; check the base URL.")
        if self.cloud:
            token = body.get("nextPageToken") or ""
            return Page(issues=issues, next_page_token=token, next_start_at=0,
                        is_last=bool(body.get("isLast", not token)) or not token, total=None)
        first = int(body.get("startAt", start_at) or 0)
        total = int(body.get("total", 0) or 0)
        following = first + len(issues)
        return Page(issues=issues, next_page_token="", next_start_at=following,
                    is_last=not issues or following >= total, total=total)

    def _get(self, path: str, params: dict[str, Any], *, jql: str = "") -> dict:
        url = self.base_url + path
        transient = rate_limited = 0
        while True:
            try:
                response = self.session.get(url, params=params, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                transient += 1
                if transient > TRANSIENT_RETRIES:
                    raise JiraError(f"Cannot reach Jira at {self.base_url} ({type(exc).__name__}) after "
                                    f"{transient} tries; check the base URL and that this server may reach it.") from None
                self.wait(_backoff(transient))
                continue
            status = response.status_code
            if status == 429:
                rate_limited += 1
                delay = _retry_after(response)
                if delay is not None and delay > MAX_RETRY_AFTER_S:
                    raise JiraError(f"Jira answered HTTP 429 (rate limited) and asks to wait {delay:.0f} s, longer "
                                    f"than {MAX_RETRY_AFTER_S} s; the sync stopped and goes on from this page next "
                                    "time.", status=429)
                if rate_limited > RATE_LIMIT_WAITS:
                    raise JiraError(f"Jira answered HTTP 429 (rate limited) {rate_limited} times in a row; the sync "
                                    "stopped and goes on from this page next time.", status=429)
                self.wait(delay if delay is not None else _backoff(rate_limited))
                continue
            if status >= 500:
                transient += 1
                if transient > TRANSIENT_RETRIES:
                    raise JiraError(f"Jira answered HTTP {status} {transient} times in a row at {path} "
                                    f"({_messages(response)}); it seems down. The sync goes on from this page "
                                    "next time.", status=status)
                self.wait(_backoff(transient))
                continue
            if status >= 400:
                raise JiraError(self._explain(status, path, response, jql), status=status)
            try:
                body = response.json()
            except ValueError:
                raise JiraError(f"Jira answered HTTP {status} at {path} with something that is not JSON; "
                                "check the base URL (it should be the site's root, e.g. "
                                "https://your-site.atlassian.net).", status=status) from None
            if not isinstance(body, dict):
                raise JiraError(f"Jira answered HTTP {status} at {path} with an unexpected body; check the base URL.",
                                status=status)
            return body

    def _explain(self, status: int, path: str, response: requests.Response, jql: str) -> str:
        said = _messages(response)
        if status == 401:
            fix = ("the e-mail and API token were refused: check the Atlassian account's e-mail, create a new API "
                   "token (id.atlassian.com > Security > API tokens) and save it on the dataset's Jira link."
                   if self.cloud else
                   "the personal access token was refused (expired or revoked?): create a new one in Jira "
                   "(Profile > Personal Access Tokens) and save it on the dataset's Jira link.")
            return f"Jira answered HTTP 401 (not authenticated): {fix}"
        if status == 403:
            return (f"Jira answered HTTP 403 (forbidden): the account signed in but may not read these issues "
                    f"({said}). Ask a Jira administrator for the Browse Projects permission on the JQL's projects.")
        if status == 400 and path == self.search_path:
            return (f"Jira answered HTTP 400 (bad request): it refused the JQL {jql!r}: {said}. Fix the JQL on the "
                    "dataset's Jira link (try it in Jira's issue search first).")
        if status in (404, 410):
            kind = "Jira Cloud" if self.cloud else "Jira Data Center"
            other = "Jira Data Center" if self.cloud else "Jira Cloud"
            return (f"Jira answered HTTP {status} at {path}: there is no such API at {self.base_url}. Check the "
                    f"base URL (the site's root) and the Jira type: this link says {kind}; is it {other}?")
        return f"Jira answered HTTP {status} at {path}: {said}"


def _backoff(tries: int) -> float:
    return min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** (tries - 1))


def parse_jira_time(value: Any) -> datetime | None:
    """Jira's `updated` ("2013-07-24T18:20:41.000+0000") as an aware datetime; None when unreadable."""
    for fmt in _JIRA_TIME_FORMATS:
        try:
            return datetime.strptime(str(value), fmt)
        except ValueError:
            continue
    return None


# --- The dataset's link ------------------------------------------------------------------------


def check_base_url(url: str) -> str:
    """http(s)://host[:port][/context], without credentials, query or fragment; returned without a trailing slash."""
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServiceError("base_url: give the site's address, e.g. https://your-site.atlassian.net.")
    if parts.username or parts.password:
        raise ServiceError("base_url: no user or password in the address; give the credentials in their fields.")
    if parts.query or parts.fragment:
        raise ServiceError("base_url: the site's root only, without ?query or #fragment.")
    path = re.sub(r"/(rest|browse|issues|jira/software)(/.*)?$", "", parts.path.rstrip("/"))
    return f"{parts.scheme}://{parts.netloc}{path}"


def check_jql(jql: str) -> str:
    jql = (jql or "").strip()
    if not jql:
        raise ServiceError("jql: give the issues to sync, e.g. project = HDFS.")
    if len(jql) > MAX_JQL_CHARS:
        raise ServiceError(f"jql: at most {MAX_JQL_CHARS} characters, got {len(jql)}.")
    return jql


def save_connection(*, dataset: Dataset, base_url: str, flavor: str, jql: str, email: str = "",
                    token: str = "") -> JiraConnection:
    """Link a tickets dataset to a Jira site, or change its link. Raises ServiceError naming the field.

    The token is sealed before it is stored and never returned. A new link, a
    new base URL or a new Jira type needs the token (so a token is only ever
    sent where it was entered); otherwise an empty token keeps the stored one.
    A new JQL or site starts the next sync from the beginning.
    """
    if dataset.kind != Dataset.Kind.TICKETS:
        raise ServiceError("dataset: only a tickets dataset can be linked to Jira.")
    if flavor not in JiraConnection.Flavor.values:
        raise ServiceError(f"flavor: one of {', '.join(JiraConnection.Flavor.values)}, got {flavor!r}.")
    base_url, jql = check_base_url(base_url), check_jql(jql)
    email, token = (email or "").strip(), (token or "").strip()
    if flavor == JiraConnection.Flavor.CLOUD and "@" not in email:
        raise ServiceError("email: Jira Cloud signs in with the account's e-mail and an API token; give the e-mail.")
    current = JiraConnection.objects.filter(dataset=dataset).first()
    moved = current is None or current.base_url != base_url or current.flavor != flavor
    if not token and moved:
        raise ServiceError("token: give the API token (Cloud) or personal access token (Data Center)"
                           + ("." if current is None else "; a new address or Jira type needs it again."))
    connection = current or JiraConnection(dataset=dataset)
    if moved or connection.jql != jql:
        connection.synced_until = None  # another query or site: the next sync reads everything it matches
    connection.base_url, connection.flavor, connection.jql = base_url, flavor, jql
    connection.email = email if flavor == JiraConnection.Flavor.CLOUD else ""
    if token:
        connection.token_sealed = credentials.seal(token)
        connection.token_set_at = timezone.now()
    connection.save()
    return connection


def create_linked_dataset(*, owner, name: str, base_url: str, flavor: str, jql: str, email: str = "",
                          token: str = "", language: str = "english") -> Dataset:
    """A new, empty tickets dataset linked to Jira: its first sync (or retrain) fills it. All or nothing.

    Raises ServiceError naming the field (the dataset's name and language as
    an upload checks them, then the link's fields).
    """
    name = (name or "").strip()
    datasets.check_new_dataset(owner=owner, name=name, kind=Dataset.Kind.TICKETS, language=language)
    with transaction.atomic():
        dataset = Dataset.objects.create(owner=owner, name=name, kind=Dataset.Kind.TICKETS, language=language,
                                         source_filename="Jira")
        save_connection(dataset=dataset, base_url=base_url, flavor=flavor, jql=jql, email=email, token=token)
    return dataset


def delete_connection(*, dataset: Dataset) -> None:
    """Unlink the dataset (the sealed token goes with the row); refused while a sync runs."""
    if dataset.jira_syncs.filter(status__in=[JiraSync.Status.QUEUED, JiraSync.Status.RUNNING]).exists():
        raise ConflictError("A Jira sync of this dataset is under way; wait for it or cancel it first.")
    JiraConnection.objects.filter(dataset=dataset).delete()


def client_for(connection: JiraConnection, *, wait: Callable[[float], None] = time.sleep) -> JiraClient:
    token = credentials.unseal(connection.token_sealed, what="token")
    return JiraClient(base_url=connection.base_url, flavor=connection.flavor, email=connection.email, token=token,
                      wait=wait)


def test_connection(*, connection: JiraConnection) -> dict[str, Any]:
    """Sign in (GET /myself) and run the JQL for one issue; {"ok": True, ...} or {"ok": False, "error", "status"}.

    Side effect: remembers the Jira user's time zone (JQL dates are read in it).
    A 429 or 5xx is retried as in a sync, so this may take seconds.
    """
    try:
        client = client_for(connection)
        who = client.myself()
        page = client.search_page(jql=connection.jql, max_results=1)
    except JiraError as exc:
        return {"ok": False, "error": str(exc), "status": exc.status}
    zone = _zone_name(who.get("timeZone"))
    if zone != connection.time_zone:
        JiraConnection.objects.filter(pk=connection.pk).update(time_zone=zone)
        connection.time_zone = zone
    first = page.issues[0].get("key") if page.issues else None
    user = who.get("displayName") or who.get("emailAddress") or who.get("name") or ""
    return {"ok": True, "user": user, "time_zone": zone, "first_issue": first, "total": page.total,
            "message": f"Signed in as {user} (time zone {zone}); the JQL "
                       + (f"matches {page.total} issue(s)." if page.total is not None else
                          (f"matches issues, first {first}." if first else "matches no issue yet."))}


def _zone_name(value: Any) -> str:
    try:
        return str(ZoneInfo(str(value)).key) if value else "UTC"
    except (ZoneInfoNotFoundError, ValueError):
        return "UTC"


def sync_jql(*, jql: str, since: datetime | None, time_zone: str) -> str:
    """The user's JQL, `AND updated >= "<since in the Jira user's zone>"` when incremental, in key order.

    The user's ORDER BY is replaced by key order: stable while issues are
    updated during the paging (an `updated` order moves an issue changed
    meanwhile to the end, and startAt paging then skips one).
    """
    match = _ORDER_BY.search(jql)
    condition = (jql[: match.start()] if match else jql).strip()
    parts = [f"({condition})"] if condition else []
    if since is not None:
        local = since.astimezone(ZoneInfo(_zone_name(time_zone)))
        parts.append(f'updated >= "{local:%Y/%m/%d %H:%M}"')
    return " AND ".join(parts) + " ORDER BY key ASC"


# --- The sync job --------------------------------------------------------------------------------


def sync_folder(sync: JiraSync) -> Path:
    return Path(settings.UPLOADS_DIR) / "jira-sync" / f"sync-{int(sync.pk)}"


def create_sync(*, dataset: Dataset, owner) -> JiraSync:
    """A queued sync row of a linked dataset (not sent: start_sync sends it, a retrain runs it in its own task)."""
    if dataset.owner_id != owner.pk:
        raise NotFoundError("dataset: not found.")
    if not JiraConnection.objects.filter(dataset=dataset).exists():
        raise ServiceError("dataset: it is not linked to Jira; link it on its retraining page first.")
    if dataset.jira_syncs.filter(status__in=[JiraSync.Status.QUEUED, JiraSync.Status.RUNNING]).exists():
        raise ConflictError(f"A Jira sync of {dataset.name} is under way already.")
    return JiraSync.objects.create(owner=owner, dataset=dataset)


def start_sync(*, dataset: Dataset, owner) -> JiraSync:
    """Queue a sync of the dataset; a worker runs it after commit (jobs.enqueue never raises)."""
    sync = create_sync(dataset=dataset, owner=owner)
    jobs.enqueue(sync)
    sync.refresh_from_db()
    return sync


def execute_sync(*, sync: JiraSync) -> JiraSync:
    """Run one attempt of a queued sync (the task, or a retrain in its own task, calls this).

    Side effects: queued -> running -> succeeded/failed/cancelled through
    jobs.run_job; pages in UPLOADS_DIR/jira-sync/sync-<id>/attempt-<n>/,
    removed when the sync ends; on success a new DatasetVersion (when
    anything new came) and the link's watermark move on, together.
    """
    jobs.run_job(JiraSync, sync.pk, _sync)
    ended = JiraSync.objects.filter(pk=sync.pk).first()
    if ended is None or ended.is_terminal:
        shutil.rmtree(sync_folder(sync), ignore_errors=True)
    return ended or sync


def _sync(attempt: jobs.Attempt) -> None:
    """The body of one attempt: page on from the stored cursor, then import (jobs.run_job finishes it)."""
    sync = JiraSync.objects.select_related("dataset").get(pk=attempt.pk)
    connection = JiraConnection.objects.filter(dataset_id=sync.dataset_id).first()
    if connection is None:
        raise jobs.JobFailed("The dataset is no longer linked to Jira; link it again and sync.")
    try:
        client = client_for(connection, wait=lambda seconds: _wait(attempt, seconds))
        if not sync.jql:  # the first attempt fixes the query; later ones go on with it
            attempt.set_phase("signing in")
            zone = _zone_name(client.myself().get("timeZone"))
            since = connection.synced_until - SYNC_OVERLAP if connection.synced_until else None
            sync.jql = sync_jql(jql=connection.jql, since=since, time_zone=zone)
            attempt.update(jql=sync.jql, since=since)
            JiraConnection.objects.filter(pk=connection.pk).update(time_zone=zone)
        pages = _fetch(attempt, sync, client)
        attempt.set_phase("importing")
        _import(attempt, sync, pages)
    except JiraError as exc:
        raise jobs.JobFailed(str(exc)) from None
    except ServiceError as exc:  # the importer's verdict on the pages, or a credential that cannot be opened
        raise jobs.JobFailed(str(exc)) from None


def _wait(attempt: jobs.Attempt, seconds: float) -> None:
    """Sleep between tries in short steps, stopping at once for a cancel or a lost claim."""
    deadline = time.monotonic() + seconds
    while True:
        attempt.check()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


def _fetch(attempt: jobs.Attempt, sync: JiraSync, client: JiraClient) -> Path:
    """Every page from the stored cursor on, appended to this attempt's file; returns the file."""
    pages = attempt.workdir(sync_folder(sync)) / "issues.jsonl"
    kept = 0
    if sync.pages_bytes and sync.pages_file and Path(sync.pages_file).is_file():
        if Path(sync.pages_file) != pages:
            # A page written after the last cursor update is cut off: the cursor asks for it again.
            with open(sync.pages_file, "rb") as src, open(pages, "wb") as dst:
                _copy_prefix(src, dst, sync.pages_bytes)
        else:
            with open(pages, "r+b") as fh:
                fh.truncate(sync.pages_bytes)
        kept = sync.pages_bytes
    elif sync.pages_bytes:  # the kept pages are gone (another machine?): start again from the first page
        logger.warning("Jira sync %s: kept pages %s are missing; starting from the first page", sync.pk, sync.pages_file)
        sync.next_page_token, sync.start_at, sync.pages, sync.issues_fetched, sync.max_updated = "", 0, 0, 0, None
        attempt.update(next_page_token="", start_at=0, pages=0, issues_fetched=0, pages_bytes=0, max_updated=None)
    else:
        pages.write_bytes(b"")
    if kept and sync.pages and not sync.next_page_token and not sync.start_at:
        return pages  # the last page was kept already: nothing left to ask for
    newest = sync.max_updated
    with open(pages, "ab") as out:
        out.seek(kept)
        while True:
            attempt.check()
            page = client.search_page(jql=sync.jql, next_page_token=sync.next_page_token, start_at=sync.start_at)
            for issue in page.issues:
                out.write(json.dumps(issue, ensure_ascii=False).encode("utf-8") + b"\n")
                updated = parse_jira_time((issue.get("fields") or {}).get("updated"))
                if updated is not None and (newest is None or updated > newest):
                    newest = updated
            out.flush()
            os.fsync(out.fileno())  # on disk before the cursor says so
            sync.pages += 1
            sync.issues_fetched += len(page.issues)
            last = page.is_last
            sync.next_page_token = "" if last else page.next_page_token
            sync.start_at = 0 if last else page.next_start_at
            total = page.total
            attempt.update(
                next_page_token=sync.next_page_token, start_at=sync.start_at, pages=sync.pages,
                issues_fetched=sync.issues_fetched, pages_file=str(pages), pages_bytes=out.tell(), max_updated=newest,
                phase=f"page {sync.pages}" + (f" of {-(-total // PAGE_SIZE)}" if total else ""),
                progress=round(min(1.0, sync.issues_fetched / total), 4) if total else None,
            )
            sync.max_updated = newest
            if last:
                return pages


def _copy_prefix(src, dst, length: int) -> None:
    left = length
    while left > 0:
        chunk = src.read(min(left, 1 << 20))
        if not chunk:
            break
        dst.write(chunk)
        left -= len(chunk)


def _import(attempt: jobs.Attempt, sync: JiraSync, pages: Path) -> None:
    """Write the new issues as one Jira search response and import it as a version, fenced; or record that nothing came."""
    payload = pages.with_name(f"jira-sync-{sync.pk}.json")
    fresh, up_to_date = _write_response(sync, pages, payload)
    with transaction.atomic():
        version = None
        if fresh:
            version = datasets.add_version(dataset=sync.dataset, path=payload, filename=payload.name, background=True)
        # The fence: a stale attempt (reaped while alive) rolls its whole import back here.
        if not JiraSync.objects.select_for_update().filter(pk=sync.pk, status=JiraSync.Status.RUNNING,
                                                           attempt=attempt.number).exists():
            attempt.lost = True
            raise jobs.LostClaim(f"Jira sync {sync.pk} attempt {attempt.number} lost its claim")
        connection = JiraConnection.objects.select_for_update().filter(dataset_id=sync.dataset_id).first()
        if connection is not None:
            watermark = connection.synced_until
            if sync.max_updated is not None and (watermark is None or sync.max_updated > watermark):
                watermark = sync.max_updated
            JiraConnection.objects.filter(pk=connection.pk).update(synced_until=watermark,
                                                                   last_synced_at=timezone.now())
        attempt.finish(version=version, up_to_date=up_to_date, phase="done", error="")
    payload.unlink(missing_ok=True)


# Keys per query when looking up which fetched issues are already stored at the same `updated`.
LOOKUP_BATCH = 5000


def _write_response(sync: JiraSync, pages: Path, payload: Path) -> tuple[int, int]:
    """{"issues": [...]} of the fetched issues the dataset does not hold at the same `updated`; (written, left out).

    Read twice line by line (keys, then issues), so a big first sync never
    holds its pages in memory more than once per batch of keys.
    """
    latest: dict[str, tuple[int, str]] = {}
    with open(pages, "rb") as fh:
        for number, line in enumerate(fh):
            issue = json.loads(line)
            latest[str(issue.get("key"))] = (number, str((issue.get("fields") or {}).get("updated") or ""))
    stored: dict[str, str] = {}
    keys = list(latest)
    for start in range(0, len(keys), LOOKUP_BATCH):
        rows = Document.objects.filter(dataset_id=sync.dataset_id, external_key__in=keys[start:start + LOOKUP_BATCH])
        stored.update({key: str((meta or {}).get("updated") or "") for key, meta in rows.values_list("external_key",
                                                                                                      "metadata")})
    # An issue seen twice (updated while paging) counts once, at its last line; one stored as fetched is left out.
    keep = {number for key, (number, updated) in latest.items() if not updated or stored.get(key) != updated}
    written = 0
    with open(pages, "rb") as fh, open(payload, "wb") as out:
        out.write(b'{"issues": [')
        for number, line in enumerate(fh):
            if number in keep:
                out.write((b",\n" if written else b"\n") + line.rstrip(b"\n"))
                written += 1
        out.write(b"\n]}\n")
    return written, len(latest) - written
