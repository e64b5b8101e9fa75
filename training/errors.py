class ServiceError(ValueError):
    """A request that cannot be carried out; the message says what to change.

    Messages that concern one input start with "<field>: " so the API can
    report them under that field.
    """
