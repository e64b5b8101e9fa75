"""The one pagination of every API list: limit/offset with a ceiling on the page size.

DRF's LimitOffsetPagination without max_limit returned every row for
?limit=10000000 (runs carry their whole training log), and a limit past
PostgreSQL's bigint (?limit=99999999999999999999) reached the database as
LIMIT 99999999999999999999: a 500. Here a limit is clamped to 1..MAX_LIMIT
and an offset to 0..MAX_OFFSET; text that is not a whole number is a 400
naming the parameter.
"""

from __future__ import annotations

import re

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

MAX_LIMIT = 200
# Far beyond any table here, far below bigint (an offset past the count returns no rows).
MAX_OFFSET = 10**15
_WHOLE = re.compile(r"[0-9]+")


def _whole_number(raw: str, *, name: str, low: int, high: int) -> int:
    text = raw.strip()
    if not _WHOLE.fullmatch(text):
        raise ValidationError({name: [f"must be a whole number from {low} to {high}, got {raw[:40]!r}."]})
    # Never int() thousands of digits (ValueError past 4,300; slow before): anything this long is above high.
    value = int(text) if len(text) <= len(str(high)) else high
    return max(low, min(value, high))


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    """?limit= (default PAGE_SIZE, at most MAX_LIMIT) and ?offset=; out-of-range numbers are clamped."""

    max_limit = MAX_LIMIT

    def get_limit(self, request):
        raw = request.query_params.get(self.limit_query_param)
        if raw is None or raw == "":
            return self.default_limit
        return _whole_number(raw, name=self.limit_query_param, low=1, high=self.max_limit)

    def get_offset(self, request):
        raw = request.query_params.get(self.offset_query_param)
        if raw is None or raw == "":
            return 0
        return _whole_number(raw, name=self.offset_query_param, low=0, high=MAX_OFFSET)
