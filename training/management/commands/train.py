"""`manage.py train`: the same training service as the UI and API, in this process, with a progress bar."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from training import runs
from training.errors import ServiceError
from training.hyperparameters import LOSSES, HyperparameterError
from training.models import Dataset

PASSTHROUGH = ("loss", "epochs", "batch_size", "learning_rate", "warmup_ratio", "weight_decay", "max_seq_length",
               "gradient_accumulation_steps", "max_steps", "max_pairs", "seed", "early_stopping_patience",
               "checkpoint_steps", "matryoshka_dims")


class Command(BaseCommand):
    help = "Fine-tune a model on a dataset now (same service as the web UI and API)."

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="dataset id or name")
        parser.add_argument("--owner", help="username owning the dataset (needed when names repeat)")
        parser.add_argument("--base-model", default="", help="HF id or local folder (default: all-MiniLM-L6-v2)")
        parser.add_argument("--loss", choices=LOSSES)
        parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps")
        parser.add_argument("--no-evaluate", action="store_true", help="skip the held-out before/after evaluation")
        for name in PASSTHROUGH:
            if name != "loss":
                parser.add_argument(f"--{name.replace('_', '-')}", dest=name)

    def handle(self, *args, **opts):
        dataset = self._dataset(opts["dataset"], opts.get("owner"))
        hyper = {name: opts[name] for name in PASSTHROUGH if opts.get(name) not in (None, "")}
        if opts["no_evaluate"]:
            hyper["evaluate"] = False
        try:
            run = runs.start_run(
                owner=dataset.owner, dataset=dataset, base_model=opts["base_model"], hyperparameters=hyper, enqueue=False
            )
        except (ServiceError, HyperparameterError) as exc:
            raise CommandError(str(exc))
        self.stdout.write(f"Run #{run.pk} on {dataset.name}")
        bar = _Bar(self.stdout)
        run = runs.execute_run(run=run, device=opts["device"], echo=bar.line)
        bar.close()
        if run.status != run.Status.SUCCEEDED:
            raise CommandError(f"Run #{run.pk} {run.status}: {run.error}")
        systems = (run.evaluation or {}).get("systems", {})
        for name, values in systems.items():
            self.stdout.write(f"  {name:<18} nDCG@10 {values['ndcg@10']:.4f}  MRR@10 {values['mrr@10']:.4f}  "
                              f"Recall@10 {values['recall@10']:.4f}")
        self.stdout.write(self.style.SUCCESS(f"Run #{run.pk} succeeded: {run.model_version}"))

    def _dataset(self, ref: str, owner: str | None) -> Dataset:
        qs = Dataset.objects.select_related("owner")
        if owner:
            qs = qs.filter(owner=get_user_model().objects.filter(username=owner).first())
        found = list(qs.filter(pk=int(ref))) if ref.isdigit() else list(qs.filter(name=ref))
        if len(found) != 1:
            raise CommandError(f"dataset {ref!r}: {'not found' if not found else 'ambiguous; pass --owner'}.")
        return found[0]


class _Bar:
    """A one-line progress bar fed by the run's log lines (tqdm when it is installed)."""

    def __init__(self, out):
        from tqdm import tqdm

        self.out = out
        self.bar = tqdm(total=None, unit="step", dynamic_ncols=True)

    def line(self, text: str) -> None:
        import re

        match = re.search(r"step (\d+)/(\d+) loss ([\d.]+)", text)
        if match:
            step, total, loss = int(match[1]), int(match[2]), float(match[3])
            self.bar.total = total
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.refresh()
        else:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
