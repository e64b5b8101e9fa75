"""Q&A runs get held-out proof (issue #15): a split grouped by answer, questions retrieve their answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from tests.conftest import SHARED_DATA
from training import datasets, evaluation, pairs, runs
from training.datasets import dataset_examples
from training.models import TrainingRun

BANK = SHARED_DATA / "qa" / "bank-faq.csv"
STACKFAQ = SHARED_DATA / "qa" / "stackexchange-faq.json"


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def _no_answer_on_both_sides(examples, seed: int) -> tuple[int, int]:
    """Check the split; returns (held-out queries, answers in training question -> answer pairs)."""
    pair_set = pairs.build_pairs(examples=examples, strategy="qa", seed=seed)
    eval_set = evaluation.qa_eval_set(examples=examples, seed=seed)
    held_out_answers = {_fold(eval_set.texts[next(iter(eval_set.relevant[q]))]) for q in eval_set.queries}
    rows = set(pair_set.train)
    trained_answers = {_fold(e.body) for e in examples if (e.title, e.body[:pairs.MAX_PAIR_TEXT_CHARS]) in rows}
    assert not held_out_answers & trained_answers
    return len(eval_set.queries), len(trained_answers)


@pytest.mark.django_db
@pytest.mark.parametrize("path", [BANK, STACKFAQ], ids=["bank", "stackfaq"])
def test_qa_split_keeps_each_answer_on_one_side(user, path):
    # Given a real FAQ imported as a Q&A dataset
    dataset = datasets.import_dataset(owner=user, name=path.name, kind="qa", path=path, filename=path.name)
    examples = dataset_examples(dataset)
    # When the held-out set and the training pairs are built with the same seed
    queries, trained = _no_answer_on_both_sides(examples, seed=42)
    # Then there are held-out questions, answers that train, and no answer on both sides
    assert queries > 0 and trained > 0


@pytest.mark.django_db
def test_stackfaq_paraphrases_are_held_out_queries(user):
    dataset = datasets.import_dataset(owner=user, name="stackfaq", kind="qa", path=STACKFAQ, filename=STACKFAQ.name)
    eval_set = evaluation.qa_eval_set(examples=dataset_examples(dataset), seed=42)
    paraphrase_queries = [q for q in eval_set.queries if "~p" in eval_set.keys[q]]
    assert len(eval_set.texts) == dataset.documents.count()  # one answer per thread
    assert paraphrase_queries and len(paraphrase_queries) > len(eval_set.queries) / 2
    assert all(len(eval_set.relevant[q]) == 1 for q in eval_set.queries)


_texts = st.text(alphabet="abc ", min_size=1, max_size=6)


@hyp_settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(_texts, _texts, st.lists(_texts, max_size=2)), min_size=1, max_size=40),
       seed=st.integers(0, 1000))
def test_qa_split_never_puts_an_answer_on_both_sides_fuzzed(rows, seed):
    examples = [pairs.Example(key=f"r{i}", title=q, body=a, paraphrases=tuple(p)) for i, (q, a, p) in enumerate(rows)]
    eval_set = evaluation.qa_eval_set(examples=examples, seed=seed)
    pair_set = pairs.build_pairs(examples=examples, strategy="qa", seed=seed)
    held_out_groups = {pairs.answer_group(e) for e in examples if e.body.strip()
                       and pairs.group_split(pairs.answer_group(e), seed=seed) == "test"}
    rows = set(pair_set.train) | set(pair_set.validation)
    for e in examples:
        if pairs.answer_group(e) in held_out_groups:
            # Neither its question -> answer pair nor its paraphrase -> question pairs train or validate.
            assert (e.title, e.body[:pairs.MAX_PAIR_TEXT_CHARS]) not in rows
            assert not any((p, e.title) in rows for p in e.paraphrases if not any(
                o.title == e.title and pairs.answer_group(o) not in held_out_groups for o in examples))
    held_out_answer_texts = {e.body for e in examples if pairs.answer_group(e) in held_out_groups}
    assert {eval_set.texts[next(iter(eval_set.relevant[q]))] for q in eval_set.queries} <= held_out_answer_texts
    assert all(eval_set.doc_ids[next(iter(eval_set.relevant[q]))] < len(eval_set.doc_ids) for q in eval_set.queries)


@pytest.mark.django_db(transaction=True)
def test_qa_run_shows_base_and_fine_tuned_on_held_out_questions(web, user, tiny_model_dir):
    # Given a StackFAQ dataset and a short run of a tiny model
    dataset = datasets.import_dataset(owner=user, name="stackfaq", kind="qa", path=STACKFAQ, filename=STACKFAQ.name)
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir),
                         hyperparameters={"max_steps": 2, "batch_size": 8, "max_seq_length": 32}, enqueue=False)
    run = runs.execute_run(run=run, device="cpu")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    # Then its evaluation has the base and fine-tuned rows on the held-out questions, with the drill-down
    eval_set = evaluation.qa_eval_set(examples=dataset_examples(dataset), seed=42)
    assert run.evaluation["kind"] == "qa"
    assert list(run.evaluation["systems"]) == ["base", "fine_tuned"]
    assert run.evaluation["queries"] == len(eval_set.queries) == run.evaluation["systems"]["base"]["queries"]
    assert len(run.evaluation["per_query"]) == len(eval_set.queries)
    assert {row["query"] for row in run.evaluation["per_query"]} == {eval_set.keys[q] for q in eval_set.queries}
    # And the promotion guard reads it like a ticket run's
    paired = evaluation.scores_from_run(run.evaluation)
    assert paired is not None and len(paired.challenger) == len(eval_set.queries)
    assert run.model_version.metrics["held_out"] == run.evaluation["systems"]["fine_tuned"]
    html = web.get(f"/runs/{run.pk}/").content.decode()
    assert "<td>fine-tuned model</td>" in html and "Per query: what changed" in html
