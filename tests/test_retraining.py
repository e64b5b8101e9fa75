"""Daily retraining (#13): schedule and beat, the occurrence job, the champion/challenger guard, webhooks, pages, API.

Real PostgreSQL, Redis, Celery worker, HTTP (the Jira stand-in and a local
webhook receiver); the tiny BERT of tests/conftest.py is the base model.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from datetime import datetime, timedelta, timezone as dt_timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext
from django_celery_beat.models import PeriodicTask

from embedportal.errors import ConflictError
from search import serving
from search.models import SearchIndex
from tests.jira_standin import DATA_CENTER, JiraStandIn
from tests.waiting import wait_for
from training import retraining
from training import evaluation as ev
from training.connectors import jira
from training.models import (
    Dataset,
    DatasetVersion,
    JiraConnection,
    ModelVersion,
    RetrainOccurrence,
    RetrainSchedule,
    TrainingRun,
    WebhookDelivery,
)

PAT = "dc-pat-for-retraining"
TINY_HYPER = {"max_steps": 2, "batch_size": 8, "max_seq_length": 32}
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "map@100")


@pytest.fixture(autouse=True)
def sealed_credentials(settings, tmp_path):
    settings.CREDENTIALS_KEYS = [Fernet.generate_key().decode()]
    settings.UPLOADS_DIR = tmp_path / "uploads"
    settings.MODELS_DIR = tmp_path / "models"


@pytest.fixture
def dataset(user) -> Dataset:
    ds = Dataset.objects.create(owner=user, name="tickets", kind="tickets")
    return ds


class WebhookReceiver:
    """A local HTTP endpoint that records JSON POSTs and answers with the statuses it is given, then 200."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.received: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append({"body": json.loads(body), "type": self.headers.get("Content-Type")})
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-path-T0K3N"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- The guard --------------------------------------------------------------------------------------------


def _table(ndcg: float, **overrides) -> dict:
    return {**{m: ndcg for m in METRICS}, **overrides, "queries": 30}


def test_paired_bootstrap_is_deterministic_and_a_tie_has_a_zero_interval():
    champion = [0.1 * (i % 10) for i in range(200)]
    challenger = [s + (0.05 if i % 3 else -0.02) for i, s in enumerate(champion)]
    first, again = ev.paired_bootstrap(champion, challenger), ev.paired_bootstrap(champion, challenger)
    assert first == again  # fixed seed: the same data always gives the same interval
    assert (first.queries, first.resamples, first.seed) == (200, 1000, ev.BOOTSTRAP_SEED)
    assert first.gain == pytest.approx(sum(c - a for a, c in zip(champion, challenger)) / 200)
    assert first.ci_low < first.gain < first.ci_high and first.ci_low > 0
    tie = ev.paired_bootstrap(champion, champion)
    assert (tie.gain, tie.ci_low, tie.ci_high) == (0.0, 0.0, 0.0)
    assert tie.describe() == "gain +0.000, 95% CI [+0.000, +0.000] over 200 queries"


@pytest.mark.parametrize("gains, tables, promote, reason", [
    ([0.05] * 30, {}, True, "better with confidence: the 95% lower bound +0.050 is above the margin +0.000 and no "
                            "metric drops by more than 0.010"),
    ([0.0] * 30, {}, False, "not better with confidence: the 95% lower bound +0.000 is not above the margin +0.000"),
    ([0.3, -0.3] * 15, {}, False, None),
    ([0.05] * 30, {"recall@1": 0.45}, False, "1 metric(s) drop by more than the tolerance 0.010 (vector recall@1 "
                                             "-0.050)"),
])
def test_guard_promotes_only_a_confident_gain_without_drops(gains, tables, promote, reason):
    champion = [0.5] * 30
    comparison = ev.paired_bootstrap(champion, [c + g for c, g in zip(champion, gains)])
    verdict = ev.guard(comparison=comparison, champion_table={"vector": _table(0.5)},
                       challenger_table={"vector": _table(0.55, **tables)}, margin=0.0, tolerance=0.01)
    assert verdict.promote is promote
    if reason is None:  # an uncertain gain: the interval straddles zero
        assert comparison.ci_low < 0 < comparison.ci_high
        assert verdict.reason.startswith("not better with confidence: the 95% lower bound -")
    else:
        assert verdict.reason == reason


