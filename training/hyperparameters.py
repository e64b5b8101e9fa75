"""Hyperparameters of a training run: defaults, ranges and parsing.

The form, the API serializer and the `train` command all go through `parse()`
so a bad value is refused with the same message everywhere, before anything is
queued.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class HyperparameterError(ValueError):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    max_seq_length: int = 256
    # Caps so a demo run finishes in minutes on CPU; None means no cap.
    max_steps: int | None = None
    max_pairs: int | None = None
    seed: int = 42

    def as_dict(self) -> dict:
        return asdict(self)


# name -> (type, minimum, maximum, what to do when out of range)
RANGES: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 100),
    "batch_size": (int, 2, 4096),
    "learning_rate": (float, 1e-7, 1e-2),
    "warmup_ratio": (float, 0.0, 0.99),
    "max_seq_length": (int, 8, 8192),
    "max_steps": (int, 1, 10_000_000),
    "max_pairs": (int, 2, 100_000_000),
    "seed": (int, 0, 2**31 - 1),
}


def parse(raw: dict | None) -> Hyperparameters:
    """Validate a mapping of hyperparameters (strings allowed) into Hyperparameters.

    Unknown names and out-of-range values raise HyperparameterError naming each
    field and its allowed range. Empty values mean "use the default".
    """
    raw = dict(raw or {})
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
            number = kind(value)
            if kind is int and float(value) != number:
                raise ValueError
        except (TypeError, ValueError):
            errors[name] = f"must be {'a whole number' if kind is int else 'a number'}, got {value!r}"
            continue
        if not low <= number <= high:
            errors[name] = f"must be between {low:g} and {high:g}, got {number:g}"
            continue
        values[name] = number
    if errors:
        raise HyperparameterError(errors)
    return Hyperparameters(**values)
