"""Perplexity router: serve each input with the adapter under which its loss is lowest.

After AdapterCL (Madotto et al. 2021, "Continual Learning in Task-Oriented Dialogue Systems",
https://arxiv.org/abs/2012.15504, Sec. 3): with one residual adapter per task and no task id at
test time, the input is run under every adapter and the adapter with the lowest perplexity is
selected. Here the per-row losses of all adapters come from one `LossScorer.loss_matrix` call
(batched over adapters: the engine or peft runs a mixed-adapter batch), and the probabilities
are softmax(-loss / temperature), so a blend weights adapters by how well they explain the input.

The router holds no tensors: its per-domain state is only the name of the domain's adapter
in the scorer, so adding a domain cannot disturb another's. It needs no training data, only
the adapters (like Arrow) but pays one LM forward pass per adapter per input.

`PeftLossScorer` implements `LossScorer` for a peft model holding several named LoRA adapters
(peft's mixed batch `adapter_names=`); `routing.engine.CompositionEngine` implements it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from registry.errors import BadInputError, NotFoundError
from routing.routers import RouterCore


@runtime_checkable
class LossScorer(Protocol):
    """Per-row language-model losses under several adapters."""

    def loss_matrix(self, texts: list[str], adapter_names: list[str]) -> Any:
        """Float tensor [len(texts), len(adapter_names)]: mean token NLL of each text under each adapter."""
        ...


def row_losses(logits, input_ids, attention_mask):
    """Mean next-token NLL per row over real (unpadded) tokens; [batch] float32."""
    from training.evaluation import next_token_nll

    nll = next_token_nll(logits, input_ids)
    mask = attention_mask[:, 1:].to(nll.device, nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


class PeftLossScorer:
    """`LossScorer` over a `peft.PeftModel` holding the adapters as named LoRA adapters.

    Each text is repeated once per adapter and the rows run in peft's mixed-adapter batches
    (`adapter_names=`), so one forward pass covers several adapters.

    Args:
        model: a PeftModel with every adapter in `adapter_names` loaded.
        tokenizer: its tokenizer (right padding is used).
        max_length: texts are truncated to this many tokens.
        batch_size: rows (text x adapter pairs) per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 64, batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def loss_matrix(self, texts: list[str], adapter_names: list[str]):
        import torch

        known = set(getattr(self.model, "peft_config", {}))
        missing = [a for a in adapter_names if a not in known]
        if missing:
            raise NotFoundError(f"adapter {missing[0]!r} is not loaded in the peft model "
                                f"(loaded: {', '.join(sorted(known))}); load it with load_adapter")
        pairs = [(t, a) for t in texts for a in adapter_names]
        out = []
        self.model.eval()
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            enc = self.tokenizer([t for t, _ in chunk], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, padding_side="right")
            with torch.inference_mode():
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    adapter_names=[a for _, a in chunk]).logits
            out.append(row_losses(logits, enc["input_ids"], enc["attention_mask"]))
        return torch.cat(out).view(len(texts), len(adapter_names))


class PerplexityRouter(RouterCore):
    """Route to the adapter with the lowest loss on the input.

    Args:
        scorer: a `LossScorer` holding every domain's adapter (not part of the artifact: pass
            it again to `from_files`).
        temperature: softmax temperature over negative losses (nats per token).
        adapters: stored {domain: adapter name in the scorer} (set by `from_files`).
    """

    kind = "perplexity"
    needs_all_adapters = True
    """Every domain's adapter must be loaded to route one input (`resident_adapters()`): a server
    with `--max-adapters` pins them all, or refuses a limit below their number."""

    def __init__(self, scorer: LossScorer | None = None, temperature: float = 0.05, threshold: float = 0.0,
                 adapters: dict[str, str] | None = None):
        super().__init__(temperature=temperature, threshold=threshold)
        self.scorer = scorer
        self.adapters: dict[str, str] = dict(adapters or {})

    def _reset(self) -> None:
        self.adapters = {}

    def resident_adapters(self) -> list[str]:
        """The scorer names (adapter refs) that must all be loaded to route: one per domain."""
        return [self.adapters[d] for d in self.domains]

    def _add(self, domain: str, data: str | None) -> None:
        """`data` is the domain's adapter name in the scorer (None = the domain name)."""
        name = domain if data is None else data
        if not isinstance(name, str) or not name:
            raise BadInputError(f"domain {domain!r} needs the name of its adapter in the loss scorer, "
                                f"got {data!r}")
        self.adapters[domain] = name

    def _score_logits(self, texts: list[str]):
        if self.scorer is None:
            raise BadInputError("the perplexity router has no loss scorer: pass scorer= "
                                "(a CompositionEngine or PeftLossScorer)")
        losses = self.scorer.loss_matrix(texts, [self.adapters[d] for d in self.domains])
        return -losses.float()

    def _params(self) -> dict[str, Any]:
        return {"adapters": dict(self.adapters)}

    def add_domain(self, domain: str, data: str | None = None, ref: str | None = None) -> None:
        """Add a domain served by adapter `data` of the scorer (default: named like the domain)."""
        super().add_domain(domain, data, ref)

    def fit(self, domain_data: dict[str, str | None] | Sequence[str], refs: dict[str, str] | None = None):
        """Fit on {domain: adapter name} (or a list of domains whose adapters share their names)."""
        if isinstance(domain_data, (list, tuple)):
            domain_data = {d: d for d in domain_data}
        return super().fit(domain_data, refs)


ROUTER_CLASS = PerplexityRouter
