"""One definition of a ticket's text and links, shared by training and evaluation.

Training builds its duplicate clusters (and so the held-out TEST split) from
these links, and every evaluation must see exactly the same clusters: if one
side read only the export's `links` and the other also the links added by a
links-CSV upload (`extra_links`), a ticket attached by the upload could be
trained on and then scored as a held-out query, and a Jira CSV export whose
links all came from a links CSV would have nothing to evaluate on.
"""

from __future__ import annotations

# Characters of a document sent to the tokenizer: MiniLM truncates at 256
# tokens (~1,000-1,500 characters), so longer text only costs tokenizing time.
MAX_EMBED_CHARS = 4000


def ticket_text(title: str, body: str) -> str:
    """The text a model sees for a document: title, a newline, then the body (if any)."""
    return f"{title}\n{body}" if body else title


def ticket_links(metadata: dict | None) -> tuple[tuple[str, str], ...]:
    """(link type lower-cased, other key) of a document: the export's links plus uploaded extra links."""
    metadata = metadata or {}
    return tuple(
        (str(link.get("type", "")).lower(), str(link.get("key", "")))
        for link in [*(metadata.get("links") or []), *(metadata.get("extra_links") or [])]
        if isinstance(link, dict)
    )
