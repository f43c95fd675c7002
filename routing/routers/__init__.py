"""Routers: pick (or blend) the adapters for each input, or fall back to the base model.

A router keeps one piece of state per domain, scores a batch of inputs against every
domain, and turns the scores into a `RouteDecision` per input: the top domain, the top-k
adapters with renormalised weights, or `domain=None` (answer with the base model alone)
when the top probability is below a threshold calibrated on held-out data.

Every router satisfies the small `Router` protocol below and lives in one module of this
package that sets `ROUTER_CLASS`; `get_router_class(name)` discovers the modules, so a new
router is one new file and nothing else changes. The shared mechanics (decisions, top-k,
threshold calibration, evaluation, the safetensors + JSON artifact) are in `RouterCore`,
which the routers compose with their scoring.

Routers shipped:

- `hybrid` (default): `embedding` prototypes and `lexical` word statistics, their
  log-probabilities added; the embedding's cosine decides the out-of-domain fallback.
- `embedding`: sentence embeddings (all-MiniLM-L6-v2, or a base LM's pooled hidden states),
  nearest-prototype or kNN scoring, after LoRA-Retriever (Zhao et al. 2024,
  https://arxiv.org/abs/2402.09997).
- `lexical`: multinomial naive Bayes over hashed words and word pairs (McCallum and Nigam
  1998; Rennie et al. 2003).
- `perplexity`: the adapter under which the input's loss is lowest, after AdapterCL
  (Madotto et al. 2021, https://arxiv.org/abs/2012.15504).
- `arrow`: data-free prototypes from each LoRA's weights, after Arrow
  (Ostapenko et al. 2024, https://arxiv.org/abs/2405.11157).

Why `hybrid` is the default: measured by `bench/routing.py` on the five BBC News domains
(448 held-out articles; docs/benchmarks.md has the table) it is the most accurate of the
routers at the latency of the embedding router: one small-encoder forward per query plus a
hashed word count, whatever the number of domains. The embedding router alone misroutes
articles whose opening is about another domain's topic (business stories about games or
pensions); the word model sees the whole article and each domain's own vocabulary. The
perplexity router pays one LM forward per adapter per query (its cost grows with every
domain) and needs well-trained adapters; Arrow needs no data at all, which makes it the
router for adapters imported without data, but it is far less accurate on these domains.

Threshold rule (`RouterCore.calibrate`): the confidence of an input is its top probability,
or for the embedding router its cosine similarity to the nearest domain (a softmax over
domains is often sure *which* domain even for text in none of them; the raw similarity is
not: on the BBC demo, in-domain articles sit above 0.12 and general questions below 0.10).
Let acc(t) be the held-out in-domain accuracy when inputs below t fall back to the base
(a fallback counts as an error) and fb(t) the fraction of out-of-domain inputs that fall
back. Feasible thresholds keep acc(t) >= acc(0) - `max_accuracy_drop` (default 0.02).
With out-of-domain inputs we pick the feasible t that maximises acc(t) + fb(t); without
them, the largest feasible t (the most conservative router that still keeps in-domain
accuracy). Candidate thresholds are the observed confidences and the midpoints between
them; when several maximise the objective, the middle one is taken (a margin on both sides).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from registry.errors import BadInputError, ConflictError, IntegrityError, NotFoundError
from registry.names import validate_name

DEFAULT_ROUTER = "hybrid"
#: earlier defaults: a workspace built with one of them keeps it (plait.workspace.Workspace.router_kind)
LEGACY_DEFAULT_ROUTERS = ("embedding",)
CONFIG_FILE = "router.json"
TENSORS_FILE = "router.safetensors"
FORMAT_VERSION = 1
#: how much of each text a router sees (the encoders truncate further; word counts use it all)
ROUTER_TEXT_CHARS = 8000
#: `evaluate` returns the dense confusion matrix up to this many domains, its non-zero cells above
DENSE_CONFUSION_MAX = 64


@dataclass(frozen=True)
class AdapterWeight:
    """One adapter of a decision: its domain, its adapter reference and its blend weight."""

    domain: str
    ref: str
    weight: float


class DomainScores(Mapping):
    """Every domain's probability for one input (domain -> float), made into a dict only when
    read: with thousands of domains, most decisions (an audit's thousands of rows) are never
    asked for their scores, and building each dict cost more than routing the row."""

    __slots__ = ("_domains", "_row", "_dict")

    def __init__(self, domains: tuple[str, ...], row):
        self._domains, self._row, self._dict = domains, row, None

    def _items(self) -> dict[str, float]:
        if self._dict is None:
            self._dict = dict(zip(self._domains, self._row.tolist()))
        return self._dict

    def __getitem__(self, domain: str) -> float:
        return self._items()[domain]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._domains)

    def __repr__(self) -> str:
        return repr(self._items())


@dataclass(frozen=True)
class RouteDecision:
    """How one input is served.

    Attributes:
        domain: the top domain, or None to answer with the base model alone (fallback).
        adapters: the top-k adapters with weights renormalised to sum to 1 (empty on fallback).
        scores: every domain's probability, in the router's domain order.
        confidence: the router's confidence (see the module docstring), compared with the threshold.
    """

    domain: str | None
    adapters: list[AdapterWeight]
    scores: Mapping[str, float]
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: `domain`, `adapters` as `{ref, domain, weight}`, `scores`, `confidence`."""
        return {"domain": self.domain, "adapters": [asdict(a) for a in self.adapters],
                "scores": dict(self.scores), "confidence": self.confidence}


@dataclass
class Calibration:
    """The outcome of `calibrate`: the threshold and what it does on the held-out data."""

    threshold: float
    in_domain_accuracy: float
    in_domain_accuracy_no_threshold: float
    in_domain_fallback_rate: float
    ood_fallback_rate: float | None
    n_in_domain: int
    n_ood: int
    max_accuracy_drop: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Router(Protocol):
    """What the engine, the CLI and the continual loop need from a router."""

    kind: str
    domains: list[str]
    threshold: float

    def fit(self, domain_data: Mapping[str, Any], refs: Mapping[str, str] | None = None) -> Router:
        """Fit from scratch on {domain: data}; data is what `add_domain` takes."""
        ...

    def add_domain(self, domain: str, data: Any, ref: str | None = None) -> None:
        """Add one domain, touching no other domain's state."""
        ...

    def score(self, texts: Sequence[str]) -> Any:
        """Tensor [len(texts), len(domains)] of probabilities (rows sum to 1)."""
        ...

    def route(self, texts: Sequence[str], top_k: int = 1) -> list[RouteDecision]:
        """One decision per input, in input order."""
        ...

    def calibrate(self, heldout_in_domain: Mapping[str, Sequence[str]],
                  heldout_out_of_domain: Sequence[str] | None = None) -> Calibration:
        """Set the fallback threshold from held-out data."""
        ...

    def to_files(self) -> dict[str, bytes]:
        """The artifact: `router.json` + `router.safetensors`."""
        ...


def check_texts(texts: Sequence[str], what: str = "input") -> list[str]:
    """Return `texts` as a list after checking every item is a non-empty string.

    Raises:
        BadInputError: an item is not a string or is blank, naming its position.
    """
    if isinstance(texts, str):
        raise BadInputError(f"give a list of texts, not one string ({texts[:40]!r}...): wrap it as [text]")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str) or not t.strip():
            raise BadInputError(f"{what} {i} is empty or not text ({t!r}); give non-empty strings")
    return out


