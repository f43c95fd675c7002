"""The one error family of plait.

Every error a user can cause or meet is a `PlaitError` whose message names the bad value
and what to do about it. The CLI prints the message on one line and exits with
`exit_code`: 2 for bad input (the user can fix the command), 1 for a failure of the system
or of stored data (integrity, a crash of a dependency).
"""

from __future__ import annotations


class PlaitError(Exception):
    """Base of every error plait raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class BadInputError(PlaitError, ValueError):
    """The user gave a value plait cannot use (exit code 2)."""

    exit_code = 2


class NotFoundError(BadInputError, LookupError):
    """A reference, domain, alias or file does not exist (exit code 2)."""


class ConflictError(BadInputError):
    """The request clashes with what is stored, e.g. a duplicate name (exit code 2)."""


class StaleRouterError(ConflictError):
    """A router version was built from one that is no longer the newest (another writer registered
    one in between); reload the newest, apply the change again and retry (exit code 2)."""


class IntegrityError(PlaitError):
    """Stored data does not match what the registry recorded (exit code 1)."""


class IncompatibleBaseError(BadInputError):
    """An adapter was trained on another base model than the one in use (exit code 2)."""


class RefusedError(ConflictError):
    """A change a safety rule refuses unless the caller forces it (exit code 2).

    Raised for archiving a version a live router or alias still needs, and for promoting to
    `production` a version no passed audit covered. The message names the rule and the
    version; `force=True` on the same call overrides it (the CLI's `--force`).
    """
