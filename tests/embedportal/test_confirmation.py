"""Cancel, roll back and delete ask first (issue 16): a GET shows the question and changes nothing, a POST
without confirm=yes shows it again (400), only the confirmation page's POST acts; all owner-scoped."""

from __future__ import annotations

import pytest

from training.models import Dataset, ModelVersion, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(user) -> Dataset:
    return Dataset.objects.create(owner=user, name="hadoop")


@pytest.fixture
def run(user, dataset) -> TrainingRun:
    return TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", status=TrainingRun.Status.RUNNING)


@pytest.fixture
def version(user, dataset, tmp_path) -> ModelVersion:
    return ModelVersion.objects.create(owner=user, name="hadoop", version=1, base_model="m", dimensions=8,
                                       artifact_path=str(tmp_path / "v1"), dataset=dataset)


def _form(html: str, action: str) -> bool:
    return (f'<form method="post" action="{action}" class="actions">' in html
            and '<input type="hidden" name="confirm" value="yes">' in html)


def test_run_cancel_asks_first_then_cancels_on_the_confirmed_post(web, run):
    page = web.get(f"/runs/{run.pk}/cancel")
    html = page.content.decode()
    assert page.status_code == 200
    assert f"Cancel training run #{run.pk} on hadoop?" in html and _form(html, f"/runs/{run.pk}/cancel")
    run.refresh_from_db()
    assert run.cancel_requested is False
    unconfirmed = web.post(f"/runs/{run.pk}/cancel")
    run.refresh_from_db()
    assert (unconfirmed.status_code, run.cancel_requested) == (400, False)
    done = web.post(f"/runs/{run.pk}/cancel", {"confirm": "yes"})
    run.refresh_from_db()
    assert (done.status_code, done["Location"], run.cancel_requested) == (302, f"/runs/{run.pk}/", True)


def test_run_page_links_to_the_question_instead_of_posting(web, run):
    html = web.get(f"/runs/{run.pk}/").content.decode()
    assert f'<a class="button danger" href="/runs/{run.pk}/cancel">Cancel run…</a>' in html
    assert f'action="/runs/{run.pk}/cancel"' not in html


def test_dataset_delete_asks_first(web, dataset):
    html = web.get(f"/datasets/{dataset.pk}/delete").content.decode()
    assert "Delete the dataset hadoop?" in html and "This cannot be undone." in html
    assert web.post(f"/datasets/{dataset.pk}/delete").status_code == 400
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    response = web.post(f"/datasets/{dataset.pk}/delete", {"confirm": "yes"})
    assert (response.status_code, response["Location"]) == (302, "/datasets/")
    assert not Dataset.objects.filter(pk=dataset.pk).exists()


def test_model_delete_asks_first(web, version):
    html = web.get(f"/models/{version.pk}/delete").content.decode()
    assert f"Delete the model version {version}?" in html and _form(html, f"/models/{version.pk}/delete")
    assert web.post(f"/models/{version.pk}/delete").status_code == 400
    assert ModelVersion.objects.filter(pk=version.pk).exists()
    response = web.post(f"/models/{version.pk}/delete", {"confirm": "yes"})
    assert (response.status_code, response["Location"]) == (302, "/models/")
    assert not ModelVersion.objects.filter(pk=version.pk).exists()


def test_rollback_asks_first_and_changes_nothing_until_confirmed(web, dataset, version):
    ModelVersion.objects.filter(pk=version.pk).update(stage=ModelVersion.Stage.PRODUCTION)
    html = web.get(f"/datasets/{dataset.pk}/rollback").content.decode()
    assert "Roll hadoop back to its previous production version?" in html
    assert f"{version} stops serving search" in html
    assert web.post(f"/datasets/{dataset.pk}/rollback").status_code == 400
    version.refresh_from_db()
    assert version.stage == ModelVersion.Stage.PRODUCTION
    # Confirmed: the service runs (no earlier version to go back to here, so it says so and keeps production).
    response = web.post(f"/datasets/{dataset.pk}/rollback", {"confirm": "yes"}, follow=True)
    version.refresh_from_db()
    assert version.stage == ModelVersion.Stage.PRODUCTION
    assert response.redirect_chain == [("/models/", 302)]


@pytest.mark.parametrize("path", ["/runs/{run}/cancel", "/datasets/{dataset}/delete", "/models/{version}/delete",
                                  "/datasets/{dataset}/rollback"])
def test_confirmations_of_another_users_objects_are_404(client, other_user, run, dataset, version, path):
    client.force_login(other_user)
    url = path.format(run=run.pk, dataset=dataset.pk, version=version.pk)
    assert client.get(url).status_code == 404
    assert client.post(url, {"confirm": "yes"}).status_code == 404
    assert Dataset.objects.filter(pk=dataset.pk).exists() and ModelVersion.objects.filter(pk=version.pk).exists()
    assert TrainingRun.objects.get(pk=run.pk).cancel_requested is False


@pytest.mark.parametrize("path", ["/runs/{run}/cancel", "/datasets/{dataset}/delete"])
def test_confirmations_refuse_other_methods(web, run, dataset, path):
    assert web.put(path.format(run=run.pk, dataset=dataset.pk)).status_code == 405