class RouterCore:
    """Shared mechanics; a router sets `kind`, implements `_add` / `_score_logits` / state I/O.

    Subclass contract:
        `_add(domain, data)` builds the new domain's state from `data` and touches nothing else.
        `_score_logits(texts)` returns a float tensor [n, len(domains)] of logits (or override
        `_scores` to compute the fallback's confidence from other scores than the logits).
        `_domain_tensors(domain)` / `_load_domain_tensors(domain, tensors)` map one domain's
        state to named tensors (stored as `<domain>/<name>` in the safetensors file).
        `_params()` / `_runtime_kwargs` hold the JSON-able settings.
    """

    kind = "base"

    def __init__(self, temperature: float = 1.0, threshold: float = 0.0):
        if not temperature > 0:
            raise BadInputError(f"temperature={temperature} must be > 0 (e.g. 0.05)")
        if not 0.0 <= threshold <= 1.0:
            raise BadInputError(f"threshold={threshold} must be in [0, 1]")
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.domains: list[str] = []
        self.refs: dict[str, str] = {}
        self.calibration: Calibration | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self, domain_data: Mapping[str, Any], refs: Mapping[str, str] | None = None):
        """Forget any state and add every domain of `domain_data` in its order.

        Args:
            domain_data: {domain: data}, data as `add_domain` takes it.
            refs: optional {domain: adapter ref} (default: the domain name).

        Returns:
            self.

        Raises:
            BadInputError: no domains, or a domain's data is empty.
        """
        if not domain_data:
            raise BadInputError("fit needs at least one domain: give {domain: [texts]} (or adapters)")
        self.fit_reset()
        for domain, data in domain_data.items():
            self.add_domain(domain, data, ref=(refs or {}).get(domain))
        return self

    def fit_reset(self) -> None:
        """Forget every domain, its state, the refs and the calibration."""
        self._reset()
        self.domains, self.refs, self.calibration, self.threshold = [], {}, None, 0.0

    def add_domain(self, domain: str, data: Any, ref: str | None = None) -> None:
        """Add one domain; every other domain's state stays byte-identical.

        Args:
            domain: the new domain's name.
            data: what this router learns the domain from (texts, an adapter, ...).
            ref: the adapter reference decisions name for this domain (default: `domain`).

        Raises:
            ConflictError: the domain is already in the router.
            BadInputError: an invalid name or empty data.
        """
        validate_name(domain, "domain name")
        if domain in self.domains:
            raise ConflictError(f"domain {domain!r} is already in the {self.kind} router; "
                                f"fit a new router to replace it")
        self._add(domain, data)
        self.domains.append(domain)
        self.refs[domain] = ref or domain

    def set_ref(self, domain: str, ref: str) -> None:
        """Point `domain`'s decisions at another adapter reference (e.g. a new version)."""
        self._index(domain)
        self.refs[domain] = ref

    def _index(self, domain: str) -> int:
        if domain not in self.domains:
            raise NotFoundError(f"unknown domain {domain!r}: the router knows "
                                f"{', '.join(self.domains) or 'no domains'}; add it with add_domain first")
        return self.domains.index(domain)

    # ------------------------------------------------------------------ scoring
    def score(self, texts: Sequence[str]):
        """Probabilities [len(texts), len(domains)], rows summing to 1, higher = more likely.

        Raises:
            BadInputError: the router has no domains, or an input is empty.
        """
        return self.scored(texts)[0]

    def scored(self, texts: Sequence[str]):
        """(probabilities [n, n_domains], confidence [n]) for a batch of inputs.

        The confidence is what the fallback threshold is compared with: by default the top
        probability; a router whose raw scores measure "in any domain at all" (the embedding
        router's cosine similarity) overrides `_confidence`, because a softmax over domains
        can be confident about which domain even for text that belongs to none of them.
        """
        import torch

        texts = check_texts(texts)
        if not self.domains:
            raise BadInputError(f"the {self.kind} router has no domains yet: fit it or add_domain first")
        if not texts:
            return torch.zeros(0, len(self.domains)), torch.zeros(0)
        logits, raw = self._scores(texts)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return probs, self._confidence(raw.float(), probs)

    def _scores(self, texts: list[str]):
        """(logits for the probabilities, the raw scores `_confidence` reads); the same tensor
        unless a router decides by one score and falls back by another (`hybrid`)."""
        logits = self._score_logits(texts)
        return logits, logits

    def _confidence(self, raw, probs):
        return probs.max(-1).values

    def route(self, texts: Sequence[str], top_k: int = 1) -> list[RouteDecision]:
        """Route each input: top-k adapters, or the base model when the top probability < threshold.

        Args:
            texts: the inputs.
            top_k: how many adapters to blend (weights renormalised over the k best).

        Returns:
            one `RouteDecision` per input, in input order.

        Raises:
            BadInputError: top_k outside 1..number of domains, or bad inputs.
        """
        if self.domains and (isinstance(top_k, bool) or not isinstance(top_k, int)
                             or not 1 <= top_k <= len(self.domains)):
            raise BadInputError(f"top_k={top_k!r} is out of range: use 1..{len(self.domains)} "
                                f"(the router has {len(self.domains)} domains)")
        probs, conf = self.scored(texts)
        names = tuple(self.domains)
        return [self._decide(names, row, top_k, float(c)) for row, c in zip(probs, conf)]

    def _decide(self, names: tuple[str, ...], row, top_k: int, confidence: float) -> RouteDecision:
        import torch

        scores = DomainScores(names, row)
        vals, idx = torch.topk(row, top_k)
        if confidence < self.threshold:
            return RouteDecision(None, [], scores, confidence)
        weights = (vals / vals.sum()).tolist()
        adapters = [AdapterWeight(self.domains[i], self.refs[self.domains[i]], float(w))
                    for i, w in zip(idx.tolist(), weights)]
        return RouteDecision(adapters[0].domain, adapters, scores, confidence)

    # ------------------------------------------------------------------ held-out data
    def _labelled(self, heldout: Mapping[str, Sequence[str]]) -> tuple[list[str], list[int]]:
        if not heldout:
            raise BadInputError("held-out data is empty: give {domain: [texts]} for the router's domains")
        texts, labels = [], []
        for domain, items in heldout.items():
            i = self._index(domain)
            items = check_texts(items, f"held-out text of {domain!r}")
            texts += items
            labels += [i] * len(items)
        if not texts:
            raise BadInputError("held-out data has no texts: give at least one text per domain")
        return texts, labels

    def evaluate(self, heldout: Mapping[str, Sequence[str]], reuse_calibration: bool = False) -> dict[str, Any]:
        """Routing accuracy on labelled held-out texts, with and without the fallback threshold.

        Args:
            reuse_calibration: the router has not changed since `calibrate` scored these same
                texts (a router update calibrates, then evaluates on the same held-out sets):
                reuse those scores instead of scoring every text against every domain again.

        Returns:
            {"accuracy": top-1 accuracy ignoring the threshold, "accuracy_with_fallback",
             "fallback_rate", "confusion": [true][predicted] counts in domain order,
             "per_domain": {domain: accuracy}, "domains": [...], "n": count}. Above
            `DENSE_CONFUSION_MAX` domains "confusion" gives way to "confusion_cells": the non-zero
            [true, predicted, count] triples (at most one per text), so what a router version
            stores grows with its held-out rows, not with the square of its domains.
        """
        import torch

        texts, labels = self._labelled(heldout)
        last = getattr(self, "_calibration_scores", None)
        if reuse_calibration and last is not None and last[0] == texts:
            probs, conf = last[1], last[2]
            self._calibration_scores = None  # used once: do not keep N x domains scores alive
        else:
            probs, conf = self.scored(texts)
        pred = probs.argmax(-1)
        y = torch.tensor(labels)
        n_dom = len(self.domains)
        if n_dom <= DENSE_CONFUSION_MAX:
            dense = torch.zeros(n_dom, n_dom, dtype=torch.long)
            dense.index_put_((y, pred), torch.ones_like(y), accumulate=True)
            confusion = {"confusion": dense.tolist()}
        else:
            pairs, counts = torch.unique(torch.stack([y, pred], 1), dim=0, return_counts=True)
            confusion = {"confusion_cells": [[int(a), int(b), int(c)] for (a, b), c in zip(pairs.tolist(), counts)]}
        kept = conf >= self.threshold
        per_domain = {}
        for i, d in enumerate(self.domains):
            m = y == i
            if m.any():
                per_domain[d] = float((pred[m] == i).float().mean())
        return {"accuracy": float((pred == y).float().mean()),
                "accuracy_with_fallback": float(((pred == y) & kept).float().mean()),
                "fallback_rate": float((~kept).float().mean()),
                **confusion, "per_domain": per_domain,
                "domains": list(self.domains), "n": len(texts)}

    def calibrate(self, heldout_in_domain: Mapping[str, Sequence[str]],
                  heldout_out_of_domain: Sequence[str] | None = None,
                  max_accuracy_drop: float = 0.02) -> Calibration:
        """Choose and set the fallback threshold (rule in the module docstring).

        Args:
            heldout_in_domain: {domain: held-out texts} for domains the router knows.
            heldout_out_of_domain: texts no adapter should serve, or None.
            max_accuracy_drop: how much in-domain accuracy (absolute) the threshold may cost.

        Returns:
            the calibration, also kept on the router and stored with it.

        Raises:
            NotFoundError: a held-out domain the router does not know.
            BadInputError: empty held-out data or a drop outside [0, 1].
        """
        import torch

        if not 0.0 <= max_accuracy_drop <= 1.0:
            raise BadInputError(f"max_accuracy_drop={max_accuracy_drop} must be in [0, 1] (e.g. 0.02)")
        texts, labels = self._labelled(heldout_in_domain)
        probs, conf_in = self.scored(texts)
        self._calibration_scores = (texts, probs, conf_in)  # for `evaluate(..., reuse_calibration=True)`
        pred = probs.argmax(-1)
        correct = pred == torch.tensor(labels)
        ood = check_texts(heldout_out_of_domain or [], "out-of-domain text")
        conf_ood = self.scored(ood)[1] if ood else torch.zeros(0)

        cand = torch.unique(torch.cat([conf_in, conf_ood]))  # sorted ascending
        mids = (cand[1:] + cand[:-1]) / 2
        thresholds = torch.cat([torch.zeros(1), cand, mids, cand[-1:] + 1e-6]).clamp(max=1.0).unique()
        acc = ((conf_in[None, :] >= thresholds[:, None]) & correct[None, :]).float().mean(-1)
        feasible = acc >= float(correct.float().mean()) - max_accuracy_drop - 1e-9
        if ood:
            fb = (conf_ood[None, :] < thresholds[:, None]).float().mean(-1)
            objective = torch.where(feasible, acc + fb, torch.full_like(acc, -1.0))
            # the middle (in value, not in index: confidences crowd near 1) of the equally good
            # range, so unseen inputs get a margin on both sides
            ties = torch.nonzero(objective == objective.max()).flatten()
            t = float((thresholds[ties[0]] + thresholds[ties[-1]]) / 2)
        else:
            t = float(thresholds[int(torch.nonzero(feasible).max())])
        self.threshold = t
        self.calibration = Calibration(
            threshold=t, in_domain_accuracy=float(((conf_in >= t) & correct).float().mean()),
            in_domain_accuracy_no_threshold=float(correct.float().mean()),
            in_domain_fallback_rate=float((conf_in < t).float().mean()),
            ood_fallback_rate=float((conf_ood < t).float().mean()) if ood else None,
            n_in_domain=len(texts), n_ood=len(ood), max_accuracy_drop=max_accuracy_drop)
        return self.calibration

    # ------------------------------------------------------------------ artifact
    def to_files(self) -> dict[str, bytes]:
        """Serialise to `router.json` (settings, domains, refs, threshold) and
        `router.safetensors` (per-domain tensors named `<domain>/<name>`); no pickle."""
        from safetensors.torch import save

        tensors = {}
        for d in self.domains:
            for name, t in self._domain_tensors(d).items():
                tensors[f"{d}/{name}"] = t.detach().contiguous().cpu()
        config = {"plait_router": self.kind, "format_version": FORMAT_VERSION, "domains": list(self.domains),
                  "refs": dict(self.refs), "temperature": self.temperature, "threshold": self.threshold,
                  "calibration": self.calibration.to_dict() if self.calibration else None,
                  "params": self._params()}
        return {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(), TENSORS_FILE: save(tensors)}

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], **runtime: Any):
        """Rebuild a router from `to_files()` output.

        Args:
            files: {"router.json": bytes, "router.safetensors": bytes}.
            **runtime: live objects the router scores with (encoder, scorer, model...), see
                each router's constructor; they are not part of the artifact.

        Raises:
            IntegrityError: files missing, of another router kind, or inconsistent.
        """
        from safetensors.torch import load

        config, tensors = _read_files(files)
        if config.get("plait_router") != cls.kind:
            raise IntegrityError(f"router artifact is of kind {config.get('plait_router')!r}, not {cls.kind!r}; "
                                 f"load it with load_router(files)")
        router = cls(**config["params"], **runtime, temperature=config["temperature"])
        router.threshold = float(config["threshold"])
        router.domains = list(config["domains"])
        router.refs = dict(config["refs"])
        if config.get("calibration"):
            router.calibration = Calibration(**config["calibration"])
        grouped: dict[str, dict[str, Any]] = {d: {} for d in router.domains}
        for key, t in load(tensors).items():
            d, _, name = key.partition("/")
            if d not in grouped:
                raise IntegrityError(f"router tensor {key!r} belongs to no domain of the artifact")
            grouped[d][name] = t
        for d in router.domains:
            router._load_domain_tensors(d, grouped[d])
        return router

    # ------------------------------------------------------------------ subclass hooks
    def _reset(self) -> None:
        """Drop all per-domain state (fit starts from nothing)."""

    def _add(self, domain: str, data: Any) -> None:
        raise NotImplementedError

    def _score_logits(self, texts: list[str]):
        raise NotImplementedError

    def _domain_tensors(self, domain: str) -> dict[str, Any]:
        return {}

    def _load_domain_tensors(self, domain: str, tensors: dict[str, Any]) -> None:
        pass

    def _params(self) -> dict[str, Any]:
        return {}


