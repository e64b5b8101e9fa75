"""One error shape for every API 4xx: {"error": "<one readable line>", "fields": {name: message}}."""

from rest_framework.exceptions import ValidationError
from rest_framework.views import exception_handler as drf_exception_handler


def _first(messages) -> str:
    if isinstance(messages, (list, tuple)):
        return str(messages[0]) if messages else ""
    if isinstance(messages, dict):
        return "; ".join(f"{k}: {_first(v)}" for k, v in messages.items())
    return str(messages)


def exception_handler(exc, context):
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ValidationError) and isinstance(response.data, dict):
        fields = {name: _first(messages) for name, messages in response.data.items()}
        response.data = {"error": "; ".join(f"{name}: {msg}" for name, msg in fields.items()), "fields": fields}
    elif isinstance(exc, ValidationError):
        response.data = {"error": _first(response.data), "fields": {}}
    elif isinstance(response.data, dict) and "detail" in response.data:
        response.data = {"error": str(response.data["detail"])}
    return response
