"""An optional PostgreSQL read replica for search (DATABASE_REPLICA_URL; docs/scaling.md).

With DATABASE_REPLICA_URL set, settings add the database alias "replica"
and this router. Search reads go there: the kNN and keyword SQL (through
`search_alias()`) and the ORM reads made inside `search_reads()` (hybrid
search is wrapped in it). Everything else stays on the primary: every write,
every read of a job row (a Job subclass: claims and fencing need the
primary's latest state), every read outside search, and every read made
inside a transaction on the primary (it may read its own uncommitted
writes). Without the setting there is one database and nothing here changes
a query.

A replica lags its primary by a little (streaming replication: usually well
under a second): a document imported a moment ago may be found a moment
later. Migrations run on the primary only.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

REPLICA = "replica"
_searching: ContextVar[bool] = ContextVar("embedportal_search_reads", default=False)


def replica_configured() -> bool:
    return REPLICA in settings.DATABASES


def search_alias() -> str:
    """The database alias a search read uses now: the replica when one is configured and no transaction is
    open on the primary, else the primary."""
    if replica_configured() and not connections[DEFAULT_DB_ALIAS].in_atomic_block:
        return REPLICA
    return DEFAULT_DB_ALIAS


@contextmanager
def search_reads() -> Iterator[None]:
    """ORM reads inside (of models that are not jobs) go to search_alias(); usable as a decorator."""
    token = _searching.set(True)
    try:
        yield
    finally:
        _searching.reset(token)


class ReplicaRouter:
    """Django's router protocol: reads inside search_reads() to the replica, all else to the primary."""

    def db_for_read(self, model, **hints) -> str:
        from embedportal.jobs import Job

        if _searching.get() and not issubclass(model, Job):
            return search_alias()
        return DEFAULT_DB_ALIAS

    def db_for_write(self, model, **hints) -> str:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1, obj2, **hints) -> bool:
        return True  # one database, two ways in

    def allow_migrate(self, db, app_label, model_name=None, **hints) -> bool:
        return db == DEFAULT_DB_ALIAS
