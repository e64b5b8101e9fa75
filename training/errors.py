"""Training's errors are the project's (embedportal.errors); kept as a module so imports read naturally."""

from embedportal.errors import ConflictError, NotFoundError, ServiceError

__all__ = ["ConflictError", "NotFoundError", "ServiceError"]
