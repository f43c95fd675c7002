"""Settings of `plait serve`: batching, and the limits that bound what one request may cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.errors import BadInputError
from registry.names import whole_number

MIN_TEMPERATURE = 1e-3
"""Temperatures in (0, MIN_TEMPERATURE) decode greedily: sampling that cold picks the top token
except in exact ties, and below ~1e-37 float32 logits / temperature overflow to NaN."""

MAX_SEED = 2**64 - 1
"""Largest `seed` (torch's generators take 0 .. 2**64 - 1)."""

SCHEDULERS = ("continuous", "static")
"""The batch schedulers of `plait serve` (`ServerConfig.scheduler`)."""


@dataclass
class ServerConfig:
    """Limits and batching settings of `plait serve`."""

    scheduler: str = "continuous"
    """How requests share the engine: `continuous` (rows join and leave the running batch at every
    decode step, plait/server/continuous.py) or `static` (a batch runs until its last row ends,
    plait/server/batcher.py)."""
    max_batch: int = 32
    """Most prompt rows decoded together in one engine batch (and most prompts in one request)."""
    max_wait_ms: float = 10.0
    """How long the static batcher waits for more requests after the first one arrives (the
    continuous one needs no wait: a request joins the running batch at the next step)."""
    max_queue: int = 256
    """Most requests waiting for a batch; more get 503."""
    max_prompt_tokens: int = 1024
    """Longest prompt in tokens (a chat prompt as rendered by the chat template); longer ones get 413."""
    max_tokens_limit: int = 512
    """Largest `max_tokens` a request may ask for; more gets 400."""
    default_chat_max_tokens: int = 256
    """`max_tokens` of a chat request that gives none (completions default to 16, as OpenAI)."""
    max_body_bytes: int = 1_048_576
    """Largest request body in bytes; a larger one gets 413 before it is read whole."""
    max_messages: int = 256
    """Most messages in one chat request; more get 413."""
    max_route_inputs: int = 64
    """Most inputs in one /v1/route request; more get 413."""
    max_route_input_chars: int = 8192
    """Longest /v1/route input in characters; longer ones get 413."""
    docs: bool = False
    """Serve /docs, /redoc and /openapi.json (off: they describe every route to anyone)."""
    metrics_public: bool = False
    """Answer GET /metrics without the API key (off: traffic figures are the operator's; Prometheus
    sends the key with `authorization: {credentials: KEY}` in its scrape config)."""
    max_adapters: int | None = None
    """Most adapters loaded at once (least recently used unheld ones are evicted); None: sized for the
    machine (`routing.residency.default_max_adapters`). `serve()` builds its RoutedModel with it;
    `create_app(routed, ...)` serves a RoutedModel built already (`RoutedModel(max_adapters=)`)."""
    preload: tuple[str, ...] = field(default_factory=tuple)
    """Adapter references loaded at start and never evicted (an alias reference follows its alias);
    used by `serve()` like `max_adapters`."""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise BadInputError(f"scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}; "
                                f"use --scheduler continuous (default) or static")
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens_limit", "default_chat_max_tokens",
                     "max_body_bytes", "max_messages", "max_route_inputs", "max_route_input_chars"):
            whole_number(getattr(self, name), name, 1)
        from routing.residency import check_max_adapters

        check_max_adapters(self.max_adapters, "max_adapters")
        self.preload = tuple(self.preload)
        if not isinstance(self.max_wait_ms, (int, float)) or not self.max_wait_ms >= 0:
            raise BadInputError(f"max_wait_ms {self.max_wait_ms!r} must be a number >= 0")
        self.default_chat_max_tokens = min(self.default_chat_max_tokens, self.max_tokens_limit)
