"""The HTTP side of `plait serve`: FastAPI routes over the batcher, and `serve()`.

A generation route validates its body, templates and tokenises it on the intake thread (CPU
work never runs on the event loop), submits it to the `Batcher` and turns the batcher's
events into an OpenAI response: one JSON body, or server-sent events for `stream: true`. A
client that goes away is noticed (a closed stream, or a disconnect while a plain request
waits) and its request is cancelled in the batcher, which frees its rows at the next step.
"""

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import time
from pathlib import Path
from typing import Any

from plait.server.batcher import Delta, Done, Failed, Finished, QueueFullError, Started, Ticket
from plait.server.config import ServerConfig
from plait.server.continuous import make_batcher
from plait.server.guard import PUBLIC_PATHS, ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware, request_id_of
from plait.server.intake import Intake
from plait.server.metrics import CONTENT_TYPE, ServerMetrics
from plait.server.protocol import APIError, ChatBody, CompletionBody, RouteBody, api_error
from registry.errors import BadInputError, NotFoundError

log = logging.getLogger("plait.server")


def base_model_name(routed) -> str | None:
    """The base model's name as clients may see it: a named model, never a local folder."""
    name = str(routed.ws.config.base_model)
    return None if ("/" in name or "\\" in name or Path(name).exists()) else name


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Routes:
    """The state the route handlers share: the routed model, batcher, intake and limits."""

    def __init__(self, routed, config: ServerConfig):
        self.routed = routed
        self.config = config
        self.metrics = ServerMetrics()
        self.batcher = make_batcher(routed, config, self.metrics)  # config.scheduler: continuous or static
        self.intake = Intake(routed.engine.tokenizer, config)
        # one thread: templating and tokenising leave the event loop but never race each other
        self.intake_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-intake")
        roots = {str(routed.ws.path), str(Path(routed.ws.path).resolve()), str(routed.ws.config.base_model)}
        self.roots = tuple(r for r in roots if "/" in r)

    def error(self, exc: BaseException, request) -> APIError:
        return api_error(exc, request_id_of(request.scope), self.roots)

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.intake_pool, fn, *args)

    def cancel(self, ticket: Ticket, request) -> None:
        if self.batcher.cancel(ticket):
            log.info("request %s: the client went away; cancelled", request_id_of(request.scope))

    def submit(self, gen) -> Ticket:
        try:
            return self.batcher.submit(gen)
        except QueueFullError:
            raise APIError(503, f"the server is busy: {self.config.max_queue} requests are waiting "
                           f"(--max-queue); retry shortly", type_="server_error", code="queue_full") from None

    async def answer(self, kind: str, body, request):
        self.metrics.request_started(kind)
        outcome = _Outcome(kind, self.metrics)
        try:
            gen = await self.off_loop(self.intake.completion if kind == "completion" else self.intake.chat, body)
            ticket = self.submit(gen)
            if gen.stream:
                return await self.stream(kind, ticket, request, outcome)
            return await self.collect(kind, ticket, request, outcome)
        except BaseException as e:
            outcome.finish(_status_of(e))
            raise

    # ------------------------------------------------------------------ one JSON answer
    async def collect(self, kind: str, ticket: Ticket, request, outcome: "_Outcome"):
        """Wait for the answer, cancelling the request if the client disconnects meanwhile."""
        from starlette.responses import Response

        served: dict[int, dict] = {}

        async def consume() -> Done:
            async for event in ticket:
                if isinstance(event, Started):
                    served[event.index] = event.served
                elif isinstance(event, Failed):
                    raise event.error
                elif isinstance(event, Done):
                    return event
            raise RuntimeError("the batcher closed a request without an answer")

        answered, done = await self.unless_gone(consume(), ticket, request)
        if not answered:
            outcome.finish("cancelled")
            return Response(status_code=499)  # nobody reads it
        outcome.finish("ok", done)
        return _json_answer(kind, ticket, served, done)

    async def unless_gone(self, awaitable, ticket: Ticket, request) -> tuple[bool, Any]:
        """Await `awaitable` unless the client disconnects first, which cancels `ticket`.

        Returns:
            (True, its result), or (False, None) when the client went away.

        Raises:
            APIError: what `awaitable` raised, as an OpenAI error.
        """
        task = asyncio.ensure_future(awaitable)
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                return False, None
            try:
                return True, task.result()
            except Exception as e:  # noqa: BLE001 - answered as an OpenAI error
                raise self.error(e, request) from None
        finally:
            watcher.cancel()
            if not task.done():  # the client went away, or this handler itself was cancelled
                task.cancel()
                self.cancel(ticket, request)

    # ------------------------------------------------------------------ server-sent events
    async def stream(self, kind: str, ticket: Ticket, request, outcome: "_Outcome"):
        from starlette.responses import Response, StreamingResponse

        # an unknown adapter fails here, before the stream starts; so does a client gone while queued
        answered, first = await self.unless_gone(ticket.next_event(), ticket, request)
        if not answered:
            outcome.finish("cancelled")
            return Response(status_code=499)
        if isinstance(first, Failed):
            raise self.error(first.error, request)
        chunk = _chunker(kind, ticket)

        async def events():
            served: dict[int, dict] = {}
            event = first
            try:
                while True:
                    if isinstance(event, Started):
                        served[event.index] = event.served
                        yield _sse(chunk(event.index, "", None, event.served, role=True))
                    elif isinstance(event, Delta):
                        yield _sse(chunk(event.index, event.text, None))
                    elif isinstance(event, Finished):
                        yield _sse(chunk(event.index, None, event.reason, served.get(event.index)))
                    elif isinstance(event, Failed):
                        outcome.finish(_status_of(event.error))
                        yield _sse(self.error(event.error, request).body(request_id_of(request.scope)))
                        break
                    elif isinstance(event, Done):
                        outcome.finish("ok", event)
                        break
                    event = await ticket.next_event()
                yield "data: [DONE]\n\n"
            finally:  # the client closed the stream (starlette cancels us) or it ended: free the rows
                self.cancel(ticket, request)
                outcome.finish("cancelled")  # no-op when it finished above

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ the other routes
    async def route(self, body: RouteBody, request):
        texts = await self.off_loop(self.intake.route_inputs, body)
        try:  # on the batch thread: routing may load adapters, which must not overlap a batch
            served = await self.batcher.run_exclusive(self.routed.route, texts, body.top_k)
        except Exception as e:  # noqa: BLE001
            raise self.error(e, request) from None
        return {"object": "list", "data": [{"index": i, "domain": s.domain, "adapters": s.adapters,
                                            "scores": None if s.scores is None else dict(s.scores),
                                            "confidence": s.confidence} for i, s in enumerate(served)]}

    def render_metrics(self) -> str:
        """The `/metrics` text (call off the event loop: residency figures may wait for a batch)."""
        self.metrics.queue_depth(self.batcher.queue_depth())
        stats = getattr(self.routed, "residency_stats", None)
        residency = stats() if callable(stats) else {"resident": len(self.routed.engine.adapters)}
        return self.metrics.render(residency)

    def health(self) -> dict[str, Any]:
        info = self.routed.router_info
        return {"status": "ok", "base_model": base_model_name(self.routed),
                "base_fingerprint": self.routed.engine.fingerprint,
                "router": info.ref if info is not None else None,
                "adapters_loaded": sorted(self.routed.engine.adapters), "queue": self.batcher.queue_depth(),
                "residency": self.routed.residency_stats(),
                "stats": self.batcher.stats()}


