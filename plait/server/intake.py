"""From a request body to a `GenerationRequest`: validate, template, tokenise.

The methods here are CPU work (a chat template, a tokenizer): the app runs them on a worker
thread, never on the event loop, and the limits of `ServerConfig` bound how long one takes
(body size, messages, characters before tokenising, tokens after).
"""

from __future__ import annotations

from typing import Any

from plait.server.batcher import GenerationRequest, Prompt, Sampling
from plait.server.config import MAX_SEED, MIN_TEMPERATURE, ServerConfig
from plait.server.protocol import APIError, ChatBody, ChatMessage, CompletionBody, RouteBody, _Body, check_text
from registry.errors import BadInputError

# no tokenizer makes fewer than 1 token per 64 characters: a cheap bound before tokenising
CHARS_PER_TOKEN_BOUND = 64


class Intake:
    """Turns request bodies into batcher requests under the limits of `config`."""

    def __init__(self, tokenizer, config: ServerConfig):
        self.tokenizer = tokenizer
        self.config = config

    # ------------------------------------------------------------------ prompts
    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _too_long(self, what: str, size: str, param: str) -> APIError:
        limit = self.config.max_prompt_tokens
        return APIError(413, f"{what} has {size}, over the limit of {limit} tokens (--max-prompt-tokens); "
                        f"shorten it", param=param, code="prompt_too_long")

    def _check_prompt(self, text: str, ids: list[int] | None, i: int) -> list[int]:
        limit = self.config.max_prompt_tokens
        if ids is None:
            check_text(text, "prompt")
            if len(text) > limit * CHARS_PER_TOKEN_BOUND:
                raise self._too_long(f"prompt {i}", f"{len(text)} characters", "prompt")
            ids = self._encode(text, True)
        if len(ids) > limit:
            raise self._too_long(f"prompt {i}", f"{len(ids)} tokens", "prompt")
        if not ids:
            raise APIError(400, f"prompt {i} is empty; give a non-empty prompt", param="prompt")
        return ids

    def _chat_messages(self, messages: list[ChatMessage]) -> list[dict[str, str]]:
        if not messages:
            raise APIError(400, "messages is empty; give at least one message", param="messages")
        if len(messages) > self.config.max_messages:
            raise APIError(413, f"{len(messages)} messages is over the limit of {self.config.max_messages} "
                           f"(--max-messages); send fewer", param="messages", code="too_many_messages")
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
            msgs.append({"role": m.role, "content": check_text(content or "", f"messages[{i}].content")})
        return msgs

    def _chat_prompt(self, messages: list[ChatMessage]) -> Prompt:
        msgs = self._chat_messages(messages)
        chars = sum(len(m["content"]) for m in msgs)
        if chars > self.config.max_prompt_tokens * CHARS_PER_TOKEN_BOUND:
            raise self._too_long("the messages", f"{chars} characters", "messages")
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a base without a template, or one refusing the roles
            raise APIError(400, "the base model's chat template cannot format these messages; "
                           "use /v1/completions", param="messages") from None
        ids = self._encode(text, False)
        if len(ids) > self.config.max_prompt_tokens:
            raise self._too_long("the rendered chat prompt", f"{len(ids)} tokens", "messages")
        # the router sees what the user said: the user messages, newest last
        route_text = "\n".join(m["content"] for m in msgs if m["role"] == "user") or msgs[-1]["content"]
        return Prompt(ids, route_text)

    # ------------------------------------------------------------------ sampling
    def _max_tokens(self, body: _Body, default_max: int) -> int:
        max_tokens = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        max_tokens = default_max if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} must be between 1 and {self.config.max_tokens_limit} "
                           f"(--max-tokens-limit)", param="max_tokens")
        return max_tokens

    def _sampling(self, body: _Body, default_max: int) -> Sampling:
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 <= temperature <= 2:  # NaN fails this too
            raise APIError(400, f"temperature {temperature} must be between 0 and 2", param="temperature")
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p {top_p} must be in (0, 1]", param="top_p")
        if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
            raise APIError(400, f"seed {body.seed} must be between 0 and 2**64 - 1", param="seed")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise APIError(400, "stop takes at most 4 non-empty strings of up to 256 characters", param="stop")
        for s in stop:
            check_text(s, "stop")
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0  # so cold that sampling is argmax (and 1e-40 would overflow to NaN)
        return Sampling(self._max_tokens(body, default_max), tuple(stop), temperature, top_p, body.seed)

    def _common(self, body: _Body) -> dict[str, Any]:
        from plait.service import check_model_name

        try:
            check_model_name(body.model)
        except BadInputError as e:
            raise APIError(400, str(e), param="model", code="model_not_found") from None
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported; send n=1 (or several prompts)", param="n")
        top_k = 1 if body.route_top_k is None else body.route_top_k
        if top_k < 1:
            raise APIError(400, f"route_top_k {top_k} must be >= 1", param="route_top_k")
        return {"model": body.model, "top_k": top_k, "stream": bool(body.stream)}

    # ------------------------------------------------------------------ requests
    def completion(self, body: CompletionBody) -> GenerationRequest:
        """The batcher request of a /v1/completions body (raises APIError)."""
        common = self._common(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list; give a string or a list of strings", param="prompt")
        if len(prompts) > self.config.max_batch:
            raise APIError(400, f"{len(prompts)} prompts in one request is over --max-batch "
                           f"{self.config.max_batch}", param="prompt")
        sampling = self._sampling(body, 16)
        return GenerationRequest(prompts=[Prompt(self._check_prompt(p, None, i), p) for i, p in enumerate(prompts)],
                                 sampling=sampling, **common)

    def chat(self, body: ChatBody) -> GenerationRequest:
        """The batcher request of a /v1/chat/completions body (raises APIError)."""
        common = self._common(body)
        sampling = self._sampling(body, self.config.default_chat_max_tokens)
        return GenerationRequest(prompts=[self._chat_prompt(body.messages)], sampling=sampling, **common)

    def route_inputs(self, body: RouteBody) -> list[str]:
        """The texts of a /v1/route body, bounded in number and length (raises APIError)."""
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or any(not t for t in texts):
            raise APIError(400, "input must be a non-empty string or list of non-empty strings", param="input")
        if len(texts) > self.config.max_route_inputs:
            raise APIError(413, f"{len(texts)} inputs is over the limit of {self.config.max_route_inputs} "
                           f"(--max-route-inputs); send fewer", param="input", code="too_many_inputs")
        limit = self.config.max_route_input_chars
        for i, t in enumerate(texts):
            if len(t) > limit:
                raise APIError(413, f"input {i} has {len(t)} characters, over the limit of {limit} "
                               f"(--max-route-input-chars); shorten it", param="input", code="input_too_long")
            check_text(t, "input")
        if body.top_k < 1:
            raise APIError(400, f"top_k {body.top_k} must be >= 1", param="top_k")
        return texts