# --- Schedule and beat ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_schedule_is_a_crontab_in_its_own_time_zone_and_beat_agrees_on_the_next_run(user, dataset):
    schedule = retraining.save_schedule(dataset=dataset, owner=user, hour="2", minute="0", time_zone="Europe/Berlin")
    task = PeriodicTask.objects.get(name=f"retrain-schedule-{schedule.pk}")
    assert (task.task, json.loads(task.kwargs), task.enabled) == ("training.retrain_tick",
                                                                   {"schedule_id": schedule.pk}, True)
    assert (task.crontab.minute, task.crontab.hour, str(task.crontab.timezone)) == ("0", "2", "Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    for now, expected in [(datetime(2024, 1, 15, 12, 0, tzinfo=dt_timezone.utc),
                           datetime(2024, 1, 16, 1, 0, tzinfo=dt_timezone.utc)),   # CET: 02:00 is 01:00 UTC
                          (datetime(2024, 7, 15, 12, 0, tzinfo=dt_timezone.utc),
                           datetime(2024, 7, 16, 0, 0, tzinfo=dt_timezone.utc))]:  # CEST: 00:00 UTC
        assert retraining.next_run_at(schedule, now) == expected
        # celery beat's own reading of the stored crontab gives the same moment
        start, delta, _ = task.crontab.schedule.remaining_delta(now.astimezone(berlin), tz=berlin)
        assert (start + delta).astimezone(dt_timezone.utc) == expected
    assert retraining.describe_schedule(schedule) == "daily at 02:00 (Europe/Berlin)"


@pytest.mark.django_db
def test_default_schedule_is_daily_at_two_in_the_server_zone(api, dataset, settings):
    before = api.get(f"/api/datasets/{dataset.pk}/retraining/").json()
    assert (before["description"], before["saved"], before["enabled"], before["next_run_at"]) == (
        f"daily at 02:00 ({settings.TIME_ZONE})", False, False, None)
    saved = api.put(f"/api/datasets/{dataset.pk}/retraining/", {}, format="json")
    assert saved.status_code == 200, saved.content
    body = saved.json()
    assert (body["enabled"], body["hour"], body["minute"], body["day_of_week"], body["time_zone"], body["saved"]) == (
        True, "2", "0", "*", settings.TIME_ZONE, True)
    assert (body["start_from"], body["margin"], body["tolerance"], body["webhook_host"]) == ("production", 0.0, 0.01,
                                                                                             "")
    assert body["hyperparameters"] == {}
    tuned = api.put(f"/api/datasets/{dataset.pk}/retraining/", {"hyperparameters": {"max_steps": "200"}},
                    format="json")
    assert tuned.json()["hyperparameters"] == {"max_steps": 200}  # what was set, parsed; the rest stay defaults
    assert datetime.fromisoformat(body["next_run_at"]).astimezone(ZoneInfo(settings.TIME_ZONE)).strftime("%H:%M") == \
        "02:00"
    assert PeriodicTask.objects.get(name=f"retrain-schedule-{RetrainSchedule.objects.get().pk}").enabled


