"""Hyperparameters of a training run: defaults, ranges and parsing.

The form, the API serializer and the `train` command all go through `parse()`
so a bad value is refused with the same message everywhere, before anything is
queued. Apart from worker_caps() (Django settings, read at call time) this
module knows nothing of Django.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from embedportal.errors import ServiceError
from training.pairs import DUPLICATE_ANCHORS

LOSSES = ("auto", "mnrl", "mnrl_symmetric", "cached_mnrl", "triplet", "contrastive", "online_contrastive", "cosine")
LOSS_LABELS = {
    "auto": "Chosen from the data's shape",
    "mnrl": "MultipleNegativesRankingLoss",
    "mnrl_symmetric": "MultipleNegativesSymmetricRankingLoss",
    "cached_mnrl": "CachedMultipleNegativesRankingLoss",
    "triplet": "TripletLoss (cosine distance)",
    "contrastive": "ContrastiveLoss",
    "online_contrastive": "OnlineContrastiveLoss",
    "cosine": "CosineSimilarityLoss",
}


class HyperparameterError(ServiceError):
    """Several fields refused at once: `errors` (also `fields`) maps each to its reason (HTTP 400)."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors
        self.fields = errors


@dataclass(frozen=True)
class Hyperparameters:
    loss: str = "auto"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_seq_length: int = 256
    gradient_accumulation_steps: int = 1
    # Caps so a demo run finishes in minutes on CPU; None means no cap.
    max_steps: int | None = None
    max_pairs: int | None = None
    seed: int = 42
    # In-batch negatives: keep two copies of one text out of the same batch.
    no_duplicates: bool = True
    # Stop after this many validations without improvement (None: never).
    early_stopping_patience: int | None = None
    # Save (and validate) every this many steps; None: once per epoch.
    checkpoint_steps: int | None = None
    keep_checkpoints: int = 2
    triplet_margin: float = 0.5
    # Matryoshka output dimensions, e.g. [384, 256, 128, 64]; empty: no wrapper.
    matryoshka_dims: tuple[int, ...] = ()
    # Evaluate base and fine-tuned models on the held-out TEST split.
    evaluate: bool = True
    # How training examples are built (training.pairs.STRATEGIES); "" = the dataset kind's default.
    strategy: str = ""
    # Tickets: also use same-component or same-issue-type tickets as weaker positives.
    weak_positives: str = ""
    # Turn pairs into (anchor, positive, negative) triplets mined with the base model.
    hard_negatives: bool = False
    # Tickets: the anchor of a duplicate pair. "title": a ticket's summary -> its duplicate's text (a typed
    # query); "both": one direction of each duplicate pair is summary -> text, the other text -> text (a
    # ticket as the query, as similar tickets and the held-out protocol ask).
    duplicate_anchor: str = "title"
    # Devices (processes) to train on: more than 1 runs the same fine-tuning under torchrun (DDP), each device
    # taking batch_size examples per step. None: every GPU the worker has, 1 on CPU. Capped at the worker by
    # what it has (GPUs, or EMBEDPORTAL_MAX_CPU_PROCESSES on CPU): training.distributed.devices_for.
    devices: int | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["matryoshka_dims"] = list(self.matryoshka_dims)
        return out

    @classmethod
    def from_stored(cls, stored: dict) -> "Hyperparameters":
        """Rebuild from a run row (tolerates rows written before a field existed)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in stored.items() if k in known}
        if "matryoshka_dims" in values:
            values["matryoshka_dims"] = tuple(values["matryoshka_dims"] or ())
        return cls(**values)


# name -> (type, minimum, maximum)
RANGES: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 100),
    "batch_size": (int, 2, 4096),
    "learning_rate": (float, 1e-7, 1e-2),
    "warmup_ratio": (float, 0.0, 0.99),
    "weight_decay": (float, 0.0, 1.0),
    "max_seq_length": (int, 8, 8192),
    "gradient_accumulation_steps": (int, 1, 1024),
    "max_steps": (int, 1, 10_000_000),
    "max_pairs": (int, 2, 100_000_000),
    "seed": (int, 0, 2**31 - 1),
    "early_stopping_patience": (int, 1, 1000),
    "checkpoint_steps": (int, 1, 10_000_000),
    "keep_checkpoints": (int, 1, 100),
    "triplet_margin": (float, 0.0, 10.0),
    "devices": (int, 1, 64),
}
# What one request may ask of a worker, below the sanity ranges above; an administrator
# raises them with the environment variable (settings name, default, variable). Memory grows
# with batch_size x max_seq_length (attention: with its square), time with epochs, steps and pairs.
WORKER_CAPS: dict[str, tuple[str, int, str]] = {
    "epochs": ("MAX_EPOCHS", 100, "EMBEDPORTAL_MAX_EPOCHS"),
    "batch_size": ("MAX_BATCH_SIZE", 512, "EMBEDPORTAL_MAX_BATCH_SIZE"),
    "max_seq_length": ("MAX_SEQ_LENGTH", 512, "EMBEDPORTAL_MAX_SEQ_LENGTH"),
    "max_steps": ("MAX_STEPS", 200_000, "EMBEDPORTAL_MAX_STEPS"),
    "max_pairs": ("MAX_PAIRS", 1_000_000, "EMBEDPORTAL_MAX_PAIRS"),
}
BOOLEANS = ("no_duplicates", "evaluate", "hard_negatives")
STRATEGY_NAMES = ("", "tickets", "qa", "labels", "pairs", "triplets")
WEAK_POSITIVES = ("", "component", "issue_type")
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def worker_caps() -> dict[str, int]:
    """The current WORKER_CAPS values, read from Django settings at call time."""
    from django.conf import settings

    return {name: int(getattr(settings, setting, default)) for name, (setting, default, _) in WORKER_CAPS.items()}


def parse(raw: dict | None) -> Hyperparameters:
    """Validate a mapping of hyperparameters (strings allowed) into Hyperparameters.

    Unknown names, out-of-range values and values above the server's worker
    caps raise HyperparameterError naming each field and what is allowed.
    Empty values mean "use the default".
    """
    raw = dict(raw or {})
    caps = worker_caps()
    known = {f.name for f in fields(Hyperparameters)}
    errors: dict[str, str] = {}
    for name in sorted(set(raw) - known):
        errors[name] = f"unknown hyperparameter; allowed: {', '.join(sorted(known))}"
    values: dict = {}
    for name, (kind, low, high) in RANGES.items():
        value = raw.get(name)
        if value is None or value == "":
            continue
        try:
            if isinstance(value, bool):
                raise ValueError
            number = kind(value)
            if kind is int and float(value) != number:
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
            errors[name] = f"must be {'a whole number' if kind is int else 'a number'}, got {value!r}"
            continue
        if not low <= number <= high:
            errors[name] = f"must be between {low:g} and {high:g}, got {number:g}"
            continue
        if name in caps and number > caps[name]:
            errors[name] = (f"must be at most {caps[name]} on this server, got {number}; "
                            f"an administrator can raise {WORKER_CAPS[name][2]}")
            continue
        values[name] = number
    for name in BOOLEANS:
        value = raw.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            values[name] = value
        elif str(value).strip().lower() in TRUE_WORDS | FALSE_WORDS:
            values[name] = str(value).strip().lower() in TRUE_WORDS
        else:
            errors[name] = f"must be true or false, got {value!r}"
    loss = raw.get("loss")
    if loss not in (None, ""):
        if loss not in LOSSES:
            errors["loss"] = f"must be one of {', '.join(LOSSES)}, got {loss!r}"
        else:
            values["loss"] = loss
    for name, allowed in (("strategy", STRATEGY_NAMES), ("weak_positives", WEAK_POSITIVES),
                          ("duplicate_anchor", DUPLICATE_ANCHORS)):
        value = raw.get(name)
        if value in (None, ""):
            continue
        if value not in allowed:
            errors[name] = f"must be one of {', '.join(a for a in allowed if a)}, got {value!r}"
        else:
            values[name] = value
    dims = raw.get("matryoshka_dims")
    if dims not in (None, "", []):
        parsed = _parse_dims(dims)
        if parsed is None:
            errors["matryoshka_dims"] = f"must be a list of whole numbers from largest to smallest, got {dims!r}"
        else:
            values["matryoshka_dims"] = parsed
    if errors:
        raise HyperparameterError(errors)
    return Hyperparameters(**values)


def _parse_dims(dims) -> tuple[int, ...] | None:
    items = dims.replace(" ", "").split(",") if isinstance(dims, str) else dims
    try:
        parsed = tuple(int(item) for item in items)
    except (TypeError, ValueError):
        return None
    if not parsed or any(d < 1 for d in parsed) or list(parsed) != sorted(parsed, reverse=True):
        return None
    return parsed
