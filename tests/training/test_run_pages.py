"""The Runs page compares runs (checkboxes, settings that differ, validation and held-out figures side by side)
and the run page's log box follows a running run (issue 16)."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from training import comparison
from training.models import Dataset, TrainingRun

pytestmark = pytest.mark.django_db


def _evaluation(ndcg: float) -> dict:
    return {"queries": 10, "systems": {
        "fine_tuned": {"ndcg@10": ndcg, "mrr@10": 0.5, "recall@1": 0.3, "recall@5": 0.6, "recall@10": 0.7,
                       "map@100": 0.4},
        "base": {"ndcg@10": 0.45}, "hybrid_fine_tuned": {"ndcg@10": ndcg + 0.01}, "keyword": {"ndcg@10": 0.47}}}


@pytest.fixture
def two_runs(user):
    dataset = Dataset.objects.create(owner=user, name="hadoop")
    a = TrainingRun.objects.create(
        owner=user, dataset=dataset, base_model="all-MiniLM-L6-v2", status=TrainingRun.Status.SUCCEEDED,
        hyperparameters={"epochs": 1, "learning_rate": 2e-5, "batch_size": 32},
        metrics={"best_validation_ndcg": 0.61, "validation_history": [[10, 0.6], [20, 0.61]], "final_loss": 0.9},
        evaluation=_evaluation(0.54))
    b = TrainingRun.objects.create(
        owner=user, dataset=dataset, base_model="all-MiniLM-L6-v2", status=TrainingRun.Status.SUCCEEDED,
        hyperparameters={"epochs": 3, "learning_rate": 2e-5, "batch_size": 32},
        metrics={"best_validation_ndcg": 0.66, "validation_history": [[10, 0.66]], "final_loss": 0.7},
        evaluation=_evaluation(0.52))
    return a, b


def test_compare_runs_marks_the_settings_that_differ_and_the_best_figures(two_runs):
    a, b = two_runs
    result = comparison.compare_runs(runs=[a, b])
    assert [(row.label, row.values, row.differs) for row in result.settings] == [
        ("dataset", ["hadoop", "hadoop"], False), ("base model", ["all-MiniLM-L6-v2"] * 2, False),
        ("batch_size", ["32", "32"], False), ("epochs", ["1", "3"], True), ("learning_rate", ["2e-05"] * 2, False)]
    assert result.differing == 1
    validation = {row.label: (row.values, row.best) for row in result.validation}
    assert validation["best validation nDCG@10"] == ([0.61, 0.66], 1)
    held_out = {row.label: (row.values, row.best) for row in result.held_out}
    assert held_out["held-out ndcg@10"] == ([0.54, 0.52], 0)
    assert held_out["held-out mrr@10"] == ([0.5, 0.5], None)
    assert held_out["held-out nDCG@10, base model"] == ([0.45, 0.45], None)


def test_compare_runs_of_a_run_without_evaluation_shows_none(user, two_runs):
    running = TrainingRun.objects.create(owner=user, dataset=two_runs[0].dataset, base_model="m")
    result = comparison.compare_runs(runs=[two_runs[0], running])
    assert {row.label: row.values for row in result.held_out}["held-out ndcg@10"] == [0.54, None]
    assert {row.label: row.best for row in result.held_out}["held-out ndcg@10"] is None


def test_runs_page_lists_runs_with_checkboxes_and_compares_the_ticked_ones(web, two_runs):
    a, b = two_runs
    html = web.get("/runs/compare/").content.decode()
    assert f'<input type="checkbox" name="ids" value="{a.pk}" id="run-{a.pk}"' in html
    assert f'<input type="checkbox" name="ids" value="{b.pk}" id="run-{b.pk}"' in html
    assert "Settings" not in html
    html = web.get("/runs/compare/", {"ids": [b.pk, a.pk]}).content.decode()
    assert "1 differs, highlighted" in html
    assert re.search(r'<tr class="differs"><th>epochs <span class="badge candidate">differs</span></th>'
                     r"<td>3</td><td>1</td></tr>", html)
    assert '<tr><th>batch_size</th><td>32</td><td>32</td></tr>' in html
    assert "Validation <span class=\"muted\">· during training, on the validation split" in html
    assert "Held-out <span class=\"muted\">· after training, on the TEST split" in html
    assert '<tr><th>best validation nDCG@10</th><td class="best">0.6600</td><td>0.6100</td></tr>' in html
    assert '<tr><th>held-out ndcg@10</th><td>0.5200</td><td class="best">0.5400</td></tr>' in html


def test_runs_page_ignores_other_users_runs_and_junk_ids(client, other_user, two_runs):
    client.force_login(other_user)
    response = client.get("/runs/compare/", {"ids": [two_runs[0].pk, "x", "9" * 30, "²", "-1", "1.5"]})
    html = response.content.decode()
    assert response.status_code == 200
    assert "Settings" not in html and f'value="{two_runs[0].pk}"' not in html


@pytest.mark.parametrize("count", [1, 3])
def test_runs_page_queries_do_not_grow_with_runs(web, user, count):
    dataset = Dataset.objects.create(owner=user, name="d")
    runs = [TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", evaluation=_evaluation(0.5))
            for _ in range(count)]
    web.get("/runs/compare/")  # session and user loaded once
    with CaptureQueriesContext(connection) as queries:
        response = web.get("/runs/compare/", {"ids": [r.pk for r in runs]})
    assert response.status_code == 200
    assert len(queries) == 4  # session, user, the ticked runs, the list


def test_dataset_page_runs_have_checkboxes_to_compare(web, two_runs):
    html = web.get(f"/datasets/{two_runs[0].dataset_id}/").content.decode()
    assert '<form method="get" action="/runs/compare/">' in html
    assert f'<input type="checkbox" name="ids" value="{two_runs[0].pk}"' in html
    assert "Compare the ticked runs" in html


def test_run_page_says_which_ndcg_is_validation_and_which_is_held_out(web, two_runs):
    html = web.get(f"/runs/{two_runs[0].pk}/").content.decode()
    assert "<tr><th>Validation nDCG@10 (best)</th><td>0.61 <span class=\"muted\">· measured during training on the " \
           "validation split" in html
    assert "The nDCG@10 in this table is the <strong>held-out</strong> (test) figure." in html


def test_log_box_polls_while_the_run_runs_and_stops_when_it_ends(web, user, two_runs):
    run = TrainingRun.objects.create(owner=user, dataset=two_runs[0].dataset, base_model="m",
                                     status=TrainingRun.Status.RUNNING, log="step 1\nstep 2")
    page = web.get(f"/runs/{run.pk}/").content.decode()
    assert f'<div class="card" id="run-log" hx-get="/runs/{run.pk}/log" hx-trigger="every 3s" hx-swap="outerHTML">' \
        in page
    TrainingRun.objects.filter(pk=run.pk).update(log="step 1\nstep 2\nstep 3")
    box = web.get(f"/runs/{run.pk}/log").content.decode()
    assert "step 3" in box and 'hx-get="/runs/' in box
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.SUCCEEDED, log="step 1\ndone")
    box = web.get(f"/runs/{run.pk}/log").content.decode()
    assert "done" in box and "hx-get" not in box and "hx-trigger" not in box


def test_log_box_shows_the_last_lines_of_a_long_log(web, user, two_runs):
    from training.views import LOG_LINES

    run = TrainingRun.objects.create(owner=user, dataset=two_runs[0].dataset, base_model="m",
                                     log="\n".join(f"line {i}" for i in range(LOG_LINES + 20)))
    box = web.get(f"/runs/{run.pk}/log").content.decode()
    assert f"The last {LOG_LINES} of {LOG_LINES + 20} lines." in box
    assert "line 19\n" not in box and f"line {LOG_LINES + 19}" in box


def test_log_of_another_users_run_is_404(client, other_user, two_runs):
    client.force_login(other_user)
    assert client.get(f"/runs/{two_runs[0].pk}/log").status_code == 404


def test_run_page_names_the_held_out_split_of_its_kind(web, user, two_runs):
    # A ticket run holds out duplicate clusters; a Q&A run, before its evaluation exists too, held-out answers.
    assert "(TEST split of the duplicate clusters, never trained on)" in web.get(f"/runs/{two_runs[0].pk}/").content.decode()
    faq = Dataset.objects.create(owner=user, name="faq", kind="qa")
    queued = TrainingRun.objects.create(owner=user, dataset=faq, base_model="all-MiniLM-L6-v2")
    html = web.get(f"/runs/{queued.pk}/").content.decode()
    assert "(questions of held-out answers, never trained on)" in html
    assert "duplicate clusters" not in html


def test_drilldown_shows_each_key_with_its_title_owner_scoped(web, user, other_user):
    from training.models import Document

    faq = Dataset.objects.create(owner=user, name="faq", kind="qa")
    Document.objects.create(dataset=faq, external_key="q-aa11", title="How do I reset my <b>PIN</b>?", body="Call us.")
    Document.objects.create(dataset=faq, external_key="q-bb22", title="Where is my card?", body="In the post.")
    theirs = Dataset.objects.create(owner=other_user, name="theirs", kind="qa")
    Document.objects.create(dataset=theirs, external_key="q-cc33", title="Someone else's secret", body="x")
    run = TrainingRun.objects.create(
        owner=user, dataset=faq, base_model="all-MiniLM-L6-v2", status=TrainingRun.Status.SUCCEEDED,
        evaluation={**_evaluation(0.6), "kind": "qa", "per_query": [
            {"query": "q-aa11", "relevant": ["answer of q-aa11"], "before": 0.0, "after": 1.0, "delta": 1.0,
             "top_before": ["answer of q-bb22", "answer of q-cc33"], "top_after": ["answer of q-aa11"]}]})
    html = web.get(f"/runs/{run.pk}/").content.decode()
    assert '<span title="q-aa11">How do I reset my &lt;b&gt;PIN&lt;/b&gt;?</span>' in html  # text, never markup
    assert '<span title="answer of q-bb22">Where is my card?</span>' in html
    assert "Someone else" not in html and "answer of q-cc33" in html  # another owner's key stays a bare key