@pytest.mark.django_db
@pytest.mark.parametrize("payload, field", [
    ({"hour": "25"}, "hour"), ({"minute": "x"}, "minute"), ({"day_of_week": "funday"}, "day_of_week"),
    ({"time_zone": "Mars/Olympus"}, "time_zone"), ({"hyperparameters": {"epochs": 0}}, "hyperparameters"),
    ({"margin": 5}, "margin"), ({"tolerance": -1}, "tolerance"), ({"webhook_url": "ftp://x"}, "webhook_url"),
    ({"start_from": "yesterday"}, "start_from"), ({"base_model": "../../etc"}, "base_model"),
])
def test_bad_schedule_input_is_a_400_naming_the_field(api, dataset, payload, field):
    answer = api.put(f"/api/datasets/{dataset.pk}/retraining/", payload, format="json")
    assert answer.status_code == 400, answer.content
    assert list(answer.json()["fields"]) == [field], answer.json()
    assert not RetrainSchedule.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_beats_firing_the_same_slot_start_one_retrain(user, dataset):
    schedule = retraining.save_schedule(dataset=dataset, owner=user, hour="2", minute="0", time_zone="UTC")
    fired_at = datetime(2024, 3, 5, 2, 0, 7, tzinfo=dt_timezone.utc)
    results, barrier = [], threading.Barrier(2)

    def beat(delay_s: float) -> None:
        barrier.wait()
        results.append(retraining.fire_scheduled(schedule_id=schedule.pk, now=fired_at + timedelta(seconds=delay_s)))
        from django.db import connections

        connections.close_all()

    threads = [threading.Thread(target=beat, args=(d,)) for d in (0.0, 1.5)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    started = [r for r in results if r is not None]
    assert len(results) == 2 and len(started) == 1
    occurrence = RetrainOccurrence.objects.get()
    assert (occurrence.pk, occurrence.status, occurrence.trigger) == (started[0].pk, "queued", "schedule")
    assert occurrence.scheduled_for == datetime(2024, 3, 5, 2, 0, tzinfo=dt_timezone.utc)
    # A tick that arrives late for the same slot finds it taken too
    assert retraining.fire_scheduled(schedule_id=schedule.pk, now=fired_at + timedelta(minutes=40)) is None
    assert RetrainOccurrence.objects.count() == 1


@pytest.mark.django_db
def test_a_slot_that_comes_while_a_retrain_runs_is_recorded_busy_and_run_now_is_refused(api, user, dataset):
    schedule = retraining.save_schedule(dataset=dataset, owner=user, hour="*", minute="0", time_zone="UTC")
    first = retraining.fire_scheduled(schedule_id=schedule.pk, now=datetime(2024, 3, 5, 2, 0, tzinfo=dt_timezone.utc))
    busy = retraining.fire_scheduled(schedule_id=schedule.pk, now=datetime(2024, 3, 5, 3, 0, tzinfo=dt_timezone.utc))
    assert (busy.status, busy.outcome, busy.summary) == ("succeeded", "busy",
                                                         f"skipped: retrain #{first.pk} was still queued")
    refused = api.post(f"/api/datasets/{dataset.pk}/retraining/run/")
    assert refused.status_code == 409
    assert refused.json()["error"] == (f"Retrain #{first.pk} of tickets is queued already; wait for it or cancel it.")
    retraining.cancel_occurrence(occurrence=first)
    now = api.post(f"/api/datasets/{dataset.pk}/retraining/run/")
    assert (now.status_code, now.json()["trigger"], now.json()["status"]) == (202, "manual", "queued")


# --- The occurrence: skip, the guard on real rows, a full day on a real worker -------------------------------


def _docs(dataset: Dataset, keys: list[str], *, version: int) -> None:
    from training.models import Document

    Document.objects.bulk_create([Document(dataset=dataset, external_key=k, title=f"title {k}", body="body " * 8,
                                           content_hash=k, changed_in_version=version) for k in keys])
    DatasetVersion.objects.create(dataset=dataset, number=version, added=len(keys))


def _rows(before: list[float], after: list[float]) -> list[dict]:
    return [{"query": f"Q-{i:02d}", "relevant": [], "before": b, "after": a, "delta": round(a - b, 4),
             "top_before": [], "top_after": []} for i, (b, a) in enumerate(zip(before, after))]


def _version(user, dataset, number: int, *, base_model: str, evaluation: dict, stage="candidate") -> ModelVersion:
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model=base_model, status="succeeded",
                                     evaluation=evaluation)
    held_out = (evaluation.get("systems") or {}).get("fine_tuned")
    return ModelVersion.objects.create(
        owner=user, name=dataset.name, version=number, base_model=base_model, artifact_path="/nowhere", dimensions=32,
        source_run=run, dataset=dataset, stage=stage, dataset_version=dataset.versions.order_by("-number").first(),
        metrics={"held_out": held_out} if held_out else {})


