"""Names and references.

Names of domains, adapters, aliases and routers become parts of paths and URLs, so they are
validated in one place: 1-64 characters from `[A-Za-z0-9._-]`, starting with a letter or
digit, never containing `..`. A reference to an adapter version is one of

    NAME           the newest ready version of NAME
    NAME:3         version 3 of NAME
    NAME@staging   the version the alias `staging` of NAME points at
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import BadInputError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: the largest version number: versions are 32-bit INTEGER columns on PostgreSQL (and SQLite
#: overflows at 2**63), so a larger number is bad input, not a database failure
MAX_VERSION = 2**31 - 1
#: the domain the audit registers its baselines under (sequential, merged, joint): not a user
#: domain, so it is never audited, warm-started from, or used to serve another domain. The
#: registry owns domains, so the name lives here for every layer (training may not import plait).
BASELINE_DOMAIN = "plait-baselines"
_NAME_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', '..', spaces or control characters)"


def validate_name(value: object, what: str = "name") -> str:
    """Return `value` if it is a valid name, else raise `BadInputError` naming it.

    Args:
        value: the candidate name.
        what: what the name is for ("adapter name", "alias", ...), used in the message.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise BadInputError(f"invalid {what} {value!r}: {_NAME_RULE}")
    return value


def whole_number(value: object, what: str, minimum: int = 0, example: int | None = None) -> int:
    """Return `value` if it is a whole number >= `minimum`, else raise `BadInputError` naming it.

    The one check for "a whole number >= N" (booleans are refused: `True` is not a count).

    Args:
        value: the candidate.
        what: what the value is ("max length", "LoRA rank", ...), used in the message.
        minimum: the smallest value allowed.
        example: a good value shown in the message, e.g. 256.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f" (e.g. {example})" if example is not None else ""
        raise BadInputError(f"{what} {value!r} is invalid: use a whole number >= {minimum}{hint}")
    return value


@dataclass(frozen=True)
class Ref:
    """A parsed reference to an adapter version."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(text: object) -> Ref:
    """Parse `NAME`, `NAME:VERSION` or `NAME@ALIAS`.

    Raises:
        BadInputError: the text is not a valid reference; the message shows the forms.
    """
    if not isinstance(text, str):
        raise BadInputError(f"invalid reference {text!r}: use NAME, NAME:VERSION or NAME@ALIAS")
    forms = "use NAME, NAME:VERSION (e.g. legal:3) or NAME@ALIAS (e.g. legal@production)"
    if text.count(":") + text.count("@") > 1:
        raise BadInputError(f"invalid reference {text!r}: {forms}")
    if ":" in text:
        name, _, number = text.partition(":")
        if not number.isdigit() or not number.isascii() or int(number) < 1:
            raise BadInputError(f"invalid version {number!r} in reference {text!r}: versions are whole numbers from 1")
        # one spelling per version ("3", never "03"): refs are stored and compared as text
        # (a router's covered versions), so "legal:03" must not be a second name of legal:3
        if number.startswith("0") or int(number) > MAX_VERSION:
            raise BadInputError(f"invalid version {number!r} in reference {text!r}: write a whole number from 1 "
                                f"to {MAX_VERSION} without leading zeros, e.g. {name}:{min(int(number), MAX_VERSION)}")
        return Ref(validate_name(name, "adapter name"), version=int(number))
    if "@" in text:
        name, _, alias = text.partition("@")
        return Ref(validate_name(name, "adapter name"), alias=validate_name(alias, "alias"))
    try:
        return Ref(validate_name(text, "adapter name"))
    except BadInputError:
        raise BadInputError(f"invalid reference {text!r}: {forms}") from None
