"""Secrets at rest: Jira tokens and webhook URLs are sealed with Fernet before they reach the database.

Fernet (the `cryptography` package: AES-128-CBC + HMAC-SHA256, timestamped)
is the field's standard for "encrypt this small secret with a key from the
environment". The keys come from EMBEDPORTAL_CREDENTIALS_KEY
(settings.CREDENTIALS_KEYS, comma-separated): the first seals, every one of
them opens, so an operator rotates by putting a new key first. A sealed value
is only ever opened right before the request that needs it; it is never shown,
logged or serialized.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

from training.errors import ServiceError

NO_KEY = (
    "credentials cannot be stored: this server has no EMBEDPORTAL_CREDENTIALS_KEY (bin/run creates one in "
    "var/credentials_key; otherwise generate one with `python -c \"from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())\"`). Ask your administrator."
)


def _fernet() -> MultiFernet:
    keys = [key for key in getattr(settings, "CREDENTIALS_KEYS", []) if key]
    if not keys:
        raise ServiceError(NO_KEY)
    try:
        return MultiFernet([Fernet(key.encode() if isinstance(key, str) else key) for key in keys])
    except ValueError as exc:  # not 32 url-safe base64-encoded bytes
        raise ServiceError(f"EMBEDPORTAL_CREDENTIALS_KEY is not a Fernet key ({exc}); ask your administrator.") from None


def seal(secret: str) -> str:
    """The secret encrypted with the first key (ASCII text, safe to store)."""
    return _fernet().encrypt(secret.encode("utf-8")).decode("ascii")


def unseal(sealed: str, *, what: str) -> str:
    """The secret back; ServiceError naming `what` when no configured key opens it."""
    try:
        return _fernet().decrypt(sealed.encode("ascii")).decode("utf-8")
    except (InvalidToken, ValueError):
        raise ServiceError(
            f"{what}: the stored value cannot be decrypted with this server's EMBEDPORTAL_CREDENTIALS_KEY "
            "(was the key changed?); enter it again."
        ) from None