@pytest.mark.django_db
def test_unchanged_data_is_skipped_without_a_training_run(user, dataset):
    _docs(dataset, [f"T-{i}" for i in range(6)], version=1)
    champion = _version(user, dataset, 1, base_model="base", stage="production",
                        evaluation={"systems": {"fine_tuned": _table(0.42)}})
    occurrence = retraining.run_now(dataset=dataset, owner=user)
    ended = retraining.execute_occurrence(occurrence=occurrence)
    assert (ended.status, ended.outcome, ended.data_version, ended.champion_id) == ("succeeded", "skipped", 1,
                                                                                    champion.pk)
    assert ended.summary == "skipped: no new tickets (the data of version 1 was trained on already)"
    assert ended.production_ndcg == 0.42 and ended.fingerprint.startswith("6:")
    assert TrainingRun.objects.count() == 1  # the champion's own, none new


@pytest.mark.django_db
@pytest.mark.parametrize("after, fine_tuned, outcome, summary, reason", [
    ([0.7] * 30, _table(0.7), "promoted", "promoted v2: gain +0.200, 95% CI [+0.200, +0.200] over 30 queries",
     "better with confidence: the 95% lower bound +0.200 is above the margin +0.000 and no metric drops by more "
     "than 0.010"),
    ([0.5] * 30, _table(0.5), "kept", "kept v1: gain +0.000, 95% CI [+0.000, +0.000] over 30 queries",
     "not better with confidence: the 95% lower bound +0.000 is not above the margin +0.000"),
    ([0.6] * 30, _table(0.6, **{"recall@1": 0.4}), "kept",
     "kept v1: gain +0.100, 95% CI [+0.100, +0.100] over 30 queries",
     "1 metric(s) drop by more than the tolerance 0.010 (vector recall@1 -0.100)"),
])
def test_the_guard_decides_on_the_challengers_own_before_and_after(user, dataset, after, fine_tuned, outcome,
                                                                    summary, reason):
    # Given a champion in production and a finished run that started from it (as a retrain after a crash finds it)
    _docs(dataset, ["T-1", "T-2"], version=1)
    champion = _version(user, dataset, 1, base_model="base", stage="production",
                        evaluation={"systems": {"fine_tuned": _table(0.5)}})
    evaluation = {"systems": {"base": _table(0.5), "fine_tuned": fine_tuned}, "per_query": _rows([0.5] * 30, after)}
    challenger = _version(user, dataset, 2, base_model=f"version:{champion.pk}", evaluation=evaluation)
    occurrence = RetrainOccurrence.objects.create(owner=user, dataset=dataset, trigger="manual",
                                                  run=challenger.source_run, champion=champion, data_version=1)
    # When the occurrence runs
    ended = retraining.execute_occurrence(occurrence=occurrence)
    # Then the decision is recorded with its numbers, and only a pass asks search to promote
    assert (ended.status, ended.outcome, ended.summary, ended.decision["reason"]) == ("succeeded", outcome, summary,
                                                                                      reason)
    assert (ended.decision["queries"], ended.decision["resamples"], ended.decision["seed"]) == (30, 1000,
                                                                                                 ev.BOOTSTRAP_SEED)
    assert ended.production_ndcg == (0.7 if outcome == "promoted" else 0.5)
    challenger.refresh_from_db()
    promoted = outcome == "promoted"
    assert (challenger.promotion_requested_at is not None) is promoted
    assert SearchIndex.objects.filter(model_version=challenger).exists() is promoted


