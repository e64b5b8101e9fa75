"""Bounds on the JSON this product parses: nesting depth, number size, NUL characters.

Python's json module recurses once per nesting level (RecursionError near
1,000 levels: a 500 where it is not caught) and refuses integers above 4,300
digits with a plain ValueError (sys.set_int_max_str_digits), not a
JSONDecodeError. No export, mapping or API body of ours nests more than a
handful of levels, so anything deeper than MAX_DEPTH is refused with a message
naming what was being read, long before the interpreter's own limits.
All walks here are iterative: their cost is linear in the size of the value.
"""

from __future__ import annotations

import json
import sys
from typing import Any

# The deepest value we accept anywhere. Real Jira issues nest 6 levels
# (fields.issuelinks[].outwardIssue.fields.status); Atlassian Document Format
# bodies are checked by their own reader.
MAX_DEPTH = 20


class JSONLimitError(ValueError):
    """JSON that is not valid, nests deeper than allowed, or holds a number too long to read."""


def depth_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when lists/objects in `value` nest deeper than `limit` (a scalar has depth 0). Iterative."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes, *, what: str, limit: int = MAX_DEPTH, allow_nan: bool = True) -> Any:
    """json.loads with every failure a JSONLimitError whose message starts with `what`.

    what: the field or thing being read ("mapping", "the request body", "line 3"),
    so the message tells the person where the problem is. allow_nan=False refuses
    NaN and Infinity (DRF's STRICT_JSON).
    """
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _no_constants)
    except RecursionError:
        raise JSONLimitError(f"{what}: the JSON nests more than {limit} levels deep; send flatter data.") from None
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"{what}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from None
    except ValueError as exc:
        if "digits" in str(exc):  # "Exceeds the limit (4300 digits) for integer string conversion ..."
            raise JSONLimitError(f"{what}: a number in the JSON has more than {sys.get_int_max_str_digits():,} "
                                 "digits; send it as a string.") from None
        raise JSONLimitError(f"{what}: {exc}.") from None
    if depth_exceeds(value, limit):
        raise JSONLimitError(f"{what}: the JSON nests more than {limit} levels deep; send flatter data.")
    return value


def strip_nul(value: Any) -> Any:
    """A copy of a JSON value with NUL characters removed from every string, keys included.

    PostgreSQL text and jsonb cannot hold U+0000. Removing it from the values
    (not from the serialised text, where a literal backslash-u0000 typed by a
    person would be cut in half) keeps the JSON valid. Iterative; the caller
    bounds the depth first (depth_exceeds).
    """
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if not isinstance(value, (dict, list, tuple)):
        return value
    root: list = [None]
    # (source container, target container, key in target) work items.
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        source, target, slot = stack.pop()
        if isinstance(source, dict):
            copy: Any = {}
            # Pushed in reverse, so children are done in order: when two keys differ only by NUL,
            # the later one wins, as it would in a dict built from the cleaned items.
            items = [(key.replace("\x00", "") if isinstance(key, str) else key, child)
                     for key, child in source.items()]
            for clean_key, _ in items:
                copy[clean_key] = None
            stack.extend((child, copy, clean_key) for clean_key, child in reversed(items))
        elif isinstance(source, (list, tuple)):
            copy = [None] * len(source)
            for i, child in enumerate(source):
                stack.append((child, copy, i))
        elif isinstance(source, str):
            copy = source.replace("\x00", "") if "\x00" in source else source
        else:
            copy = source
        target[slot] = copy
    return root[0]
