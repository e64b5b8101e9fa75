"""One ticket as a person reads it: its fields, its links resolved to tickets of the dataset, its Jira address.

Shared by the ticket page (search.views.similar_page) and the API
(GET /api/datasets/{id}/documents/{key}/), so both show the same links.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from training import datasets
from training.corpus import ticket_links
from training.models import Dataset, Document

# Metadata shown apart (links) or not meant for people (internal bookkeeping).
_NOT_FIELDS = {"links", "extra_links"}


@dataclass
class Link:
    type: str
    key: str
    document_id: int | None  # None when the linked ticket is not in this dataset


@dataclass
class Ticket:
    document: Document
    fields: list[tuple[str, str]] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    jira_url: str = ""
    jira_base: str = ""  # the dataset's Jira address, for its similar tickets' links


def jira_base_url(dataset: Dataset) -> str:
    """The dataset's Jira address (its connector's, else the one set by hand), "" when it has none."""
    return datasets.jira_base_url(dataset)


def jira_link(base: str, key: str) -> str:
    """{base}/browse/{key}, the key URL-quoted whole (a "/" or "?" in it stays part of the key); "" without a base."""
    return f"{base}/browse/{quote(key, safe='')}" if base and key else ""


def find(*, dataset: Dataset, key: str) -> Document | None:
    """The dataset's document with this key (as typed, or upper-cased as Jira writes keys)."""
    key = (key or "").strip()
    return Document.objects.filter(dataset=dataset, external_key__in={key, key.upper()}).first()


def ticket(*, document: Document) -> Ticket:
    """The document's readable fields, its links (to tickets of the same dataset where they exist), its Jira URL.

    Two queries whatever the number of links: the links' documents in one, the connector in one.
    """
    pairs = ticket_links(document.metadata)
    known = dict(
        Document.objects.filter(dataset_id=document.dataset_id, external_key__in={k for _, k in pairs})
        .values_list("external_key", "pk")
    )
    seen: set[tuple[str, str]] = set()
    links = []
    for link_type, key in pairs:
        if key and (link_type, key) not in seen:
            seen.add((link_type, key))
            links.append(Link(type=link_type, key=key, document_id=known.get(key)))
    fields = []
    for name, value in sorted((document.metadata or {}).items()):
        if name in _NOT_FIELDS or value in (None, "", []):
            continue
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        fields.append((name.replace("_", " "), shown))
    base = jira_base_url(document.dataset)
    return Ticket(document=document, fields=fields, links=links, jira_url=jira_link(base, document.external_key),
                  jira_base=base)


def serialize(t: Ticket) -> dict:
    doc = t.document
    return {
        "id": doc.pk, "dataset": doc.dataset_id, "key": doc.external_key, "title": doc.title, "body": doc.body,
        "metadata": doc.metadata, "jira_url": t.jira_url,
        "links": [{"type": link.type, "key": link.key, "document": link.document_id} for link in t.links],
    }
