"""`plait serve`: an OpenAI-compatible HTTP server that serves the router's choice.

vLLM multi-LoRA and LoRAX serve the adapter a request names; this server also *chooses*
one. The request's `model` field is

    auto            the router picks (or blends, `route_top_k`) adapters per request,
                    with the base model as fallback below its confidence threshold
    base            the base model alone
    NAME[:V|@A]     that adapter version (`law`, `law:3`, `law@production`)

Routes (FastAPI + uvicorn):

    POST /v1/completions        OpenAI completions (prompt: a string or a list of strings)
    POST /v1/chat/completions   OpenAI chat completions, through the base's chat template
    GET  /v1/models             auto, base, and every ready adapter version and alias
    POST /v1/route              {"input": str | [str], "top_k": 1} -> domains and weights only
    GET  /health                status, router version, loaded adapters, queue and batch counters

Every response choice carries the extension field `plait`:

    {"model": "auto", "domain": "law",                 # domain null = base model
     "adapters": [{"ref": "law:3", "domain": "law", "weight": 1.0}],
     "scores": {"law": 0.97, "news": 0.03}, "confidence": 0.97}   # scores only for auto

(with the `openai` client: `choice.model_extra["plait"]`; in a stream it is on each choice's
first and last chunk). Extra request fields: `route_top_k` (blend size for `auto`).

Dynamic batching
----------------
Handlers validate and tokenise a request, then put it on an asyncio queue (`--max-queue`
deep; full -> 503). One worker takes the first waiting request, gathers more for up to
`--max-wait-ms` or until `--max-batch` rows, and runs the batch in a worker thread (the
event loop keeps accepting requests meanwhile): it refreshes the router from the registry,
resolves every request's `model` again (so a new version or a moved alias serves from the
next batch on, and a version failing its hash check fails only its own requests), and
decodes all rows in ONE mixed-adapter batch of the composition engine, whatever adapters
they use. Sampling settings are per batch in the engine, so rows are grouped by them:
every greedy request (temperature 0) shares one batch; sampled requests share a batch with
those of equal (temperature, top_p, seed). Within a group, rows with different `max_tokens`
or `stop` run together: the batch decodes until every row has hit eos, its own `max_tokens`
or a stop string, and each row is trimmed to its own limit. (A sampled request's `seed`
therefore seeds its batch, not its row: reproducible only when it runs alone.)

Streaming (`stream: true`) uses the engine's per-step hook (`generate_ids(on_step=...)`):
each decoded token is turned into a text delta in the worker and sent as a server-sent event
in OpenAI's chunk format, ending with `data: [DONE]`.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed body, an unknown or malformed adapter reference or an out-of-range parameter, 413
for a prompt over `--max-prompt-tokens`, 422 for an adapter whose files fail their hash
check, 503 when the queue is full, 500 for an unexpected failure of one batch (the server
keeps serving).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.errors import BadInputError, IntegrityError, NotFoundError, PlaitError

log = logging.getLogger("plait.server")


# --------------------------------------------------------------------------- settings


@dataclass
class ServerConfig:
    """Limits and batching settings of `plait serve`."""

    max_batch: int = 32
    """Most prompt rows decoded together in one engine batch."""
    max_wait_ms: float = 10.0
    """How long the batcher waits for more requests after the first one arrives."""
    max_queue: int = 256
    """Most requests waiting for a batch; more get 503."""
    max_prompt_tokens: int = 1024
    """Longest prompt in tokens; longer ones get 413."""
    max_tokens_limit: int = 512
    """Largest `max_tokens` a request may ask for; more gets 400."""
    default_chat_max_tokens: int = 256
    """`max_tokens` of a chat request that gives none (completions default to 16, as OpenAI)."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens_limit", "default_chat_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInputError(f"{name} {value!r} must be a positive integer")
        if not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise BadInputError(f"max_wait_ms {self.max_wait_ms!r} must be a number >= 0")
        self.default_chat_max_tokens = min(self.default_chat_max_tokens, self.max_tokens_limit)


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # OpenAI clients send fields we do not use (user, logprobs=None, ...): accept and ignore them
    model_config = ConfigDict(extra="allow")

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
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class RouteBody(BaseModel):
    input: str | list[str]
    top_k: int = 1