@pytest.mark.django_db
def test_manual_promotion_not_worse_guard_uses_the_same_comparison(user, dataset):
    _docs(dataset, ["T-1", "T-2"], version=1)
    champion = _version(user, dataset, 1, base_model="base", stage="production",
                        evaluation={"systems": {"fine_tuned": _table(0.5)}})
    worse = _version(user, dataset, 2, base_model=f"version:{champion.pk}", evaluation={
        "systems": {"base": _table(0.5), "fine_tuned": _table(0.3)}, "per_query": _rows([0.5] * 30, [0.3] * 30)})
    with pytest.raises(ConflictError) as refused:
        serving.request_promotion(version=worse, user=user, require_not_worse=True)
    assert str(refused.value) == (
        "tickets v2 scores nDCG@10 0.3000 on held-out tickets, below production tickets v1 (0.5000): not better "
        "with confidence: the 95% lower bound -0.200 is not above the margin -0.010 (gain -0.200, 95% CI [-0.200, "
        "-0.200] over 30 queries); not promoted.")
    # Within the tolerance (non-inferior) the promotion goes ahead
    close = _version(user, dataset, 3, base_model=f"version:{champion.pk}", evaluation={
        "systems": {"base": _table(0.5), "fine_tuned": _table(0.495)}, "per_query": _rows([0.5] * 30, [0.495] * 30)})
    promoted = serving.request_promotion(version=close, user=user, require_not_worse=True)
    assert promoted.promotion_requested_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_scheduled_day_syncs_trains_and_promotes_then_skips_then_decides_with_numbers(
        celery_worker, user, small_jira_file, hadoop_issues, tiny_model_dir):
    # Given a dataset linked to a Data Center Jira that holds 200 real issues, retrained daily at 02:00 UTC
    slice_issues = json.loads(small_jira_file.read_text())["issues"]
    dataset = Dataset.objects.create(owner=user, name="hadoop", kind="tickets")
    with JiraStandIn(slice_issues, flavor=DATA_CENTER, token=PAT) as site:
        jira.save_connection(dataset=dataset, base_url=site.base_url, flavor=DATA_CENTER, jql="project in (HADOOP, "
                             "HDFS, MAPREDUCE, YARN)", token=PAT)
        schedule = retraining.save_schedule(dataset=dataset, owner=user, hour="2", minute="0", time_zone="UTC",
                                            base_model=str(tiny_model_dir), hyperparameters=TINY_HYPER)

        def day(n: int) -> RetrainOccurrence:
            fired = datetime(2024, 5, 1 + n, 2, 0, 3, tzinfo=dt_timezone.utc)
            occurrence = retraining.fire_scheduled(schedule_id=schedule.pk, now=fired)
            return wait_for(lambda: RetrainOccurrence.objects.get(pk=occurrence.pk),
                            lambda o: o.is_terminal, timeout=600, every=1)

        # When the first day's slot fires
        first = day(0)
        # Then it synced every issue, trained the first model from the base model, and promoted it
        assert (first.status, first.outcome, first.issues_synced, first.error) == ("succeeded", "promoted", 200, "")
        assert first.summary.startswith("promoted v1: first model of the dataset (nDCG@10 ")
        assert first.run.base_model == str(tiny_model_dir) and first.scheduled_for.hour == 2
        v1 = ModelVersion.objects.get(dataset=dataset)
        wait_for(lambda: ModelVersion.objects.get(pk=v1.pk).stage, lambda s: s == "production", timeout=300)
        # When nothing new arrives by the next day
        second = day(1)
        assert (second.outcome, second.issues_synced, second.run_id) == ("skipped", 1, None)
        assert second.sync.up_to_date == 1 and second.sync.version is None
        assert TrainingRun.objects.filter(dataset=dataset).count() == 1
        # When 30 new tickets arrive the day after
        keys = {i["key"] for i in slice_issues}
        newcomers = [copy.deepcopy(i) for i in hadoop_issues if i["key"] not in keys][:30]
        for issue in newcomers:
            issue["fields"]["updated"] = "2030-01-01T00:00:00.000+0000"
        site.set_issues(slice_issues + newcomers)
        third = day(2)
    # Then it synced them, trained from the production model, and recorded a decision the numbers support
    assert (third.status, third.issues_synced, third.error) == ("succeeded", 31, "")
    assert third.run.base_model == f"version:{v1.pk}" and third.champion_id == v1.pk
    decision = third.decision
    assert decision["queries"] == third.run.evaluation["queries"] > 0
    assert re.fullmatch(r"(kept v1|promoted v2): gain [+-]\d\.\d{3}, 95% CI \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] over "
                        r"\d+ queries", third.summary), third.summary
    promote = decision["ci_low"] > decision["margin"] and not decision["drops"]
    assert third.outcome == ("promoted" if promote else "kept")
    assert third.production_ndcg == (decision["challenger_ndcg@10"] if promote else decision["champion_ndcg@10"])
    assert [o.outcome for o in RetrainOccurrence.objects.order_by("created_at")] == ["promoted", "skipped",
                                                                                     third.outcome]


