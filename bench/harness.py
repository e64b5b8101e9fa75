"""Shared pieces of the benchmarks: a private database, figures and targets."""

from __future__ import annotations

import gzip
import json
import operator
import os
import resource
import secrets
import tempfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def setup_django() -> None:
    """Django on a throwaway embedded PostgreSQL (or DATABASE_URL), migrated."""
    from embedportal.embedded_pg import use_throwaway_var_dir

    use_throwaway_var_dir("embedportal-bench-")
    # A bench's throwaway database needs no lasting key; its servers answer plain HTTP on 127.0.0.1 only.
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.setdefault("EMBEDPORTAL_LOCAL_HTTP", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "embedportal.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def summary(name: str, figures: dict, targets: dict[str, str]) -> dict:
    """targets: figure name -> "<op> <number>", e.g. "<= 15"."""
    checked = {}
    for figure, target in targets.items():
        op, number = target.split()
        value = figures[figure]
        checked[figure] = {"value": value, "target": target, "met": bool(_OPS[op](value, float(number)))}
    return {"bench": name, "figures": figures, "targets": checked, "all_met": all(t["met"] for t in checked.values())}


def subset_file(source: Path, limit: int) -> Path:
    """A Jira JSON file with the first `limit` issues plus every issue that has a Duplicate
    link inside the export, so the DATA.md protocol's clusters stay complete."""
    with gzip.open(source, "rt") if source.suffix == ".gz" else open(source) as fh:
        issues = json.load(fh)["issues"]
    keys = {i["key"] for i in issues}
    linked = {
        i["key"] for i in issues
        for link in i["fields"].get("issuelinks") or []
        if (link.get("type") or {}).get("name") == "Duplicate"
        and ((link.get("outwardIssue") or link.get("inwardIssue") or {}).get("key") in keys)
    }
    chosen = [i for n, i in enumerate(issues) if n < limit or i["key"] in linked]
    out = Path(tempfile.mkdtemp(prefix="embedportal-subset-")) / "subset.json"
    out.write_text(json.dumps({"issues": chosen}))
    return out
