"""Request-body parsers with a size cap checked before anything is parsed.

Django's DATA_UPLOAD_MAX_MEMORY_SIZE guards only `request.body` and form
fields that Django itself parses; DRF's JSONParser and FormParser read the
raw stream to its end, so a 1 GB JSON body was read into memory and parsed
by a web worker. These read at most the cap plus one byte: a declared
Content-Length above the cap is refused unread, and a body that turns out
longer than it (chunked, or a lying header) is refused as soon as it passes.
File uploads (multipart) are not affected: they stream to disk under
EMBEDPORTAL_MAX_UPLOAD_MB (training.forms.limit_upload_size).
"""

from __future__ import annotations

from django.conf import settings
from django.http import QueryDict
from rest_framework import status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.settings import api_settings

from embedportal import json_limits

# settings.MAX_JSON_BODY_MB defaults to 16: 256 texts of 8,192 characters (the
# /api/embed limits) are 2 MB as ASCII JSON and up to 12.6 MB when every
# character is sent as a \uXXXX escape.


def max_body_bytes() -> int:
    return int(settings.MAX_JSON_BODY_MB * 1024 * 1024)


class RequestBodyTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"


def read_bounded(stream, parser_context: dict | None) -> bytes:
    """The body, refused with 413 above max_body_bytes() without reading more than one byte past it."""
    limit = max_body_bytes()
    request = (parser_context or {}).get("request")
    declared = request.META.get("CONTENT_LENGTH") if request is not None else None
    message = (f"The request body is larger than the {limit // 1048576} MB limit for JSON and form data "
               "(EMBEDPORTAL_MAX_JSON_BODY_MB); send less per request, or upload a file.")
    try:
        if declared and int(declared) > limit:
            raise RequestBodyTooLarge(message)
    except ValueError:
        pass  # a malformed header: the read below still stops at the limit
    if stream is None:
        return b""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise RequestBodyTooLarge(message)
    return data


class BoundedJSONParser(JSONParser):
    """JSONParser with the body cap, a nesting limit and every parse failure a 400."""

    def parse(self, stream, media_type=None, parser_context=None):
        raw = read_bounded(stream, parser_context)
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - the body is not {encoding} text ({exc}).") from None
        try:
            return json_limits.loads(text, what="request body",
                                    allow_nan=not api_settings.STRICT_JSON)
        except json_limits.JSONLimitError as exc:
            raise ParseError(str(exc)) from None


class BoundedFormParser(FormParser):
    """FormParser with the body cap (DRF's reads the whole stream)."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        return QueryDict(read_bounded(stream, parser_context), encoding=encoding)


# DRF's default parsers (JSON, form, multipart) with the cap on the first two.
API_PARSERS = [BoundedJSONParser, BoundedFormParser, MultiPartParser]