# --- Notifications ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_webhook_gets_a_slack_compatible_post_retried_until_delivered(user, dataset):
    hook = WebhookReceiver(statuses=[503])
    try:
        retraining.save_schedule(dataset=dataset, owner=user, webhook_url=hook.url)
        occurrence = RetrainOccurrence.objects.create(owner=user, dataset=dataset, status="succeeded",
                                                      outcome="promoted", summary="promoted v2: gain +0.020, 95% CI "
                                                      "[+0.004, +0.036] over 212 queries")
        delivery = retraining.notify(occurrence=occurrence, event="promoted")
    finally:
        hook.close()
    assert (delivery.status, delivery.attempts, delivery.response_status, delivery.host) == ("delivered", 2, 200,
                                                                                             "127.0.0.1")
    assert [r["body"]["text"] for r in hook.received] == [
        "EmbedPortal · tickets: promoted v2: gain +0.020, 95% CI [+0.004, +0.036] over 212 queries"] * 2
    assert hook.received[0]["type"] == "application/json"
    assert hook.received[0]["body"]["event"] == "promoted" and hook.received[0]["body"]["retrain"] == occurrence.pk
    schedule = RetrainSchedule.objects.get(dataset=dataset)
    assert "secret-path-T0K3N" not in schedule.webhook_sealed and schedule.webhook_host == "127.0.0.1"


@pytest.mark.django_db
def test_a_failed_retrain_notifies_and_an_undeliverable_webhook_is_shown(web, user, dataset, small_jira_file):
    hook = WebhookReceiver(statuses=[404])
    try:
        retraining.save_schedule(dataset=dataset, owner=user, webhook_url=hook.url)
        with JiraStandIn([], flavor=DATA_CENTER, token="right") as site:
            jira.save_connection(dataset=dataset, base_url=site.base_url, flavor=DATA_CENTER, jql="project = X",
                                 token="wrong")
            ended = retraining.execute_occurrence(occurrence=retraining.run_now(dataset=dataset, owner=user))
    finally:
        hook.close()
    assert (ended.status, ended.outcome) == ("failed", "failed")
    assert ended.error.startswith(f"Jira sync #{ended.sync_id} failed: Jira answered HTTP 401 (not authenticated)")
    delivery = WebhookDelivery.objects.get()
    assert (delivery.event, delivery.status, delivery.attempts, delivery.response_status) == ("failed", "failed", 1,
                                                                                               404)
    assert delivery.error == "HTTP 404 from 127.0.0.1" and "secret-path" not in delivery.error
    assert hook.received[0]["body"]["text"].startswith(
        f"EmbedPortal · tickets: retrain #{ended.pk} failed: Jira sync #{ended.sync_id} failed: Jira answered HTTP 401")
    page = web.get(f"/datasets/{dataset.pk}/retraining/").content.decode()
    assert "Notifications not delivered" in page and "HTTP 404 from 127.0.0.1" in page
    assert "secret-path" not in page


