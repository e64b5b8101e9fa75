from django.core.management.base import BaseCommand

from embedportal.setup_check import run_checks


class Command(BaseCommand):
    help = "Report Python, packages, device and GPU memory, disk, broker, database, workers and base models."

    def add_arguments(self, parser):
        parser.add_argument("--skip-models", action="store_true", help="do not try loading the base model")

    def handle(self, *args, **opts):
        checks = run_checks(load_models=not opts["skip_models"])
        for check in checks:
            mark = self.style.SUCCESS("ok  ") if check.ok else self.style.ERROR("FAIL")
            self.stdout.write(f"{mark} {check.name:<34} {check.detail}")
        failed = [c.name for c in checks if not c.ok]
        if failed:
            self.stdout.write(self.style.WARNING(f"{len(failed)} check(s) failed: {', '.join(failed)}"))
