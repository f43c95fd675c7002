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
    GET  /v1/models             auto, base, every ready adapter version, name and alias
    POST /v1/route              {"input": str | [str], "top_k": 1} -> domains and weights only
    GET  /health                status, router version, loaded adapters, queue and batch counters
    GET  /metrics               Prometheus text: requests, tokens, latencies, batch size, queue,
                                adapter residency (needs the API key unless --metrics-public)

Every response choice carries the extension field `plait`:

    {"model": "auto", "domain": "law",                 # domain null = base model
     "adapters": [{"ref": "law:3", "domain": "law", "weight": 1.0}],
     "scores": {"law": 0.97, "news": 0.03}, "confidence": 0.97}   # scores only for auto

(with the `openai` client: `choice.model_extra["plait"]`; in a stream it is on each choice's
first and last chunk). Extra request fields: `route_top_k` (blend size for `auto`).

The parts, one job each:

    config.py     ServerConfig: batching settings and the limits of one request
    protocol.py   request bodies, OpenAI-shaped error bodies that leak no internals
    guard.py      ASGI middleware: request id, API key, body-size limit
    intake.py     body -> GenerationRequest: validate, template, tokenise (off the event loop)
    batcher.py    the batching engine: submit a request, read its events, cancel it (static)
    continuous.py the default scheduler: rows join and leave the batch at every decode step
    metrics.py    ServerMetrics: the hooks the batchers and routes report to, and /metrics' text
    app.py        the FastAPI routes over the batcher, and `serve()`

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}, "request_id"}`:
400 for a malformed body, an unknown or malformed adapter reference or an out-of-range
parameter, 401 without the API key, 413 for a body, prompt, message list or route input over
its limit, 422 for an adapter whose files fail their hash check, 503 when the queue is full
or every adapter slot (`--max-adapters`) is held by running requests,
500 for an unexpected failure of one batch (the server keeps serving).
"""

from plait.server.app import check_exposure, create_app, is_loopback, list_models, serve
from plait.server.batcher import (Batcher, Delta, Done, Failed, Finished, GenerationRequest, Prompt,
                                  QueueFullError, RowResult, Sampling, Started, Ticket)
from plait.server.config import MIN_TEMPERATURE, ServerConfig
from plait.server.continuous import ContinuousBatcher
from plait.server.metrics import ServerMetrics
from plait.server.protocol import APIError, api_error

__all__ = ["APIError", "Batcher", "ContinuousBatcher", "Delta", "Done", "Failed", "Finished", "GenerationRequest",
           "MIN_TEMPERATURE", "Prompt", "QueueFullError", "RowResult", "Sampling", "ServerConfig", "ServerMetrics",
           "Started", "Ticket", "api_error", "check_exposure", "create_app", "is_loopback", "list_models", "serve"]