def _read_files(files: Mapping[str, bytes]) -> tuple[dict[str, Any], bytes]:
    missing = [f for f in (CONFIG_FILE, TENSORS_FILE) if f not in files]
    if missing:
        raise IntegrityError(f"router artifact lacks {', '.join(missing)}; it holds {', '.join(sorted(files))}")
    try:
        config = json.loads(files[CONFIG_FILE])
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"router.json is not valid JSON ({e}); re-register the router") from e
    if config.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(f"router artifact format {config.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}; refit the router with this plait")
    return config, files[TENSORS_FILE]


# ---------------------------------------------------------------------- discovery
def available_routers() -> list[str]:
    """Names of the router modules in this package (each sets `ROUTER_CLASS`)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_router_class(name: str) -> type:
    """The router class of module `routing.routers.<name>`.

    Raises:
        NotFoundError: no such router module, naming the ones that exist.
    """
    names = available_routers()
    if name not in names:
        raise NotFoundError(f"unknown router {name!r}: use one of {', '.join(names)}")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.ROUTER_CLASS


def read_files(folder) -> dict[str, bytes]:
    """The artifact files of a router folder (e.g. `Registry.router_path(info)`) as bytes."""
    from pathlib import Path

    folder = Path(folder)
    return {name: (folder / name).read_bytes() for name in (CONFIG_FILE, TENSORS_FILE)
            if (folder / name).is_file()}


def row_input(row: Any, max_chars: int = ROUTER_TEXT_CHARS) -> str:
    """What a router sees of a data row (a `training.data.Row` or a stored row dict): its text, or its prompt."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k, None)
    return (get("text") or get("prompt") or "")[:max_chars]


