from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from embedportal import jobs
        from training import import_jobs, retraining

        # Previews nobody imported expire, and files of ended imports go, with every reaper pass.
        jobs.register_housekeeping(import_jobs.expire_staged)
        # A retrain the reaper failed (its worker died) still notifies the dataset's webhook.
        jobs.register_housekeeping(retraining.notify_failed)
