"""The errors services raise, each with the HTTP status the API answers with (mapped once in api_errors)."""


class ServiceError(ValueError):
    """A request that cannot be carried out; the message says what to change (HTTP 400).

    Messages that concern one input start with "<field>: " so the API can
    report them under that field.
    """

    status = 400
    # Set by errors that name several fields at once (field -> reason); else parsed from "field: reason".
    fields: dict[str, str] | None = None

    def by_field(self) -> dict[str, str]:
        """{field: reason} this error is about: `fields`, or the "field: reason" of its message, else {}.

        The one parser of that convention, for the API (api_errors) and for forms.
        """
        if self.fields is not None:
            return dict(self.fields)
        field, sep, reason = str(self).partition(":")
        return {field: reason.strip()} if sep and field.isidentifier() else {}


class NotFoundError(ServiceError):
    """Missing, or not the caller's: one answer for both (HTTP 404)."""

    status = 404


class ConflictError(ServiceError):
    """The object's state forbids it now (a job under way, a version in use): HTTP 409."""

    status = 409
