"""The OpenAI wire format of `plait serve`: request bodies and error bodies.

Request bodies ignore fields they do not know (OpenAI clients send `user`, `logprobs` and
more) without keeping them, so an unknown field costs nothing past the body-size limit.

Error bodies are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}, "request_id"}`,
and name only references (`law:3`, `model`), never a local path or a raw exception: the
details go to the server log under the request id that the response also carries (the
`X-Request-ID` header).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from registry.errors import BadInputError, IntegrityError, NotFoundError
from routing.residency import AdapterSlotsFullError

log = logging.getLogger("plait.server")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    route_top_k: int | None = Field(default=None, description="plait: top-k blend size for model='auto'")


class CompletionBody(_Body):
    """POST /v1/completions."""

    prompt: str | list[str]


class ChatMessage(BaseModel):
    """One chat message (text content only)."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class RouteBody(BaseModel):
    """POST /v1/route."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    top_k: int = 1


class APIError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON body; `request_id` names the log lines that hold the details."""
        out: dict[str, Any] = {"error": {"message": self.message, "type": self.type, "param": self.param,
                                         "code": self.code}}
        if request_id is not None:
            out["request_id"] = request_id
        return out


def check_text(text: str, param: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} holds a lone surrogate at character {e.start} ({text[e.start]!r}), which is "
                       f"not valid Unicode; send UTF-8 text", param=param, code="invalid_text") from None
    return text


# three or more path components from the root: a local path, never a route like /v1/completions
_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/,;()]+/){2,}[^\s'\",;()]*")


def scrub(message: str, roots: tuple[str, ...] = ()) -> str:
    """`message` without local paths (`roots` first, then anything that looks like an absolute path)."""
    for root in sorted((r for r in roots if r), key=len, reverse=True):
        message = message.replace(root, "<path>")
    return _PATH.sub("<path>", message)


def api_error(exc: BaseException, request_id: str | None = None, roots: tuple[str, ...] = ()) -> APIError:
    """The HTTP error for an exception met while serving a request; logs what the client is not told.

    Args:
        exc: the exception.
        request_id: the request's id, written to the log with the details.
        roots: local paths to hide from messages that are passed on (workspace, base model).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterSlotsFullError):  # every slot is held by a running request: retry later
        from plait.commands._common import with_flags  # the operator's fix is a `plait serve` flag

        return APIError(503, scrub(with_flags(str(exc)), roots), type_="server_error", param="model",
                        code="adapter_slots_full")
    if isinstance(exc, NotFoundError):
        return APIError(400, scrub(str(exc), roots), param="model", code="model_not_found")
    if isinstance(exc, BadInputError):
        return APIError(400, scrub(str(exc), roots), code="bad_input")
    if isinstance(exc, IntegrityError):
        # stored data is wrong: not retryable by the client, and not the server's crash either
        log.error("request %s: integrity check failed: %s", request_id, exc)
        return APIError(422, f"the stored files of the adapter serving this request failed their integrity check "
                        f"and were refused (request id {request_id}; `plait registry verify` names it)",
                        type_="integrity_error", param="model", code="adapter_integrity_failed")
    log.error("request %s: internal error", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"internal server error (request id {request_id}); the server log has the details",
                    type_="server_error", code="internal_error")
