import logging

from celery import shared_task

from search import services
from search.models import SearchIndex

logger = logging.getLogger(__name__)


@shared_task(name="search.build_index")
def build_index(*, index_id: int) -> None:
    index = SearchIndex.objects.select_related("model_version", "dataset").filter(pk=index_id).first()
    if index is None:
        logger.warning("search index %s is gone; nothing to build", index_id)
        return
    services.build_index(index=index)


@shared_task(name="search.scan_duplicates")
def scan_duplicates(*, index_id: int) -> None:
    index = SearchIndex.objects.select_related("model_version").filter(pk=index_id).first()
    if index is None:
        logger.warning("search index %s is gone; no duplicate scan", index_id)
        return
    services.scan_duplicates(index=index)