class APIError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception met while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NotFoundError):
        return APIError(400, str(exc), param="model", code="model_not_found")
    if isinstance(exc, BadInputError):
        return APIError(400, str(exc), code="bad_input")
    if isinstance(exc, IntegrityError):
        # stored data is wrong: not retryable by the client, and not the server's crash either
        return APIError(422, str(exc), type_="integrity_error", param="model", code="adapter_integrity_failed")
    if isinstance(exc, PlaitError):
        return APIError(500, str(exc), type_="server_error")
    return APIError(500, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", type_="server_error")


# --------------------------------------------------------------------------- queued work


@dataclass
class _Row:
    """One prompt of a request and its decoding state (owned by the worker thread)."""

    index: int
    tokens_in: list[int]
    route_text: str
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: bool = False
    finish_reason: str | None = None
    eos: bool = False
    text: str | None = None


@dataclass
class _Request:
    kind: Literal["completion", "chat"]
    model: str
    rows: list[_Row]
    max_tokens: int
    stop: list[str]
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    top_k: int
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: bool = False

    def emit(self, *event: Any) -> None:
        """Hand an event to the request's handler (called from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def group_key(self) -> tuple:
        return (True, self.temperature, self.top_p, self.seed) if self.do_sample else (False,)


class Server:
    """The batching model server around a `plait.service.RoutedModel`.

    Args:
        routed: the routed model (engine + router + registry) to serve.
        config: limits and batching settings.
    """

    def __init__(self, routed, config: ServerConfig | None = None):
        self.rm = routed
        self.config = config or ServerConfig()
        if self.config.max_prompt_tokens > routed.engine.max_length:
            raise BadInputError(f"max_prompt_tokens {self.config.max_prompt_tokens} is over the engine's max_length "
                                f"{routed.engine.max_length}; lower --max-prompt-tokens")
        self.tokenizer = routed.engine.tokenizer
        self.eos = set(routed.engine._eos_ids(None))
        self.queue: asyncio.Queue | None = None
        self._carry: deque[_Request] = deque()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-batch")
        self._worker: asyncio.Task | None = None
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "errors": 0,
                      "resolve_s": 0.0, "decode_s": 0.0}
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.config.max_queue)
        self._worker = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ request intake
    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _check_prompt(self, text: str, ids: list[int] | None, i: int) -> list[int]:
        limit = self.config.max_prompt_tokens
        if ids is None:
            if len(text) > limit * 64:  # no tokenizer makes fewer than 1 token per 64 characters
                raise APIError(413, f"prompt {i} has {len(text)} characters, over the limit of {limit} tokens; "
                               f"shorten it", param="prompt", code="prompt_too_long")
            ids = self._encode(text, True)
        if len(ids) > limit:
            raise APIError(413, f"prompt {i} has {len(ids)} tokens, over the limit of {limit} "
                           f"(--max-prompt-tokens); shorten it", param="prompt", code="prompt_too_long")
        if not ids:
            raise APIError(400, f"prompt {i} is empty; give a non-empty prompt", param="prompt")
        return ids

    def _chat_ids(self, messages: list[ChatMessage]) -> tuple[list[int], str]:
        msgs = []
        for i, m in enumerate(messages):
            if m.role not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}].role {m.role!r} is not system, user or assistant",
                               param=f"messages[{i}].role")
            content = m.content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise APIError(400, f"messages[{i}].content has a non-text part; only text is supported",
                                   param=f"messages[{i}].content")
                content = "".join(str(p.get("text", "")) for p in content)
            msgs.append({"role": m.role, "content": content or ""})
        if not msgs:
            raise APIError(400, "messages is empty; give at least one message", param="messages")
        limit = self.config.max_prompt_tokens
        if sum(len(m["content"]) for m in msgs) > limit * 64:
            raise APIError(413, f"the messages are over the limit of {limit} tokens; shorten them",
                           param="messages", code="prompt_too_long")
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a base without a template, or one refusing the roles
            raise APIError(400, f"the base model's chat template cannot format these messages ({e}); "
                           f"use /v1/completions", param="messages") from None
        ids = self._check_prompt(text, self._encode(text, False), 0)
        # the router sees what the user said: the user messages, newest last
        route_text = "\n".join(m["content"] for m in msgs if m["role"] == "user") or msgs[-1]["content"]
        return ids, route_text

    def _sampling(self, body: _Body, default_max: int) -> dict[str, Any]:
        from plait.service import check_model_name

        try:
            check_model_name(body.model)
        except BadInputError as e:
            raise APIError(400, str(e), param="model", code="model_not_found") from None
        max_tokens = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        max_tokens = default_max if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} must be between 1 and {self.config.max_tokens_limit} "
                           f"(--max-tokens-limit)", param="max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 <= temperature <= 2:
            raise APIError(400, f"temperature {temperature} must be between 0 and 2", param="temperature")
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p {top_p} must be in (0, 1]", param="top_p")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported; send n=1 (or several prompts)", param="n")
        top_k = 1 if body.route_top_k is None else body.route_top_k
        if top_k < 1:
            raise APIError(400, f"route_top_k {top_k} must be >= 1", param="route_top_k")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return dict(model=body.model, max_tokens=max_tokens, stop=stop, do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else 1.0, top_p=top_p, seed=body.seed,
                    top_k=top_k, stream=bool(body.stream))

    async def submit(self, kind: str, body: _Body) -> _Request:
        """Validate, tokenise and enqueue a request (raises APIError)."""
        if isinstance(body, CompletionBody):
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not prompts:
                raise APIError(400, "prompt is an empty list; give a string or a list of strings", param="prompt")
            if len(prompts) > self.config.max_batch:
                raise APIError(400, f"{len(prompts)} prompts in one request is over --max-batch "
                               f"{self.config.max_batch}", param="prompt")
            rows = [_Row(i, self._check_prompt(p, None, i), p) for i, p in enumerate(prompts)]
            params = self._sampling(body, 16)
        else:
            ids, route_text = self._chat_ids(body.messages)
            rows = [_Row(0, ids, route_text)]
            params = self._sampling(body, self.config.default_chat_max_tokens)
        req = _Request(kind, rows=rows, loop=asyncio.get_running_loop(), **params)
        try:
            self.queue.put_nowait(req)
        except asyncio.QueueFull:
            raise APIError(503, f"the server is busy: {self.config.max_queue} requests are waiting "
                           f"(--max-queue); retry shortly", type_="server_error", code="queue_full") from None
        with self._stats_lock:
            self.stats["requests"] += 1
        return req

    # ------------------------------------------------------------------ batching
    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._carry.popleft() if self._carry else await self.queue.get()
            batch, rows = [first], len(first.rows)
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while rows < self.config.max_batch:
                if self._carry:
                    nxt = self._carry.popleft()
                else:
                    try:
                        nxt = self.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        timeout = deadline - loop.time()
                        if timeout <= 0:
                            break
                        try:
                            nxt = await asyncio.wait_for(self.queue.get(), timeout)
                        except asyncio.TimeoutError:
                            break
                if rows + len(nxt.rows) > self.config.max_batch:
                    self._carry.appendleft(nxt)  # first in the next batch
                    break
                batch.append(nxt)
                rows += len(nxt.rows)
            batch = [r for r in batch if not r.cancelled]
            if batch:
                try:
                    await loop.run_in_executor(self._executor, self._run_batch, batch)
                except Exception as e:  # noqa: BLE001 - a batch must never take the worker down
                    log.exception("batch failed")
                    for r in batch:
                        r.emit("error", e)

    def _run_batch(self, batch: list[_Request]) -> None:
        """Resolve every request's adapters and decode the batch (runs in the worker thread)."""
        try:
            self.rm.refresh()  # a newer router version serves from this batch on
        except Exception:  # noqa: BLE001 - keep serving with the router we have
            log.exception("router refresh failed; serving with the loaded router")
        t0 = time.perf_counter()
        decided = self._route_auto(batch)
        ready: list[tuple[_Request, list]] = []
        for req in batch:
            try:
                served = decided.get(id(req)) or self.rm.decide([r.route_text for r in req.rows], req.model,
                                                                req.top_k)
            except Exception as e:  # noqa: BLE001 - this request fails, the others are served
                self._count_error()
                req.emit("error", e)
                continue
            ready.append((req, served))
        with self._stats_lock:
            self.stats["resolve_s"] += time.perf_counter() - t0
        groups: dict[tuple, list[tuple[_Request, list]]] = {}
        for req, served in ready:
            groups.setdefault(req.group_key(), []).append((req, served))
        for group in groups.values():
            try:
                self._decode(group)
            except Exception as e:  # noqa: BLE001
                log.exception("decoding a batch failed")
                for req, _ in group:
                    self._count_error()
                    req.emit("error", e)

    def _route_auto(self, batch: list[_Request]) -> dict[int, list]:
        """Route all `auto` requests of a batch in one router call per top_k (by request id).

        When that call fails (e.g. one routed adapter fails its hash check) nothing is
        returned and every request is decided on its own, so only the affected ones fail.
        """
        by_k: dict[int, list[_Request]] = {}
        for req in batch:
            if req.model == "auto":
                by_k.setdefault(req.top_k, []).append(req)
        out: dict[int, list] = {}
        for k, reqs in by_k.items():
            if len(reqs) < 2:
                continue
            try:
                served = self.rm.decide([r.route_text for req in reqs for r in req.rows], "auto", k)
            except Exception:  # noqa: BLE001 - fall back to one decision per request
                continue
            i = 0
            for req in reqs:
                out[id(req)] = served[i:i + len(req.rows)]
                i += len(req.rows)
        return out

    def _count_error(self) -> None:
        with self._stats_lock:
            self.stats["errors"] += 1

    def _decode(self, group: list[tuple[_Request, list]]) -> None:
        engine = self.rm.engine
        entries = [(req, row, s) for req, served in group for row, s in zip(req.rows, served)]
        for req, row, s in entries:
            req.emit("start", row.index, s.to_dict())
        ids, mask = engine._pad([row.tokens_in for _, row, _ in entries], "left")
        first = group[0][0]

        def on_step(new_ids, _done) -> bool:
            for (req, row, _), tok in zip(entries, new_ids.tolist()):
                if row.finished:
                    continue
                delta = self._feed(req, row, tok)
                if req.stream and delta:
                    req.emit("delta", row.index, delta)
                if row.finished and req.stream:
                    req.emit("finish", row.index, row.finish_reason)
            return all(row.finished for _, row, _ in entries)

        t0 = time.perf_counter()
        with self.rm._lock:  # adapters are only added under this lock, never during a batch
            engine.generate_ids(ids, mask, [s.routing() for _, _, s in entries],
                                max_new_tokens=max(req.max_tokens for req, _ in group), do_sample=first.do_sample,
                                temperature=first.temperature, top_p=first.top_p, seed=first.seed, on_step=on_step)
        with self._stats_lock:
            self.stats["decode_s"] += time.perf_counter() - t0
            self.stats["batches"] += 1
            self.stats["rows"] += len(entries)
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(entries))
        for req, _ in group:
            for row in req.rows:
                if not row.finished:  # cannot happen (max_new_tokens covers every row); stay safe
                    row.finished, row.finish_reason = True, "length"
                if row.text is None:
                    row.text = self._decode_text(row.tokens)
            req.emit("done", [{"index": r.index, "text": r.text, "finish_reason": r.finish_reason,
                               "prompt_tokens": len(r.tokens_in), "completion_tokens": len(r.tokens) + int(r.eos)}
                              for r in req.rows])

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _feed(self, req: _Request, row: _Row, tok: int) -> str:
        """Add one decoded token to a row; returns the text that may be sent now."""
        if tok in self.eos:
            row.finished, row.finish_reason, row.eos = True, "stop", True
        else:
            row.tokens.append(tok)
            if len(row.tokens) >= req.max_tokens:
                row.finished, row.finish_reason = True, "length"
        if not (req.stream or req.stop):
            return ""
        text = self._decode_text(row.tokens)
        hits = [text.find(s) for s in req.stop if s in text]
        if hits:
            text = text[:min(hits)]
            row.finished, row.finish_reason = True, "stop"
        if row.finished:
            row.text = text
            safe = len(text)
        else:
            # hold back a possible start of a stop string and an unfinished multi-byte character
            safe = len(text) - max((len(s) - 1 for s in req.stop), default=0)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        if safe <= len(row.sent) or not text.startswith(row.sent):
            return ""
        delta = text[len(row.sent):safe]
        row.sent += delta
        return delta


