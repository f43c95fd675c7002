"""What every request passes before a route sees it: a request id, the API key, the body limit.

Plain ASGI middleware (no FastAPI), outermost first:

    RequestIdMiddleware   gives the request an id (`scope["state"]["request_id"]`) and answers
                          with it in the `X-Request-ID` header, errors included
    ApiKeyMiddleware      with a key set, every route but /health (and /metrics when
                          `ServerConfig.metrics_public`) needs
                          `Authorization: Bearer KEY` (what the openai client sends for `api_key`);
                          compared in constant time; else 401 before the body is read
    BodyLimitMiddleware   413 when `Content-Length` is over the limit, or when the streamed
                          body passes it, before the body is held whole; a body under the limit
                          is read here and handed on (the route would read it whole anyway)
"""

from __future__ import annotations

import hmac
import json
import uuid

from plait.server.protocol import APIError

PUBLIC_PATHS = frozenset({"/health"})
"""Routes answered without the API key (a load balancer's health check has none)."""


async def send_error(send, err: APIError, request_id: str | None, headers: list | None = None) -> None:
    """Answer an ASGI request with an OpenAI-shaped error."""
    body = json.dumps(err.body(request_id)).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def request_id_of(scope) -> str | None:
    """The id `RequestIdMiddleware` gave this request."""
    return scope.get("state", {}).get("request_id")


class RequestIdMiddleware:
    """Tags every HTTP request with a fresh id, sent back as `X-Request-ID`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", rid.encode())])
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """Refuses (401) every request but `public` paths without `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key: str, public: frozenset[str] | set[str] = PUBLIC_PATHS):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.public = frozenset(public)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            err = APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` "
                           "(the openai client's api_key)", code="invalid_api_key")
            return await send_error(send, err, request_id_of(scope), [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 for a request body over `limit` bytes, without holding more than `limit`."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size}, over the limit of {self.limit} bytes "
                        f"(--max-body-bytes); send a smaller one", code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await send_error(send, self._too_large(f"{length.decode(errors='replace')} bytes"),
                                    request_id_of(scope))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await send_error(send, self._too_large(f"over {size} bytes"), request_id_of(scope))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client's disconnect

        await self.app(scope, replay, send)