# --- Pages and API: owner scope, query counts -----------------------------------------------------------------


@pytest.mark.django_db
def test_retraining_pages_and_endpoints_are_404_for_another_owner(web, api, other_user):
    theirs = Dataset.objects.create(owner=other_user, name="theirs", kind="tickets")
    occurrence = RetrainOccurrence.objects.create(owner=other_user, dataset=theirs, trigger="manual")
    for pk in (theirs.pk, theirs.pk + 1000):
        pages = [web.get(f"/datasets/{pk}/retraining/"), web.post(f"/datasets/{pk}/retraining/run"),
                 web.post(f"/datasets/{pk}/retraining/schedule", {"hour": "3"}),
                 web.post(f"/datasets/{pk}/retraining/jira", {"action": "unlink"}),
                 web.post(f"/datasets/{pk}/retraining/jira/test")]
        assert [p.status_code for p in pages] == [404] * 5
        calls = [api.get(f"/api/datasets/{pk}/retraining/"), api.put(f"/api/datasets/{pk}/retraining/", {},
                                                                      format="json"),
                 api.post(f"/api/datasets/{pk}/retraining/run/")]
        assert [(c.status_code, c.json()) for c in calls] == [(404, {"error": "Not found."})] * 3
    assert web.post(f"/retrains/{occurrence.pk}/cancel").status_code == 404
    assert api.get(f"/api/retrains/{occurrence.pk}/").status_code == 404
    assert api.post(f"/api/retrains/{occurrence.pk}/cancel/").status_code == 404
    assert api.get("/api/retrains/").json()["results"] == []
    occurrence.refresh_from_db()
    assert (occurrence.status, occurrence.cancel_requested) == ("queued", False)
    assert not RetrainSchedule.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("count", [1, 3])
def test_history_list_and_page_take_the_same_queries_for_one_or_three(web, api, user, dataset, count):
    champion = ModelVersion.objects.create(owner=user, name="tickets", version=1, base_model="b", artifact_path="/x",
                                           dimensions=8, dataset=dataset)
    for n in range(count):
        occurrence = RetrainOccurrence.objects.create(
            owner=user, dataset=dataset, trigger="schedule", status="succeeded", outcome="kept", champion=champion,
            challenger=champion, summary=f"kept v1: gain +0.00{n}", production_ndcg=0.5 + n / 100,
            scheduled_for=datetime(2024, 1, 1 + n, 2, tzinfo=dt_timezone.utc),
            finished_at=datetime(2024, 1, 1 + n, 3, tzinfo=dt_timezone.utc))
        WebhookDelivery.objects.create(occurrence=occurrence, event="promoted", host="hooks.example", status="failed",
                                       error="HTTP 500")
    with CaptureQueriesContext(db_connection) as api_queries:
        answer = api.get(f"/api/retrains/?dataset={dataset.pk}")
    with CaptureQueriesContext(db_connection) as page_queries:
        page = web.get(f"/datasets/{dataset.pk}/retraining/")
    assert (answer.status_code, answer.json()["count"]) == (200, count)
    first = answer.json()["results"][0]
    assert (first["champion"], first["deliveries"][0]["status"], first["url"]) == (
        "tickets v1", "failed", f"/api/retrains/{first['id']}/")
    assert len(api_queries) == 4  # token+user, count, occurrences with champion/challenger, deliveries
    assert page.status_code == 200
    assert len(page_queries) == 7  # session, user, dataset, Jira link, schedule, occurrences, their deliveries
    html = page.content.decode()
    points = json.loads(re.search(r'<script id="retrain-chart-data" type="application/json">(.*?)</script>', html,
                                  re.S).group(1))
    assert [p["ndcg"] for p in points] == [0.5 + n / 100 for n in range(count)]
    assert "static/vendor/chart.umd.min.js" in html and "<script>" not in html and " style=" not in html


