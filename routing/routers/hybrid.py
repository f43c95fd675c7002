"""Hybrid router (the default): sentence-embedding prototypes and word statistics, combined.

Two views of an input, each with its own per-domain state:

- dense: the `embedding` router's nearest-prototype cosine (LoRA-Retriever, Zhao et al. 2024)
  on the input's first `embed_chars` characters, all-MiniLM-L6-v2 (the encoder's cost grows
  with the length, the opening carries the topic);
- sparse: the `lexical` router's multinomial naive Bayes over hashed words and word pairs
  (McCallum and Nigam 1998; Rennie et al. 2003) on the whole input.

Their per-domain log-probabilities are added, the sparse one weighted by `lexical_weight`
(a product of experts, as hybrid sparse + dense retrieval combines BM25 with a dense
retriever, e.g. Ma et al. 2021, "A Replication Study of Dense Passage Retriever"):

    log p(d | x) = log softmax(cos(x, proto_d) / 0.05) + w * log softmax(nb_d(x) / 0.1) + const

The embedding captures topic and paraphrase; the word counts see the whole input (the
encoder truncates) and the domain's own vocabulary. The out-of-domain fallback compares the
embedding's best cosine with the calibrated threshold, as the `embedding` router does: a
word model has no notion of "in no domain at all".

Settings (the first 250 characters, about 50 word pieces; prototype scoring; alpha 0.03;
weight 1) were chosen by the lowest log-loss on a validation split of the BBC training pool,
never on the held-out test articles; docs/benchmarks.md has the search and the held-out
figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from registry.errors import BadInputError
from registry.names import whole_number
from routing.routers import RouterCore, check_texts
from routing.routers.embedding import EmbeddingRouter, Encoder, MiniLMEncoder
from routing.routers.lexical import DEFAULT_BUCKETS, LexicalRouter

DENSE_TEMPERATURE = 0.05


class HybridRouter(RouterCore):
    """Route by embedding prototypes times a naive Bayes word model.

    Args:
        encoder: sentence encoder of the dense part (default all-MiniLM-L6-v2, 128 word pieces,
            under bf16 autocast where it measured faster: `training.precision`).
        embed_chars: the dense part sees the input's first `embed_chars` characters.
        lexical_weight: weight of the word model's log-probabilities (0 = embedding only).
        alpha, buckets, bigrams: the word model's settings (see `LexicalRouter`).
        encoder_spec: the stored encoder description (set by `from_files`).
    """

    kind = "hybrid"

    def __init__(self, encoder: Encoder | None = None, embed_chars: int = 250, lexical_weight: float = 1.0,
                 alpha: float = 0.03, buckets: int = DEFAULT_BUCKETS, bigrams: bool = True,
                 temperature: float = 1.0, threshold: float = 0.0, encoder_spec: dict[str, Any] | None = None):
        super().__init__(temperature=temperature, threshold=threshold)
        whole_number(embed_chars, "embed_chars", 16, example=250)
        if isinstance(lexical_weight, bool) or not isinstance(lexical_weight, (int, float)) or lexical_weight < 0:
            raise BadInputError(f"lexical_weight={lexical_weight!r} must be a number >= 0 (e.g. 1.0)")
        self.embed_chars, self.lexical_weight = embed_chars, float(lexical_weight)
        if encoder is None and (encoder_spec or {}).get("name", MiniLMEncoder.name) == MiniLMEncoder.name:
            # bf16 autocast where it measured faster on this machine (1.6x on one CPU, 7x slower on
            # another with no bf16 hardware); same decisions on BBC either way
            encoder = MiniLMEncoder(max_seq_length=(encoder_spec or {}).get("max_seq_length", 128), bf16=None)
        self.dense = EmbeddingRouter(encoder=encoder, scoring="prototype", temperature=DENSE_TEMPERATURE,
                                     encoder_spec=encoder_spec)
        self.sparse = LexicalRouter(alpha=alpha, buckets=buckets, bigrams=bigrams)

    @property
    def encoder(self) -> Encoder | MiniLMEncoder:
        return self.dense.encoder

    def _reset(self) -> None:
        self.dense.fit_reset()
        self.sparse.fit_reset()

    def _add(self, domain: str, data: Sequence[str]) -> None:
        texts = check_texts(data, f"text of domain {domain!r}")
        if not texts:
            raise BadInputError(f"domain {domain!r} has no texts: give at least one text")
        self.dense.add_domain(domain, [t[:self.embed_chars] for t in texts])
        self.sparse.add_domain(domain, texts)

    def _scores(self, texts: list[str]):
        """(summed log-probabilities, the embedding's cosines: the fallback reads those)."""
        import torch

        cos = self.dense._score_logits([t[:self.embed_chars] for t in texts]).float()
        logits = torch.log_softmax(cos / DENSE_TEMPERATURE, dim=-1)
        if self.lexical_weight:
            nb = self.sparse._score_logits(texts).float()
            logits = logits + self.lexical_weight * torch.log_softmax(nb / self.sparse.temperature, dim=-1)
        return logits, cos

    def _confidence(self, raw, probs):
        return raw.max(-1).values  # the best cosine, as the embedding router's fallback

    def _domain_tensors(self, domain: str) -> dict[str, Any]:
        return {**{f"dense.{k}": v for k, v in self.dense._domain_tensors(domain).items()},
                **{f"sparse.{k}": v for k, v in self.sparse._domain_tensors(domain).items()}}

    def _load_domain_tensors(self, domain: str, tensors: dict[str, Any]) -> None:
        for part, prefix in ((self.dense, "dense."), (self.sparse, "sparse.")):
            part._load_domain_tensors(domain, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            part.domains.append(domain)
            part.refs[domain] = domain

    def _params(self) -> dict[str, Any]:
        return {"embed_chars": self.embed_chars, "lexical_weight": self.lexical_weight, "alpha": self.sparse.alpha,
                "buckets": self.sparse.buckets, "bigrams": self.sparse.bigrams,
                "encoder_spec": self.dense.encoder.spec()}


ROUTER_CLASS = HybridRouter
