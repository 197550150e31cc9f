"""The few named exceptions of Guard.

Adapters turn them into a refusal reason (hot path) or a clear message and exit code (CLI).
Each carries what went wrong in words an operator can act on.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base of every error Guard raises on purpose."""


class ConfigurationError(GuardError):
    """A setting, URL or configuration value is invalid; the message names it."""


class ValidationError(GuardError):
    """An input value (CLI argument, CSV row, request field) is invalid.

    ``field`` names the offending field so that messages can point at it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFoundError(GuardError):
    """A named object (tenant, extension, profile, …) does not exist."""


class StorageError(GuardError):
    """The counter store (Redis) failed or answered too late."""


class ConfigStoreError(GuardError):
    """The SQL configuration store is unreachable or refused a write."""