class _Outcome:
    """Reports to the metrics, once, how one generation request ended and the usage it answered."""

    def __init__(self, kind: str, metrics: ServerMetrics):
        self.kind = kind
        self.metrics = metrics
        self.reported = False

    def finish(self, status: str, done: Done | None = None) -> None:
        if self.reported:
            return
        self.reported = True
        rows = done.rows if done is not None else []
        self.metrics.request_finished(self.kind, status, sum(r.prompt_tokens for r in rows),
                                      sum(r.completion_tokens for r in rows))


def _status_of(exc: BaseException) -> str:
    """The metrics status of a request that ended in `exc` (see `plait.server.metrics.STATUSES`)."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, (BadInputError, NotFoundError)):
        return "invalid"
    if isinstance(exc, APIError):
        if exc.code == "queue_full":
            return "rejected"
        return "invalid" if 400 <= exc.status < 500 and exc.code != "adapter_integrity_failed" else "error"
    return "error"


async def _disconnected(receive) -> None:
    """Return when the client disconnects (the body was read already: nothing else arrives)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _json_answer(kind: str, ticket: Ticket, served: dict[int, dict], done: Done) -> dict[str, Any]:
    rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{ticket.id}"
    choices = []
    for c in done.rows:
        extra = {"plait": served.get(c.index)}
        if kind == "completion":
            choices.append({"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                            **extra})
        else:
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": None, "finish_reason": c.finish_reason, **extra})
    p = sum(c.prompt_tokens for c in done.rows)
    g = sum(c.completion_tokens for c in done.rows)
    return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
            "created": ticket.created, "model": ticket.request.model, "choices": choices,
            "usage": {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}}


def _chunker(kind: str, ticket: Ticket):
    """A function building one OpenAI stream chunk of `ticket`."""
    rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{ticket.id}"
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

    def chunk(index: int, text: str | None, finish: str | None, plait: dict | None = None,
              role: bool = False) -> dict:
        if kind == "completion":
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        else:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        if plait is not None:
            choice["plait"] = plait
        return {"id": rid, "object": obj, "created": ticket.created, "model": ticket.request.model,
                "choices": [choice]}

    return chunk


def _install_error_handlers(app, routes: _Routes) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def respond(err: APIError, request) -> JSONResponse:
        return JSONResponse(err.body(request_id_of(request.scope)), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return respond(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where}: {first.get('msg', 'invalid')}"
        return respond(APIError(400, message, param=where if loc else None), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return respond(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)), request)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        # answered outside the request-id middleware (starlette's outermost layer): add the header here
        rid = request_id_of(request.scope)
        err = routes.error(exc, request)
        return JSONResponse(err.body(rid), status_code=err.status, headers={"X-Request-ID": rid or ""})


def create_app(routed, config: ServerConfig | None = None, *, api_key: str | None = None):
    """The FastAPI app serving `routed` (a `plait.service.RoutedModel`).

    Args:
        routed: the routed model.
        config: limits and batching settings (default `ServerConfig()`).
        api_key: when given, every route but /health (and /metrics with `config.metrics_public`)
            needs `Authorization: Bearer <api_key>`.

    Returns:
        A FastAPI app; run it with uvicorn (`plait serve` does). `app.state.batcher` is the batcher
        (`ContinuousBatcher` or the static `Batcher`, as `config.scheduler` says).
    """
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    config = config or ServerConfig()
    if config.max_prompt_tokens > routed.engine.max_length:
        raise BadInputError(f"max_prompt_tokens {config.max_prompt_tokens} is over the engine's max_length "
                            f"{routed.engine.max_length}; lower --max-prompt-tokens")
    routes = _Routes(routed, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await routes.batcher.start()
        try:
            yield
        finally:
            await routes.batcher.stop()
            routes.intake_pool.shutdown(wait=False, cancel_futures=True)

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="plait", description="OpenAI-compatible routed adapter serving", lifespan=lifespan, **docs)
    app.state.batcher = routes.batcher
    app.state.metrics = routes.metrics
    _install_error_handlers(app, routes)
    # added last = outermost: the id first, then the key (before any body is read), then the body limit
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    if api_key:
        public = PUBLIC_PATHS | ({"/metrics"} if config.metrics_public else set())
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, public=public)
    app.add_middleware(RequestIdMiddleware)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await routes.answer("completion", body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        return await routes.answer("chat", body, request)

    @app.get("/v1/models")
    async def models():
        return await run_in_threadpool(list_models, routed)

    @app.post("/v1/route")
    async def route(body: RouteBody, request: Request):
        return await routes.route(body, request)

    @app.get("/health")
    async def health():
        return routes.health()

    @app.get("/metrics")
    async def metrics():
        return Response(await run_in_threadpool(routes.render_metrics), media_type=CONTENT_TYPE)

    return app


def list_models(routed) -> dict[str, Any]:
    """The `/v1/models` listing: every `model` a request may name and what it serves now.

    auto, base, every ready version (NAME:V), every adapter name (NAME: its newest ready
    version) and every alias of a ready version (NAME@A). An adapter entry's `plait.ref` is
    the exact version it serves and `plait.loaded` whether that version is resident in the
    engine now (the first request to name one that is not loads it).
    """
    reg = routed.registry
    now = int(time.time())
    loaded = set(list(routed.engine.adapters))  # a snapshot: the batch thread may load one meanwhile

    def entry(mid: str, **plait: Any) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": now, "owned_by": "plait", "plait": plait}

    def served(mid: str, v) -> dict[str, Any]:
        return entry(mid, ref=v.ref, domain=v.domain, kind=v.kind, loaded=v.ref in loaded)

    data = [entry("auto", description="the router picks adapters per request (base-model fallback)"),
            entry("base", description="the base model alone", base_model=base_model_name(routed))]
    ready = {v.ref: v for v in reg.search_versions()}  # by name, then version: the last of a name is its newest
    newest = {v.name: v for v in ready.values()}
    data += [served(ref, v) for ref, v in ready.items()]
    data += [served(name, v) for name, v in sorted(newest.items())]
    for a in reg.search_adapters():
        for alias, version in sorted(a.aliases.items()):
            if f"{a.name}:{version}" in ready:  # an alias of an archived version is refused when named
                data.append(served(f"{a.name}@{alias}", ready[f"{a.name}:{version}"]))
    return {"object": "list", "data": data}


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve a non-loopback `host` without an API key unless `insecure`.

    Raises:
        BadInputError: naming the host and the two ways out.
    """
    if not api_key and not insecure and not is_loopback(host):
        raise BadInputError(f"--host {host} is reachable from other machines and no API key is set: give --api-key "
                            f"(or PLAIT_API_KEY), or --insecure to serve it open")


def serve(workspace, *, host: str = "127.0.0.1", port: int = 8000, alias: str = "production",
          config: ServerConfig | None = None, log_level: str = "info", api_key: str | None = None,
          insecure: bool = False) -> None:
    """Load the workspace's routed model and serve it with uvicorn until interrupted.

    Raises:
        BadInputError: a non-loopback `host` without an `api_key`, unless `insecure`.
    """
    import uvicorn

    from plait.service import RoutedModel

    check_exposure(host, api_key, insecure)
    config = config or ServerConfig()
    routed = RoutedModel(workspace, alias=alias, max_adapters=config.max_adapters, preload=config.preload)
    app = create_app(routed, config, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
