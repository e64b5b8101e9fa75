"""One error shape for every API 4xx: {"error": "<one readable line>", "fields": {name: message}}.

A ServiceError raised by any service becomes its class's status here (400,
404, 409), so API views call services without try/except of their own.
"""

from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from embedportal.errors import ServiceError


def service_error_body(exc: ServiceError) -> dict:
    """{"error": message, "fields": {field: reason}} — a message "field: reason" also fills `fields`."""
    return {"error": str(exc), "fields": exc.by_field()}


def _first(messages) -> str:
    if isinstance(messages, (list, tuple)):
        return str(messages[0]) if messages else ""
    if isinstance(messages, dict):
        return "; ".join(f"{k}: {_first(v)}" for k, v in messages.items())
    return str(messages)


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        return Response(service_error_body(exc), status=exc.status)
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