# --------------------------------------------------------------------------- the app


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(routed, config: ServerConfig | None = None):
    """The FastAPI app serving `routed` (a `plait.service.RoutedModel`).

    Args:
        routed: the routed model.
        config: limits and batching settings (default `ServerConfig()`).

    Returns:
        A FastAPI app; run it with uvicorn (`plait serve` does). `app.state.server` is the `Server`.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = Server(routed, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="plait", description="OpenAI-compatible routed adapter serving", lifespan=lifespan)
    app.state.server = server

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where}: {first.get('msg', 'invalid')}"
        return error_response(APIError(400, message, param=where if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        log.exception("unhandled error")
        return error_response(api_error(exc))

    async def answer(kind: str, body: _Body):
        req = await server.submit(kind, body)
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        rid, obj = f"{prefix}-{req.id}", ("text_completion" if kind == "completion" else "chat.completion")
        served: dict[int, dict] = {}
        first = await req.events.get()
        if first[0] == "error":
            raise api_error(first[1])
        if not req.stream:
            event = first
            while event[0] != "done":
                if event[0] == "error":
                    raise api_error(event[1])
                if event[0] == "start":
                    served[event[1]] = event[2]
                event = await req.events.get()
            choices = []
            for c in event[1]:
                extra = {"plait": served.get(c["index"])}
                if kind == "completion":
                    choices.append({"index": c["index"], "text": c["text"], "logprobs": None,
                                    "finish_reason": c["finish_reason"], **extra})
                else:
                    choices.append({"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                                    "logprobs": None, "finish_reason": c["finish_reason"], **extra})
            p = sum(c["prompt_tokens"] for c in event[1])
            g = sum(c["completion_tokens"] for c in event[1])
            return {"id": rid, "object": obj, "created": req.created, "model": req.model, "choices": choices,
                    "usage": {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}}

        chunk_obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

        def chunk(index: int, text: str | None, finish: str | None, plait: dict | None = None,
                  role: bool = False) -> dict:
            if kind == "completion":
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            else:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if plait is not None:
                choice["plait"] = plait
            return {"id": rid, "object": chunk_obj, "created": req.created, "model": req.model, "choices": [choice]}

        async def events():
            event = first
            try:
                while True:
                    tag = event[0]
                    if tag == "start":
                        served[event[1]] = event[2]
                        yield _sse(chunk(event[1], "", None, event[2], role=True))
                    elif tag == "delta":
                        yield _sse(chunk(event[1], event[2], None))
                    elif tag == "finish":
                        yield _sse(chunk(event[1], None, event[2], served.get(event[1])))
                    elif tag == "error":
                        yield _sse(api_error(event[1]).body())
                        break
                    elif tag == "done":
                        break
                    event = await req.events.get()
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await answer("completion", body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        return await answer("chat", body)

    @app.get("/v1/models")
    async def models():
        return await run_in_threadpool(list_models, routed)

    @app.post("/v1/route")
    async def route(body: RouteBody):
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or any(not t for t in texts):
            raise APIError(400, "input must be a non-empty string or list of non-empty strings", param="input")
        if body.top_k < 1:
            raise APIError(400, f"top_k {body.top_k} must be >= 1", param="top_k")
        loop = asyncio.get_running_loop()
        try:  # on the batch thread: routing may load adapters, which must not overlap a batch
            served = await loop.run_in_executor(server._executor, routed.route, texts, body.top_k)
        except Exception as e:  # noqa: BLE001
            raise api_error(e) from None
        return {"object": "list", "data": [{"index": i, "domain": s.domain, "adapters": s.adapters,
                                            "scores": s.scores, "confidence": s.confidence}
                                           for i, s in enumerate(served)]}

    @app.get("/health")
    async def health():
        info = routed.router_info
        with server._stats_lock:
            stats = dict(server.stats)
        return {"status": "ok", "base_model": routed.ws.config.base_model,
                "router": info.ref if info is not None else None,
                "adapters_loaded": sorted(routed.engine.adapters), "queue": server.queue.qsize() if server.queue else 0,
                "stats": stats}

    return app


def list_models(routed) -> dict[str, Any]:
    """The `/v1/models` listing: auto, base, every ready version (NAME:V) and alias (NAME@A)."""
    reg = routed.registry
    now = int(time.time())

    def entry(mid: str, **plait: Any) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": now, "owned_by": "plait", "plait": plait}

    data = [entry("auto", description="the router picks adapters per request (base-model fallback)"),
            entry("base", description="the base model alone", base_model=routed.ws.config.base_model)]
    for v in reg.search_versions():
        data.append(entry(v.ref, ref=v.ref, domain=v.domain, kind=v.kind))
    for a in reg.search_adapters():
        for alias, version in sorted(a.aliases.items()):
            data.append(entry(f"{a.name}@{alias}", ref=f"{a.name}:{version}", domain=a.domain, kind=a.kind))
    return {"object": "list", "data": data}


def serve(workspace, *, host: str = "127.0.0.1", port: int = 8000, alias: str = "production",
          config: ServerConfig | None = None, log_level: str = "info") -> None:
    """Load the workspace's routed model and serve it with uvicorn until interrupted."""
    import uvicorn

    from plait.service import RoutedModel

    app = create_app(RoutedModel(workspace, alias=alias), config)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