def test_bin_run_keeps_a_private_credentials_key_that_fernet_accepts(tmp_path):
    from embedportal.launcher import local_http_env

    env = local_http_env(env={}, var_dir=tmp_path, host="127.0.0.1")
    again = local_http_env(env={}, var_dir=tmp_path, host="127.0.0.1")
    key_file = tmp_path / "credentials_key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert env["EMBEDPORTAL_CREDENTIALS_KEY"] == again["EMBEDPORTAL_CREDENTIALS_KEY"] == key_file.read_text().strip()
    sealed = Fernet(env["EMBEDPORTAL_CREDENTIALS_KEY"]).encrypt(b"token")
    assert Fernet(again["EMBEDPORTAL_CREDENTIALS_KEY"]).decrypt(sealed) == b"token"


@pytest.mark.django_db
def test_dashboard_shows_the_next_retrain_and_the_last_decision(web, user, dataset):
    retraining.save_schedule(dataset=dataset, owner=user, hour="2", minute="0", time_zone="UTC")
    RetrainOccurrence.objects.create(owner=user, dataset=dataset, status="succeeded", outcome="kept",
                                     summary="kept v7: gain +0.004, 95% CI [-0.011, +0.019] over 212 queries",
                                     finished_at=datetime(2024, 1, 2, 2, 9, tzinfo=dt_timezone.utc))
    RetrainOccurrence.objects.create(owner=user, dataset=dataset, status="succeeded", outcome="busy",
                                     summary="skipped: retrain #1 was still running",
                                     finished_at=datetime(2024, 1, 3, 2, 0, tzinfo=dt_timezone.utc))
    html = web.get("/").content.decode()
    following = retraining.next_run_at(RetrainSchedule.objects.get())
    assert f"{following:%Y-%m-%d} 02:00 UTC" in html
    assert "kept v7: gain +0.004, 95% CI [-0.011, +0.019] over 212 queries" in html
    assert "was still running" not in html  # a busy slot is not a decision
    assert f'href="/datasets/{dataset.pk}/retraining/"' in html


@pytest.mark.django_db
def test_a_new_dataset_starts_empty_and_linked_from_the_page_and_the_api(web, api, user):
    answer = api.post("/api/datasets/from-jira/", {"name": "hdfs", "base_url": "https://jira.example.com",
                                                   "flavor": "data_center", "jql": "project = HDFS", "token": PAT},
                      format="json")
    assert answer.status_code == 201, answer.content
    assert (answer.json()["name"], answer.json()["kind"], answer.json()["document_count"]) == ("hdfs", "tickets", 0)
    taken = api.post("/api/datasets/from-jira/", {"name": "hdfs", "base_url": "https://jira.example.com",
                                                  "flavor": "data_center", "jql": "project = HDFS", "token": PAT},
                     format="json")
    assert (taken.status_code, list(taken.json()["fields"])) == (400, ["name"])
    no_token = web.post("/datasets/from-jira/", {"name": "yarn", "base_url": "https://jira.example.com",
                                                 "flavor": "data_center", "jql": "project = YARN"})
    assert no_token.status_code == 400 and not Dataset.objects.filter(name="yarn").exists()  # all or nothing
    made = web.post("/datasets/from-jira/", {"name": "yarn", "base_url": "https://jira.example.com",
                                             "flavor": "data_center", "jql": "project = YARN", "token": PAT})
    yarn = Dataset.objects.get(name="yarn", owner=user)
    assert made.status_code == 302 and made["Location"] == f"/datasets/{yarn.pk}/retraining/"
    assert JiraConnection.objects.get(dataset=yarn).jql == "project = YARN"
