from django.apps import AppConfig


class SearchConfig(AppConfig):
    name = "search"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from embedportal import jobs
        from search import receivers  # noqa: F401  (connects search's reactions to training's signals)
        from search.hybrid import hnsw_session_settings
        from search.vectors import drop_orphan_partitions

        # Partitions of deleted versions whose drop timed out (search.vectors.drop_partition) go at the next sweep.
        jobs.register_housekeeping(drop_orphan_partitions)

        connection_created.connect(hnsw_session_settings, dispatch_uid="search.hnsw_session_settings")
