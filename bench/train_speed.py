"""Training throughput (issue: training runs): the product's fine_tune against a
plain SentenceTransformerTrainer loop with the same settings, in one run.

Both train all-MiniLM-L6-v2 with MultipleNegativesRankingLoss on the same
Hadoop pairs; the product adds its progress callback (with batched writes to a
run row), cancellation checks and checkpoint bookkeeping. Runs alternate
(product, plain, product, plain) and the median pairs/s of each is compared.
Target: product / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import SHARED_DATA, emit, setup_django, summary


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench train-speed")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    setup_django()
    from django.contrib.auth import get_user_model

    from training import datasets, finetune, runs
    from training.hyperparameters import parse
    from training.pairs import build_ticket_pairs

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    dataset = datasets.import_dataset(owner=owner, name="speed", kind="tickets", path=args.data, filename=args.data.name)
    pairs = build_ticket_pairs(datasets.dataset_tickets(dataset), max_pairs=args.steps * args.batch_size, seed=1)
    hyper = parse({"max_steps": args.steps, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
                   "warmup_ratio": 0.1, "evaluate": False})
    device = finetune.pick_device(args.device)
    run_row = runs.start_run(owner=owner, dataset=dataset, hyperparameters=hyper.as_dict(), enqueue=False)
    ours, plain = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            writer = runs._ProgressWriter(run_row)
            result = finetune.fine_tune(
                base_model="sentence-transformers/all-MiniLM-L6-v2", data=finetune.TrainingData.from_pairs(pairs),
                output_dir=Path(out), hyper=hyper, device=device, on_progress=writer.update,
                on_checkpoint=writer.checkpoint, on_log=writer.log, should_stop=writer.cancel_requested,
            )
            ours.append(result.steps * args.batch_size / result.duration_s)
            emit({"system": "embedportal fine_tune", "repeat": repeat, "pairs_per_s": round(ours[-1], 2)})
        plain.append(_plain_loop(pairs, hyper, device))
        emit({"system": "plain SentenceTransformerTrainer", "repeat": repeat, "pairs_per_s": round(plain[-1], 2)})
    figures = {
        "device": device,
        "pairs": len(pairs),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "embedportal_pairs_per_s": round(statistics.median(ours), 2),
        "plain_pairs_per_s": round(statistics.median(plain), 2),
    }
    figures["ratio"] = round(figures["embedportal_pairs_per_s"] / figures["plain_pairs_per_s"], 3)
    return summary("train-speed", figures, {"ratio": ">= 0.95"})


def _plain_loop(pairs, hyper, device) -> float:
    """The baseline: SentenceTransformerTrainer as its documentation shows it, same settings."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from transformers.trainer_callback import PrinterCallback

    from training.finetune import load_model

    model = load_model("sentence-transformers/all-MiniLM-L6-v2", device=device, max_seq_length=hyper.max_seq_length)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=hyper.max_steps, per_device_train_batch_size=hyper.batch_size,
            learning_rate=hyper.learning_rate, warmup_steps=hyper.warmup_ratio, weight_decay=hyper.weight_decay,
            seed=hyper.seed, bf16=bf16, fp16=device == "cuda" and not bf16, use_cpu=device == "cpu",
            batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", disable_tqdm=True,
            logging_steps=max(1, min(50, hyper.max_steps // 20)),
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args,
            train_dataset=Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]}),
            loss=MultipleNegativesRankingLoss(model),
        )
        trainer.remove_callback(PrinterCallback)  # keep stdout to JSON lines, as the product does
        started = time.monotonic()
        output = trainer.train()
        elapsed = time.monotonic() - started
    return output.global_step * hyper.batch_size / elapsed