def router_runtime(kind: str, engine=None) -> dict[str, Any]:
    """The live objects a router kind scores with (none for the text routers: hybrid, embedding, lexical).

    Args:
        kind: the router kind.
        engine: the loaded `routing.engine.Routing` (needed by perplexity and arrow).

    Raises:
        BadInputError: the kind needs the base model and `engine` is None.
    """
    if kind in ("perplexity", "arrow"):
        if engine is None:
            raise BadInputError(f"the {kind} router needs the base model loaded; use it through plait.RoutedModel")
        return {"scorer": engine} if kind == "perplexity" else {"model": engine.model, "tokenizer": engine.tokenizer}
    return {}


def load_router(files: Mapping[str, bytes], **runtime: Any):
    """Rebuild any router from its artifact files, picking the class from `router.json`.

    Args:
        files: {"router.json": ..., "router.safetensors": ...} as bytes.
        **runtime: live objects the router kind needs (see its constructor).
    """
    config, _ = _read_files(files)
    return get_router_class(config.get("plait_router", "?")).from_files(files, **runtime)


__all__ = ["AdapterWeight", "Calibration", "DEFAULT_ROUTER", "LEGACY_DEFAULT_ROUTERS", "RouteDecision", "Router", "RouterCore",
           "ROUTER_TEXT_CHARS", "available_routers", "check_texts", "get_router_class", "load_router", "read_files",
           "router_runtime", "row_input"]
