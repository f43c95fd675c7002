"""The forgetting audit: the continual-learning report card of a workspace, and a gate.

A *stage* is the system after adding domain i: the router version that covers the first
i+1 domains, the exact adapter versions it covers, and the base. For every stage and every
domain's frozen eval set the audit records the mean token loss (and, for prompt/completion
rows, the exact match of the greedy completion) of

    base        the base model alone
    own         the domain's own newest version at that stage (oracle routing)
    routed      the stage's router choosing per input (base fallback below its threshold)
    sequential  one LoRA fine-tuned on the domains one after another (baseline: the naive
                practice that forgets), kept in the registry as the lineage chain
                `sequential-baseline:1 <- :2 <- ...`, one version per stage. Each link trains
                on its domain's stored training rows with that domain's own steps, batch size
                and length, and the LoRA default learning rate (the same for every baseline;
                `baseline_lr` in the Python API). A link is reused when its parent, its data
                and its learning rate match.
    merged      the stage's LoRA-family adapters (lora, qlora) merged into one LoRA with peft's
                `add_weighted_adapter` (baseline: one model for every domain). `--merge cat`
                (default) is the exact mean of the LoRA deltas (weights 1/n each, n = the LoRAs
                merged), `ties` is TIES-Merging (weights 1.0, density 0.2, then SVD to the
                largest rank), `linear` peft's approximate linear merge (one rank only); see
                `training.merge`. Bottleneck adapters cannot be merged by peft: they are left
                out and the report says so per stage. A stage with one LoRA uses it as it is;
                a stage with none has the base model's row. Each true merge is registered as
                a version of `merged-baseline` (domain `plait-baselines`) with one `merge`
                lineage edge per parent version and its weight, and reused by later audits.
    joint       one LoRA trained once on the union of the final stage's domains' stored
                training rows, shuffled with a fixed seed (baseline: multi-task training, the
                upper bound of continual learning), with the sequential chain's total steps,
                its mean batch size per step, its longest length and the same learning rate.
                Registered as a version of `joint-baseline` (domain `plait-baselines`, lineage
                to the base) and reused while its data and settings are unchanged. It exists
                only after the last stage: its matrix has one row, its ACC is that row's mean,
                and BWT, FWT and forgetting, which need earlier stages, are None (empty).

into the matrix R[i][j] (stage i, domain j), and computes ACC, BWT, FWT and per-domain
forgetting with Avalanche's definitions (`plait.forgetting`). Figures of earlier stages come
from the registry's stored audit metrics (name `R.<system>.loss`, with the stage and the
eval domain), each reused only for what it measured: `own` and the baselines for the exact
version (the metric row's version), `routed` for the exact router version (the audit's summary
records the router of each stage, `stage_routers`), so a new version or a re-pointed router is
measured afresh. An audit after domain N measures one new row plus R[N-2][N-1] (the previous
system on the new domain, for FWT); a stage never audited before is measured once and stored.

`own` is each domain's own newest version when the stage's router version was registered
(oracle routing); `routed` is whatever the router serves, which may be another version, even
another domain's adapter, once the router re-points a domain. The audit reports, per domain,
the version the router served it with at each stage (`served`).

Integrity: every stored artifact must pass its hash check (`Registry.verify`), every covered
adapter must have been trained on the workspace base (fingerprint), and an adapter's loss on
its own eval set must equal what earlier audits recorded for the same version (its outputs
did not change). The control set (general text outside every domain) checks that the routed
system stays at the base model's level there.

Gate: the audit fails when integrity fails or when any domain's forgetting under `own` or
`routed` exceeds `max_forgetting` (nats of mean token loss; positive = worse).
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait._runtime import fewer_gc_passes
from plait.datasets import AUDIT_CONTROL
from plait.forgetting import continual_metrics, final_stage_metrics
from registry.errors import BadInputError, NotFoundError
from registry.names import BASELINE_DOMAIN, whole_number
from training.data import DEFAULT_MAX_LENGTH
from training.merge import check_method

SYSTEMS = ("base", "own", "routed")
BASELINES = ("sequential", "merged", "joint")
#: systems that exist only after the last stage (one matrix row; no BWT, FWT or forgetting)
ONE_STAGE = ("joint",)
#: tokens per eval text of a workspace's first audit, unless given
SEQUENTIAL = "sequential-baseline"
MERGED = "merged-baseline"
JOINT = "joint-baseline"
#: seeds the joint baseline's shuffle of the domains' rows, and every baseline's training
BASELINE_SEED = 0
#: outputs of an unchanged adapter on its own eval set must reproduce to this (nats)
OUTPUT_TOLERANCE = 1e-4
#: how far the routed system may sit above the base on the control set (nats)
CONTROL_TOLERANCE = 0.05
#: above this many domains the heatmap has no labels and the report no domains x stages table;
#: summaries (audit.json, `--json`, the registry's copy) then hold, of each stage x domain
#: matrix, the three vectors the metrics read (`matrix_vectors`) instead of N x N cells, and the
#: final stage's served version per domain; every figure stays in the registry (its metrics)
HEATMAP_LABELS = 40
#: the heatmap draws at most the newest this many domains (rows and columns)
HEATMAP_MAX = 100


@dataclass
class AuditResult:
    audit_id: int | None
    domains: list[str]
    matrices: dict[str, list[list[float | None]]]
    metrics: dict[str, dict[str, Any]]
    current: dict[str, dict[str, float]]
    routing_accuracy: dict[str, float]
    control: dict[str, float]
    integrity: list[str]
    passed: bool
    reasons: list[str]
    max_forgetting: float
    exact_match: dict[str, dict[str, float]] = field(default_factory=dict)
    #: how each baseline was built, e.g. {"merged": {"method", "stages": [{..., "note"}]}}
    baselines: dict[str, Any] = field(default_factory=dict)
    #: per domain, the version the router served it with at each stage (row i; None: not covered yet)
    served: dict[str, list[str | None]] = field(default_factory=dict)
    #: per domain, its own newest version at the final stage (the `own` system's adapter)
    own_versions: dict[str, str | None] = field(default_factory=dict)
    #: the router version of each stage (row i), None where no router version covers it
    stage_routers: list[str | None] = field(default_factory=list)
    out_dir: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The result as JSON-ready data; above HEATMAP_LABELS domains the matrices and the served
        table shrink to what grows linearly (see HEATMAP_LABELS)."""
        out = dict(self.__dict__)
        if len(self.domains) > HEATMAP_LABELS:
            out["matrix_vectors"] = {s: matrix_vectors(R) for s, R in out.pop("matrices").items()}
            out["served_final"] = {d: refs[-1] if refs else None for d, refs in out.pop("served").items()}
        return out


def matrix_vectors(R: list[list[float | None]]) -> dict[str, list[float | None]]:
    """What the continual-learning metrics read of a stage x domain matrix: R[j][j] (`diagonal`),
    R[j-1][j] (`previous`, None for the first domain) and the final stage's row (`final`)."""
    return {"diagonal": [R[j][j] for j in range(len(R))],
            "previous": [None] + [R[j - 1][j] for j in range(1, len(R))],
            "final": list(R[-1]) if R else []}


def _texts(rows: list[dict]) -> tuple[list[str], list[str] | None]:
    if all("prompt" in r and "completion" in r for r in rows):
        return [r["prompt"] for r in rows], [r["completion"] for r in rows]
    return [r.get("text") or r.get("prompt", "") for r in rows], None


@dataclass
class _Stage:
    """A stage: the router version covering the first `index + 1` domains, as the audit reads it."""

    index: int
    info: Any  # registry.client.RouterInfo
    #: domain -> the version the router serves it with (read from the router's own router.json)
    refs: dict[str, str]
    #: domain -> its own newest version when the router version was registered (the oracle)
    own: dict[str, str] = field(default_factory=dict)

    @property
    def anchor(self) -> str:
        """A version to file a figure under when it concerns no covered domain (a metric row needs one)."""
        return next(iter(self.refs.values()), None) or self.info.covers[0]


@dataclass
class _Plan:
    """What one audit covers: the domains in order, the ones audited, and each stage's router."""

    all_domains: list[str]
    order: list[str]
    stages: dict[int, _Stage]

    @functools.cached_property
    def pos(self) -> dict[str, int]:
        at = {d: i for i, d in enumerate(self.all_domains)}  # one pass: thousands of domains
        return {d: at[d] for d in self.order}

    @property
    def last_stage(self) -> int:
        return self.pos[self.order[-1]]

    @property
    def current(self) -> _Stage:
        return self.stages[self.last_stage]

    def rows(self):
        """(row i, stage number, stage or None) for each audited domain, in order."""
        pos = self.pos
        for i, d in enumerate(self.order):
            yield i, pos[d], self.stages.get(pos[d])

    def empty(self) -> list[list[float | None]]:
        return [[None] * len(self.order) for _ in self.order]


def _plan(reg, kind: str, all_domains: list[str], order: list[str]) -> _Plan:
    """The newest router version of each stage, its served versions and each domain's own version."""
    from routing.routers import CONFIG_FILE

    stages: dict[int, _Stage] = {}
    for info in reg.search_router_versions(kind, metrics=False):  # oldest first: the newest of a stage wins
        config = json.loads((reg.router_path(info) / CONFIG_FILE).read_text())
        n = len(config["domains"])  # not len(covers): a re-pointed router may serve two domains with one version
        if 1 <= n <= len(all_domains):
            stages[n - 1] = _Stage(n - 1, info, {d: config["refs"][d] for d in config["domains"]})
    plan = _Plan(all_domains, order, stages)
    if plan.last_stage not in stages:
        raise NotFoundError(f"no router version covers the first {plan.last_stage + 1} domains; train a domain to "
                            f"fit one")
    own_versions: dict[str, list] = {}  # one query for every domain's versions, not one per domain
    for v in sorted(reg.search_versions(), key=lambda v: v.created_at):
        own_versions.setdefault(v.domain, []).append(v)
    for st in stages.values():
        for d in st.refs:  # a domain's own versions registered up to the router version's registration
            mine = [v for v in own_versions.get(d, []) if v.created_at <= st.info.created_at]
            if mine:
                st.own[d] = mine[-1].ref
    return plan


class _StoredFigures:
    """The figures earlier audits stored (metric rows `R.<system>.loss`), keyed by what they measured.

    The key is (system, stage, eval domain, what): `what` is None for the base, the version for
    `own` and the baselines (the metric row's version), and the router version for `routed` (the
    storing audit's `stage_routers`; figures of audits that did not record it are not reused).
    """

    def __init__(self, reg):
        audits = reg.search_audits()
        routers = {a.id: a.summary.get("stage_routers") or {} for a in audits}
        self.values: dict[tuple, float] = {}
        self.any: dict[tuple, float] = {}  # (system, domain, what) -> the newest figure at any stage
        # (domain, digest of the routing decisions of its eval rows) -> routed loss (`routed_digest`)
        self.routed: dict[tuple[str, str], float] = {}
        for a in audits:  # oldest first
            for d, r in (a.summary.get("routed_rows") or {}).items():
                self.routed[(d, r["digest"])] = r["loss"]
        self.own_rows: dict[tuple, dict[str, Any]] = {}  # (stage, domain) -> the newest own figure
        for m in reg.search_audit_metrics("R."):  # oldest first: the newest wins
            system = m["name"][len("R."):-len(".loss")]
            what = {"base": None, "routed": routers.get(m["audit_id"], {}).get(str(m["stage"]))}.get(system, m["ref"])
            self.values[(system, m["stage"], m["eval_domain"], what)] = m["value"]
            self.any[(system, m["eval_domain"], what)] = m["value"]
            if system == "own":
                self.own_rows[(m["stage"], m["eval_domain"])] = m

    def get(self, system: str, stage: int, domain: str, what: str | None = None) -> float | None:
        return self.values.get((system, stage, domain, what))

    def same(self, system: str, domain: str, what: str | None = None) -> float | None:
        """A figure that does not depend on the stage: the base, or one exact version (`own`), on
        the domain's frozen eval rows at the workspace's one eval length, from any stage."""
        return self.any.get((system, domain, what))


class _Auditor:
    def __init__(self, ws, max_length: int, progress: bool, log):
        self.ws, self.reg = ws, ws.registry
        self.rm = ws.routed_model
        self.rm.refresh()
        self.rm.engine.max_length = max_length
        self.max_length, self.progress = max_length, progress
        self.log = log if progress else None  # progress lines, or None when quiet
        self.rows: list[dict[str, Any]] = []  # metrics to store with the audit
        self.eval_cache: dict[str, tuple[list[str], list[str] | None]] = {}
        self.routers: dict[int, Any] = {}
        self.row_cache: dict[tuple, Any] = {}  # (domain, ("base",) | ("one", ref)) -> per-row losses
        self.merge_model = None  # a full-precision base for peft merges, loaded on first use
        self.decided: dict[int, dict[str, list]] = {}  # router version id -> domain -> decisions
        self.routed_rows: dict[str, dict[str, Any]] = {}  # final stage: domain -> {digest, loss}
        self.order: list[str] = []  # the audited domains (set by run_audit)

    def eval_set(self, domain: str):
        if domain not in self.eval_cache:
            self.eval_cache[domain] = _texts(self.reg.get_domain_eval(domain))
        return self.eval_cache[domain]

    def prefetch(self, domains: list[str]) -> None:
        """Read the eval sets of `domains` not read yet, with one registry query."""
        todo = [d for d in domains if d not in self.eval_cache]
        for d, rows in self.reg.get_many_domain_rows(todo, "eval").items():
            self.eval_cache[d] = _texts(rows)

    def row_losses(self, domain: str, routings, key: tuple | None = None):
        """Per-row losses of the domain's eval set; with `key` (("base",) or ("one", ref): a
        routing that is the same for every row and fixed for the audit) cached for this audit."""
        if key is not None and (domain, key) in self.row_cache:
            return self.row_cache[(domain, key)]
        texts, completions = self.eval_set(domain)
        losses = self.rm.engine.loss(texts, routings, completions=completions)
        if key is not None:
            self.row_cache[(domain, key)] = losses
        return losses

    def loss(self, domain: str, routings, key: tuple | None = None) -> float:
        return float(self.row_losses(domain, routings, key).mean())

    def routed_row_losses(self, domain: str, decisions):
        """Per-row losses under the router's decisions. A row sent to the base, or to one adapter
        with weight 1, has the loss that routing gives it, already measured in this audit for the
        base or that adapter; only the other rows (blends, adapters not yet measured on this
        domain) run through the model, as one mixed batch."""
        import torch

        from routing.engine import Routing

        texts, completions = self.eval_set(domain)
        out = torch.empty(len(texts))
        todo = []
        for i, d in enumerate(decisions):
            key = ("base",) if not d.adapters else (("one", d.adapters[0].ref)
                                                    if len(d.adapters) == 1 and d.adapters[0].weight == 1.0 else None)
            cached = self.row_cache.get((domain, key)) if key else None
            if cached is not None:
                out[i] = cached[i]
            else:
                todo.append(i)
        if todo:
            routings = [Routing.merged([(self.load(a.ref), a.weight) for a in decisions[i].adapters]) for i in todo]
            out[todo] = self.rm.engine.loss([texts[i] for i in todo], routings,
                                            completions=[completions[i] for i in todo] if completions else None)
        return out

    def load(self, ref: str) -> str:
        # past stages may cover versions archived since (kept by gc while a live router covers them)
        return self.rm.ensure_adapter(ref, allow_archived=True)

    def stage_router(self, router_info):
        from routing.routers import load_router, read_files, router_runtime

        if router_info.id not in self.routers:
            self.routers[router_info.id] = load_router(read_files(self.reg.router_path(router_info)),
                                                       **router_runtime(router_info.kind, self.rm.engine))
        return self.routers[router_info.id]

    def measure(self, stage: _Stage, domain: str, systems: tuple[str, ...]) -> dict[str, float]:
        """Losses of the stage's systems on one domain's eval set."""
        from routing.engine import Routing

        out = {}
        # the base, and one adapter version, give the same figure at every stage of one audit:
        # each is measured once per domain (`row_cache`)
        if "base" in systems:
            out["base"] = self.loss(domain, Routing.base(), key=("base",))
        if "own" in systems:
            own = stage.own.get(domain)
            out["own"] = (self.loss(domain, Routing.one(self.load(own)), key=("one", own)) if own
                          else self.loss(domain, Routing.base(), key=("base",)))
        if "routed" in systems:
            decisions = self.decisions(stage, domain)
            out["routed"] = float(self.routed_row_losses(domain, decisions).mean())
            out["routing_accuracy"] = sum(d.domain == domain for d in decisions) / len(decisions)
        return out

    def decisions(self, stage: _Stage, domain: str):
        """The stage router's decisions on the domain's eval rows. Every audited domain's rows are
        routed in one batch per stage (one sparse product over the domains, not one per domain),
        with their embeddings cached by content (`routing.routers._features`)."""
        from routing.routers._features import cached_embeddings

        key = stage.info.id
        if key not in self.decided:
            domains = [d for d in self.order if d in stage.refs] or [domain]
            self.prefetch(domains)
            if domain not in domains:
                domains.append(domain)
            texts = [t[:1000] for d in domains for t in self.eval_set(d)[0]]
            with cached_embeddings():
                flat = self.stage_router(stage.info).route(texts)
            self.decided[key], at = {}, 0
            for d in domains:
                n = len(self.eval_set(d)[0])
                self.decided[key][d], at = flat[at:at + n], at + n
        if domain not in self.decided[key]:
            with cached_embeddings():
                self.decided[key][domain] = self.stage_router(stage.info).route(
                    [t[:1000] for t in self.eval_set(domain)[0]])
        return self.decided[key][domain]

    def record(self, system: str, ref: str, stage: int, domain: str, value: float) -> None:
        """Keep a figure measured now, to store with the audit."""
        self.rows.append({"ref": ref, "eval_domain": domain, "name": f"R.{system}.loss", "value": value,
                          "stage": stage})

    def version_loss(self, stored: _StoredFigures, system: str, ref: str, stage: int, domain: str) -> float:
        """A baseline version's loss on a domain: stored for that exact version, else measured and kept."""
        from routing.engine import Routing

        v = stored.get(system, stage, domain, ref)
        if v is None:
            if self.log:
                self.log(f"  measuring {system} baseline {ref} (stage {stage + 1}) on {domain}")
            v = self.loss(domain, Routing.one(self.load(ref)))
            self.record(system, ref, stage, domain, v)
        return v


def run_audit(ws, *, domains: list[str] | None = None, baselines: tuple[str, ...] | list[str] = (),
              max_forgetting: float = 0.05, out_dir: str | Path | None = None, max_length: int | None = None,
              merge: str = "cat", baseline_lr: float | None = None, progress: bool = True,
              log=print) -> AuditResult:
    """Audit the workspace's continual system; see the module docstring.

    Args:
        domains: restrict to these domains (default: every domain with an eval set, in order).
        baselines: any of ("sequential", "merged", "joint").
        merge: how the merged baseline merges: cat, ties or linear (`training.merge`).
        baseline_lr: the learning rate of every trained baseline (sequential, joint); None = the
            LoRA default (`get_kind("lora").default_lr`).
        max_forgetting: the gate's threshold on own/routed forgetting, in nats.
        out_dir: where report.md, audit.json and the heatmaps go (default: workspace/audits/<id>).
        max_length: tokens per eval text; None = the length earlier audits of this workspace
            used (DEFAULT_MAX_LENGTH for the first). Figures at another length are not comparable
            with the stored ones, so a different length than earlier audits' is refused.

    Returns:
        the `AuditResult` (also stored in the registry and MLflow).

    Raises:
        BadInputError: an unknown baseline or merge method, a bad threshold, length or rate.
        NotFoundError: an unknown domain, nothing trained, or no router version for the last stage.
    """
    with fewer_gc_passes():
        return _run_audit(ws, domains, baselines, max_forgetting, out_dir, max_length, merge, baseline_lr,
                          progress, log)


def _run_audit(ws, domains, baselines, max_forgetting, out_dir, max_length, merge, baseline_lr, progress,
               log) -> AuditResult:
    """`run_audit` with its options as given."""
    t0 = time.time()
    reg = ws.registry
    baseline_lr = _check_options(baselines, merge, max_forgetting, baseline_lr)
    max_length = _audit_length(reg, max_length)
    all_domains, order = _audit_order(reg, domains)
    broken = [f"hash check failed: {r['error']}" for r in reg.verify() if not r["ok"]]
    if broken:  # nothing is loaded from a store that fails its checks: record the failure and stop
        return _failed_audit(ws, order, broken, max_forgetting, out_dir, t0)
    plan = _plan(reg, ws.router_kind, all_domains, order)
    aud = _Auditor(ws, max_length, progress, log)
    aud.order = order
    stored = _StoredFigures(reg)
    matrices, routing_accuracy = _system_matrices(aud, plan, stored)
    baseline_info = _baselines(ws, aud, plan, stored, matrices, baselines, merge, baseline_lr)
    result = _result(ws, aud, plan, stored, matrices, routing_accuracy, max_forgetting)
    result.baselines = baseline_info
    _store(ws, aud, plan, result, max_length, out_dir)
    result.seconds = time.time() - t0
    write_report(result, Path(result.out_dir))
    _track(ws, result, Path(result.out_dir))
    return result


def _check_options(baselines, merge: str, max_forgetting: float, baseline_lr: float | None) -> float:
    """Refuse bad options before anything is measured; returns the baselines' learning rate."""
    from training.methods import get_kind

    for b in baselines:
        if b not in BASELINES:
            raise BadInputError(f"unknown baseline {b!r}: use {', '.join(BASELINES)} or none")
    check_method(merge)
    if not math.isfinite(max_forgetting) or max_forgetting < 0:
        raise BadInputError(f"--max-forgetting {max_forgetting} must be a number >= 0 (nats of mean token loss)")
    if baseline_lr is not None and (isinstance(baseline_lr, bool) or not isinstance(baseline_lr, (int, float))
                                    or not 0 < baseline_lr < 1):
        raise BadInputError(f"baseline_lr {baseline_lr!r} is invalid: use a number between 0 and 1, or None for "
                            f"the LoRA default ({get_kind('lora').default_lr})")
    return float(baseline_lr) if baseline_lr is not None else get_kind("lora").default_lr


def _audit_order(reg, domains: list[str] | None) -> tuple[list[str], list[str]]:
    """Every domain with an eval set in the order added, and the ones this audit covers."""
    all_domains = [d["name"] for d in reg.search_domains() if d["eval_sha256"] and d["name"] != BASELINE_DOMAIN]
    if domains:
        unknown = [d for d in domains if d not in all_domains]
        if unknown:
            raise NotFoundError(f"unknown domain(s) {', '.join(unknown)}; domains with eval sets: "
                                f"{', '.join(all_domains) or 'none'}")
    order = [d for d in all_domains if not domains or d in domains]
    if not order:
        raise NotFoundError("nothing to audit: no domain has been trained yet (plait train)")
    return all_domains, order


def _system_matrices(aud: _Auditor, plan: _Plan, stored: _StoredFigures):
    """R[i][j] of base, own and routed, and the final stage's routing accuracy per domain.

    Earlier stages come from stored figures where they exist; the final stage is always measured
    (its own figures are the integrity check's "outputs unchanged"). Row i holds domains j <= i,
    and j = i + 1: FWT needs the previous stage's system on the next domain.
    """
    matrices = {s: plan.empty() for s in SYSTEMS}
    routing_accuracy: dict[str, float] = {}
    for i, stage_no, stage in plan.rows():
        if stage is None:
            continue
        for j, d_j in enumerate(plan.order[:i + 2]):
            got, fresh = _cell(aud, stage, d_j, stored, current=stage_no == plan.last_stage)
            if "routing_accuracy" in fresh and stage_no == plan.last_stage:
                routing_accuracy[d_j] = fresh["routing_accuracy"]
            for s in SYSTEMS:
                matrices[s][i][j] = got[s]
    return matrices, routing_accuracy


def _cell(aud: _Auditor, stage: _Stage, domain: str, stored: _StoredFigures, current: bool):
    """One stage's base, own and routed figures on one domain: stored, else measured and kept.

    A figure is measured only when nothing stored says what it is: the base's and a version's
    loss on a domain's frozen eval rows are the same at every stage (`_StoredFigures.same`), and
    the routed loss is the same whenever the router makes the same decision for every row
    (`routed_digest`). So the audit after domain N measures the new domain, the previous stage on
    it (FWT) and the domains whose routing changed; the rest is read. The final stage's figures
    are recorded again under this audit (copies), so each audit holds its final row.
    """
    own = stage.own.get(domain)
    got = {"base": stored.get("base", stage.index, domain),
           "routed": stored.get("routed", stage.index, domain, stage.info.ref)}
    # without an own version the oracle is the base model: the stored base figure stands for it
    got["own"] = stored.get("own", stage.index, domain, own) if own else got["base"]
    fresh: dict[str, float] = {}
    if current:
        got["base"] = stored.same("base", domain) if got["base"] is None else got["base"]
        got["own"] = (stored.same("own", domain, own) if own else got["base"]) if got["own"] is None else got["own"]
        decisions = aud.decisions(stage, domain)
        digest = routed_digest(decisions)
        got["routed"] = stored.routed.get((domain, digest))
        fresh["routing_accuracy"] = sum(d.domain == domain for d in decisions) / len(decisions)
    need = [s for s in SYSTEMS if got[s] is None]
    if need:
        if aud.log:
            aud.log(f"  measuring stage {stage.index + 1} ({stage.info.ref}) on {domain}: {', '.join(need)}")
        fresh.update(aud.measure(stage, domain, tuple(need)))
        got.update({s: fresh[s] for s in need})
    for s in (SYSTEMS if current else need):
        ref = {"own": own, "routed": stage.refs.get(domain)}.get(s) or stage.refs.get(domain) or stage.anchor
        aud.record(s, ref, stage.index, domain, got[s])
    if current:
        aud.routed_rows[domain] = {"digest": digest, "loss": got["routed"]}
    return got, fresh


def routed_digest(decisions) -> str:
    """sha256 of what the router decided for each row: (ref, weight) pairs, or the base. Refs are
    exact, immutable and hash-checked, and the eval rows frozen: equal digests, equal losses."""
    import hashlib

    rows = [[(a.ref, round(a.weight, 6)) for a in d.adapters] for d in decisions]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _baselines(ws, aud: _Auditor, plan: _Plan, stored: _StoredFigures, matrices, baselines, merge: str,
               lr: float) -> dict[str, Any]:
    """Add each chosen baseline's matrix to `matrices`; returns how each was built."""
    info: dict[str, Any] = {}
    if "sequential" in baselines:
        matrices["sequential"], info["sequential"] = _sequential(ws, aud, plan, stored, lr)
    if "merged" in baselines:
        stage_of = dict(plan.stages)
        matrices["merged"], info["merged"] = _merged(ws, aud, plan.order, plan.all_domains, stage_of,
                                                     matrices["base"], merge, aud.log)
    if "joint" in baselines:
        matrices["joint"], info["joint"] = _joint(ws, aud, plan, stored, lr)
    return info


def _result(ws, aud: _Auditor, plan: _Plan, stored: _StoredFigures, matrices, routing_accuracy,
            max_forgetting: float) -> AuditResult:
    """The audit's figures, integrity findings and verdict (not yet stored)."""
    order, L = plan.order, len(plan.order) - 1
    base_row = [matrices["base"][L][j] for j in range(len(order))]
    metrics = {s: (final_stage_metrics(R[L], order, higher_is_better=False) if s in ONE_STAGE
                   else _staged_metrics(plan, R, base_row)).to_dict()
               for s, R in matrices.items()}
    control = _control(aud, plan.current)
    integrity = _integrity(ws, plan, stored, matrices)
    reasons = list(integrity)
    for s in ("own", "routed"):
        for d, f in metrics[s]["forgetting"].items():
            if f > max_forgetting:
                reasons.append(f"{s} forgetting on {d} is {f:.4f} nats > --max-forgetting {max_forgetting}")
    if control["delta"] > CONTROL_TOLERANCE:
        reasons.append(f"routed system is {control['delta']:.4f} nats worse than the base on the control set "
                       f"(tolerance {CONTROL_TOLERANCE})")
    current = {s: {d: matrices[s][L][j] for j, d in enumerate(order)} for s in matrices}
    stages = [stage for _, _, stage in plan.rows()]
    served = {d: [st.refs.get(d) if st else None for st in stages] for d in order}
    return AuditResult(None, order, matrices, metrics, current, routing_accuracy, control, integrity, not reasons,
                       reasons, max_forgetting, served=served, own_versions={d: plan.current.own.get(d) for d in order},
                       stage_routers=[st.info.ref if st else None for st in stages])


def _staged_metrics(plan: _Plan, R, base_row):
    """ACC, BWT, FWT and forgetting (Avalanche), over the domains that had a stage of their own.

    Domains added together in one router version (several jobs landing in one update, adapters
    imported in bulk) have no row of their own before the stage that covers them all: they get
    no forgetting figure, FWT is left out when consecutive stages are missing, and ACC is the
    mean of the whole final row. With every stage present this is `continual_metrics` as is.
    """
    staged = [i for i, _, stage in plan.rows() if stage is not None]
    if len(staged) == len(plan.order):
        return continual_metrics(R, plan.order, higher_is_better=False, base=base_row)
    sub = [[R[a][b] for b in staged] for a in staged]
    gaps = any(b != a + 1 for a, b in zip(staged, staged[1:]))
    m = continual_metrics(sub, [plan.order[j] for j in staged], higher_is_better=False,
                          base=None if gaps else [base_row[j] for j in staged])
    m.acc = sum(R[-1]) / len(R[-1])
    return m


def _control(aud: _Auditor, stage: _Stage) -> dict[str, float]:
    """The routed system against the base on general text outside every domain."""
    from routing.engine import Routing

    from routing.routers._features import cached_embeddings

    router = aud.stage_router(stage.info)
    texts = list(AUDIT_CONTROL)
    with cached_embeddings():
        decisions = router.route(texts)
    routed = [Routing.merged([(aud.load(a.ref), a.weight) for a in d.adapters]) for d in decisions]
    base = float(aud.rm.engine.loss(texts, Routing.base()).mean())
    routed_loss = float(aud.rm.engine.loss(texts, routed).mean())
    return {"base_loss": base, "routed_loss": routed_loss, "delta": routed_loss - base,
            "fallback_rate": sum(d.domain is None for d in decisions) / len(decisions), "n": len(texts)}


def _store(ws, aud: _Auditor, plan: _Plan, result: AuditResult, max_length: int, out_dir) -> None:
    """Record the audit and the figures measured now in the registry; set its id and report folder."""
    reg = ws.registry
    whole = result.summary()
    summary = {"domains": result.domains, "metrics": result.metrics, "current": result.current,
               "routing_accuracy": result.routing_accuracy, "control": result.control,
               "integrity": result.integrity, "passed": result.passed, "reasons": result.reasons,
               "max_forgetting": result.max_forgetting, "max_length": max_length, "router": plan.current.info.ref,
               **{k: whole[k] for k in ("matrices", "matrix_vectors", "served", "served_final") if k in whole},
               "baselines": result.baselines, "own_versions": result.own_versions, "routed_rows": aud.routed_rows,
               # which router version each stage's routed figures measured: later audits reuse them only for it
               "stage_routers": {str(k): st.info.ref for k, st in plan.stages.items()}}
    audit = reg.create_audit(domains=result.domains, passed=result.passed, summary=summary)
    result.audit_id = audit.id
    if aud.rows:
        reg.log_audit_metrics(audit.id, aud.rows)
    result.out_dir = str(Path(out_dir) if out_dir else ws.path / "audits" / f"{audit.id:04d}")


def _audit_length(reg, max_length: int | None) -> int:
    """The eval length of this audit: the one earlier audits used, which an explicit value must match."""
    if max_length is not None:
        whole_number(max_length, "max length (tokens per eval text)", 2, example=DEFAULT_MAX_LENGTH)
    latest = reg.get_latest_audit()  # one row, not every audit's summary
    earlier = latest.summary.get("max_length") if latest else None
    if latest is not None and earlier is None:  # a stopped audit records none: the newest that did
        earlier = next((a.summary["max_length"] for a in reversed(reg.search_audits()) if "max_length" in a.summary),
                       None)
    if earlier is None:
        return max_length or DEFAULT_MAX_LENGTH
    if max_length is not None and max_length != earlier:
        raise BadInputError(f"--max-length {max_length} differs from the {earlier} tokens earlier audits of this "
                            f"workspace measured with; audit with --max-length {earlier} (figures at other "
                            f"lengths are not comparable)")
    return earlier


def _failed_audit(ws, order, problems, max_forgetting, out_dir, t0) -> AuditResult:
    result = AuditResult(None, order, {}, {}, {}, {}, {"base_loss": float("nan"), "routed_loss": float("nan"),
                         "delta": float("nan"), "fallback_rate": float("nan"), "n": 0}, problems, False,
                         list(problems), max_forgetting)
    try:  # the failure judges the versions the router serves: the production gate reads them
        covers = ws.registry.get_router(ws.router_kind).covers
    except NotFoundError:
        covers = []
    audit = ws.registry.create_audit(domains=order, passed=False, summary={"integrity": problems, "passed": False,
                                                                            "reasons": problems}, covers=covers)
    result.audit_id = audit.id
    out = Path(out_dir) if out_dir else ws.path / "audits" / f"{audit.id:04d}"
    out.mkdir(parents=True, exist_ok=True)
    result.out_dir, result.seconds = str(out), time.time() - t0
    (out / "audit.json").write_text(json.dumps(result.summary(), indent=2, default=str))
    (out / "report.md").write_text(f"# plait forgetting audit #{audit.id}\n\n**FAILED** — integrity:\n\n"
                                   + "".join(f"- {p}\n" for p in problems))
    return result


# ----------------------------------------------------------------- trained baselines: sequential, joint
def _rows_data(train_rows: list[dict], eval_rows: list[dict], where: str):
    """Stored rows as the trainer's `DomainData` (its fingerprint identifies a baseline's data)."""
    from training.data import DomainData, Row, fingerprint_rows

    def rows(items, split):
        return [Row(text=r.get("text"), prompt=r.get("prompt"), completion=r.get("completion"),
                    where=f"{where}:{split}:{n + 1}") for n, r in enumerate(items)]

    train, ev = rows(train_rows, "train"), rows(eval_rows, "eval")
    return DomainData(train, ev, fingerprint_rows(train, ev), "file")


def _domain_settings(reg, domain: str) -> dict[str, int]:
    """Steps, batch size and length of the domain's own newest version (what its chain link trains with)."""
    own = sorted(reg.search_versions(domain=domain), key=lambda v: v.created_at)
    cfg = own[-1].config if own else {}
    return {"steps": cfg.get("steps") or 20, "batch_size": cfg.get("batch_size", 4),
            "max_length": cfg.get("max_length", DEFAULT_MAX_LENGTH)}


def _baseline_versions(reg, name: str) -> list:
    try:
        return reg.search_versions(name=name)
    except NotFoundError:
        return []


def _train_baseline(ws, name: str, dd, settings: dict[str, int], lr: float, from_ref: str | None = None):
    """Train and register one baseline LoRA version (domain `plait-baselines`)."""
    from training.trainer import TrainConfig, train_domain

    return train_domain(ws.registry, ws.config.base_model, BASELINE_DOMAIN, dd, config=TrainConfig(
        method="lora", name=name, steps=settings["steps"], batch_size=settings["batch_size"],
        max_length=settings["max_length"], lr=lr, seed=BASELINE_SEED, progress=False, evaluate=False,
        from_ref=from_ref, replay=0.0)).version  # the baselines are plain fine-tuning: no rehearsal


def _chain(ws, domains: list[str], lr: float, log=None, train: bool = True) -> list[tuple[Any, dict[str, int]]]:
    """The sequential chain's link for each of `domains` (in order) and the settings it trains with.

    Link k is the `sequential-baseline` version warm-started from link k-1 (link 0: from the
    base) on domain k's stored rows at learning rate `lr`; an existing one is reused. With
    `train=False` a missing link is None and its settings are what it would train with.
    """
    reg = ws.registry
    existing = _baseline_versions(reg, SEQUENTIAL)
    links: list[tuple[Any, dict[str, int]]] = []
    for k, d in enumerate(domains):
        parent = links[-1][0].ref if links and links[-1][0] is not None else None
        dd = _rows_data(reg.get_domain_rows(d, "train"), reg.get_domain_eval(d), d)
        found = [v for v in existing if v.data_fingerprint == dd.fingerprint and v.config.get("lr") == lr
                 and v.config.get("warm_start") == parent] if k == 0 or parent else []
        if found:
            v = found[-1]
            links.append((v, {k_: v.config[k_] for k_ in ("steps", "batch_size", "max_length")}))
            continue
        settings = _domain_settings(reg, d)
        link = None
        if train:
            if log:
                log(f"  training {SEQUENTIAL} on {d}" + (f" (warm start from {parent})" if parent else ""))
            link = _train_baseline(ws, SEQUENTIAL, dd, settings, lr, from_ref=parent)
        links.append((link, settings))
    return links


def _sequential(ws, aud: _Auditor, plan: _Plan, stored: _StoredFigures, lr: float):
    """The sequential fine-tuning baseline's matrix (training its missing links) and how it was built."""
    links = _chain(ws, plan.all_domains[:plan.last_stage + 1], lr, aud.log)
    R = plan.empty()
    for i, stage_no, _ in plan.rows():
        ref = links[stage_no][0].ref
        for j, d_j in enumerate(plan.order[:i + 2]):  # i + 1: the next domain, for FWT
            R[i][j] = aud.version_loss(stored, "sequential", ref, stage_no, d_j)
    return R, {"lr": lr, "links": [v.ref for v, _ in links], "steps": [s["steps"] for _, s in links],
               "batch_size": [s["batch_size"] for _, s in links]}


def _joint_settings(links: list[tuple[Any, dict[str, int]]]) -> dict[str, int]:
    """The chain's total steps; its batch size per step on average (so the joint run sees as many
    examples as the chain; the chain's own when every link has one), and its longest length."""
    steps = sum(s["steps"] for _, s in links)
    examples = sum(s["steps"] * s["batch_size"] for _, s in links)
    return {"steps": steps, "batch_size": max(1, round(examples / steps)),
            "max_length": max(s["max_length"] for _, s in links)}


def _joint(ws, aud: _Auditor, plan: _Plan, stored: _StoredFigures, lr: float):
    """The joint baseline's matrix (its final row only) and how it was built, training it if needed."""
    reg = ws.registry
    covered = plan.all_domains[:plan.last_stage + 1]
    settings = _joint_settings(_chain(ws, covered, lr, train=False))
    rows = [r for d in covered for r in reg.get_domain_rows(d, "train")]
    random.Random(BASELINE_SEED).shuffle(rows)
    # the eval rows only complete the trainer's input (it does not evaluate baselines): the first domain's
    dd = _rows_data(rows, reg.get_domain_eval(covered[0]), "joint")
    found = [v for v in _baseline_versions(reg, JOINT) if v.data_fingerprint == dd.fingerprint
             and v.config.get("lr") == lr and all(v.config.get(k) == n for k, n in settings.items())]
    if found:
        version = found[-1]
    else:
        if aud.log:
            aud.log(f"  training {JOINT} on {len(rows)} rows of {', '.join(covered)} ({settings['steps']} steps)")
        version = _train_baseline(ws, JOINT, dd, settings, lr)
    R = plan.empty()
    L = len(plan.order) - 1
    R[L] = [aud.version_loss(stored, "joint", version.ref, plan.last_stage, d) for d in plan.order]
    if version.ref in aud.rm.engine.adapters:  # it served only this measurement: free the shared engine
        aud.rm.engine.remove_adapter(version.ref)
    return R, {"ref": version.ref, "domains": covered, "rows": len(rows), "lr": lr, **settings,
               "trained": not found}


def _merged(ws, aud, order, all_domains, stage_of, base_R, method, log
            ) -> tuple[list[list[float | None]], dict[str, Any]]:
    """The merged baseline's matrix and, per stage, what was merged and what was left out."""
    from routing.engine import Routing
    from training.merge import TIES_DENSITY, merge_weights
    from training.methods import mergeable_kinds

    reg = ws.registry
    # a figure is reused only for the exact version it was measured on
    done = {(m["ref"], m["stage"], m["eval_domain"]): m["value"] for m in reg.search_audit_metrics("R.merged.loss")}
    R: list[list[float | None]] = [[None] * len(order) for _ in order]
    stages, loaded_here = [], []
    for i, d_i in enumerate(order):
        stage = all_domains.index(d_i)
        st = stage_of.get(stage)
        if st is None:
            continue
        # each covered domain's OWN version (not the one the router serves it with: a re-pointed
        # domain would put one adapter into the merge twice and leave its own adapter out)
        versions = [reg.get_version(r) for r in dict.fromkeys(st.own.get(d) or st.refs[d] for d in st.refs)]
        loras = [v for v in versions if v.kind in mergeable_kinds()]
        unmerged = [v for v in versions if v.kind not in mergeable_kinds()]
        skipped = [v.ref for v in unmerged]
        weights = merge_weights(method, len(loras)) if loras else []
        if len(loras) > 1:
            ref = _merged_version(ws, aud, loras, weights, method, log)
        else:  # merging one LoRA with weight 1 gives it back: use it as it is
            ref = loras[0].ref if loras else None
        entry = {"stage": stage, "domain": d_i, "merged": [v.ref for v in loras], "weights": weights,
                 "skipped_bottleneck": skipped, "skipped_kinds": {v.ref: v.kind for v in unmerged}, "ref": ref}
        entry["note"] = _merged_note(entry, method)
        stages.append(entry)
        for j, d_j in enumerate(order[:i + 2]):  # i + 1: the next domain, for FWT
            if ref is None:  # nothing to merge: the system is the base model
                R[i][j] = base_R[i][j]
                continue
            v = done.get((ref, stage, d_j))
            if v is None:
                if ref not in aud.rm.engine.adapters:
                    loaded_here.append(ref)
                if log:
                    log(f"  measuring merged baseline {ref} (stage {stage + 1}) on {d_j}")
                v = aud.loss(d_j, Routing.one(aud.load(ref)))
                aud.rows.append({"ref": ref, "eval_domain": d_j, "name": "R.merged.loss", "value": v, "stage": stage})
                done[(ref, stage, d_j)] = v
            R[i][j] = v
    # the merged adapters served only this measurement: do not leave them in the shared engine
    for ref in loaded_here:
        aud.rm.engine.remove_adapter(ref)
    aud.merge_model = None
    return R, {"method": method, "density": TIES_DENSITY if method == "ties" else None, "stages": stages}


def _merged_version(ws, aud, loras, weights, method, log) -> str:
    """The registered merge of `loras` (found, or merged with peft and registered now)."""
    import copy
    import tempfile

    from training.base import load_base
    from training.merge import TIES_DENSITY, merge_loras

    reg = ws.registry
    parents = [v.ref for v in loras]
    spec = {"merge": method, "parents": parents, "weights": weights,
            "density": TIES_DENSITY if method == "ties" else None}
    try:
        for v in reg.search_versions(name=MERGED):
            if {k: v.config.get(k) for k in spec} == spec:
                return v.ref
    except NotFoundError:
        pass
    if log:
        log(f"  merging {', '.join(parents)} into {MERGED} ({method})")
    if aud.merge_model is None:
        aud.merge_model = load_base(ws.config.base_model).model
    folders = [reg.artifact_path(v, allow_archived=True)[1] for v in loras]
    tmp_root = ws.path / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        out = merge_loras(copy.deepcopy(aud.merge_model), folders, weights, Path(tmp) / "merged", method=method)
        peft_cfg = json.loads((out / "adapter_config.json").read_text())
        info = reg.register_version(
            MERGED, domain=BASELINE_DOMAIN, kind="lora", files=out, base_fingerprint=ws.base_fingerprint,
            config={**spec, "method": "lora", "r": peft_cfg.get("r"), "target_modules": peft_cfg.get("target_modules")},
            parents=[(r, "merge", w) for r, w in zip(parents, weights)],
            description=f"merged baseline: {method} merge of {', '.join(parents)}")
    return info.ref


def _merged_note(entry: dict[str, Any], method: str) -> str:
    """One line saying what the merged baseline is at a stage."""
    head = f"after {entry['domain']} (stage {entry['stage'] + 1}): "
    # the refs left out, grouped by their kind (a version of any kind whose Kind is not mergeable)
    kinds = entry.get("skipped_kinds") or dict.fromkeys(entry["skipped_bottleneck"], "bottleneck")
    groups: dict[str, list[str]] = {}
    for ref in entry["skipped_bottleneck"]:
        groups.setdefault(kinds.get(ref, "bottleneck"), []).append(ref)
    tail = "; ".join(f"{k} adapters of {', '.join(refs)}" for k, refs in groups.items())
    tail = f"{tail} not mergeable, left out" if tail else ""
    if not entry["merged"]:
        return head + "no LoRA adapter to merge, the row is the base model" + (f" ({tail})" if tail else "")
    if len(entry["merged"]) == 1:
        body = f"one LoRA, {entry['merged'][0]}, used as it is"
    else:
        w = entry["weights"]
        ws_ = f"weights 1/{len(w)} each" if method != "ties" else "weights 1.0 each"
        body = f"merged LoRA of {', '.join(entry['merged'])} ({method}, {ws_}) = {entry['ref']}"
    return head + body + (f"; {tail}" if tail else "")


def _integrity(ws, plan: _Plan, stored: _StoredFigures, matrices) -> list[str]:
    """Base fingerprints of the versions the final stage serves and owns, and own outputs unchanged."""
    problems = []
    try:
        base_fp = ws.base_fingerprint
    except Exception as e:  # noqa: BLE001 - a base that cannot be read fails the audit, it does not crash it
        return problems + [f"base model unreadable: {e}"]
    stage, L = plan.current, len(plan.order) - 1
    refs = dict.fromkeys(r for d in plan.order for r in (stage.refs.get(d), stage.own.get(d)) if r)
    versions = {v.ref: v for v in ws.registry.search_versions(include_archived=True)}  # one query, not one a ref
    for ref in refs:
        info = versions.get(ref) or ws.registry.get_version(ref)
        if info.base_fingerprint != base_fp:
            problems.append(f"{ref} was trained on base {info.base_fingerprint[:23]}…, the workspace base is "
                            f"{base_fp[:23]}…")
    by_domain: dict[str, list[dict]] = {}  # grouped once: one pass, not one per domain
    for (_, dom), m in stored.own_rows.items():
        by_domain.setdefault(dom, []).append(m)
    for j, d in enumerate(plan.order):
        # the same version's loss on its own eval set, recorded by an earlier audit, must reproduce
        ref, now = stage.own.get(d), matrices["own"][L][j]
        for m in by_domain.get(d, ()):
            if ref is not None and m["ref"] == ref and now is not None and abs(m["value"] - now) > OUTPUT_TOLERANCE:
                problems.append(f"{ref}'s loss on its own eval set changed since audit {m['audit_id']}: "
                                f"{m['value']:.6f} -> {now:.6f}")
                break
    return problems


def heatmap_figure(result: AuditResult):
    """One panel per system (the base is the zero of the scale): R[i][j] minus the base model's loss
    on domain j, on one diverging colour scale shared by every panel and centred on 0, so equal
    colours are equal differences in nats in every panel, and a domain far from the base's
    knowledge does not flatten the others. Returns a matplotlib `Figure` (object API: no global
    pyplot backend switch in the caller's process, e.g. a notebook)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    n, L = len(result.domains), len(result.domains) - 1
    first = max(0, n - HEATMAP_MAX)  # thousands of domains: the newest HEATMAP_MAX rows and columns
    names = result.domains[first:]
    base = result.matrices["base"][L]
    systems = [s for s in result.matrices if s != "base"]
    deltas = {s: [[float("nan") if v is None else v - base[j] for j, v in enumerate(row[first:], first)]
                  for row in result.matrices[s][first:]] for s in systems}
    n = len(names)
    largest = max((abs(v) for R in deltas.values() for row in R for v in row if not math.isnan(v)), default=0.0)
    norm = Normalize(vmin=-max(largest, 1e-6), vmax=max(largest, 1e-6))  # one scale for every panel
    fig = Figure(figsize=(3.2 * len(systems) + 1.2, 3.6), layout="constrained")
    axes = fig.subplots(1, len(systems), squeeze=False)[0]
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.82")  # grey: not measured (white is 0)
    image = None
    for ax, s in zip(axes, systems):
        image = ax.imshow(deltas[s], cmap=cmap, norm=norm)
        ax.set_title(s, fontsize=9)
        if n > HEATMAP_LABELS:  # hundreds of domains: the colours only (labels would take minutes)
            continue
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), [f"after {d}" for d in names], fontsize=7)
        for i in range(n):
            for j in range(n):
                v = deltas[s][i][j]
                if not math.isnan(v):
                    ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=6,
                            color="w" if abs(v) > 0.6 * largest else "k")
    fig.colorbar(image, ax=list(axes), fraction=0.046, label="loss - base loss (nats)")
    newest = f" (the newest {n} of {len(result.domains)} domains)" if first else ""
    fig.suptitle("mean token loss relative to the base model, R[i][j] - base_j: after adding domain i (rows), on "
                 f"domain j (columns){newest}; below 0 (blue) = better than the base; grey = not measured", fontsize=8)
    return fig


def write_report(result: AuditResult, out: Path) -> None:
    """report.md, audit.json and heatmap.png (`heatmap_figure`) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result.summary(), indent=2, default=str))
    heatmap_figure(result).savefig(out / "heatmap.png", dpi=130)
    lines = [f"# plait forgetting audit #{result.audit_id}", "",
             f"**{'PASSED' if result.passed else 'FAILED'}** — domains in order: {', '.join(result.domains)}; "
             f"gate: forgetting <= {result.max_forgetting} nats (own, routed), integrity, control set.", ""]
    lines += [f"- {r}" for r in result.reasons]
    lines += _report_tables(result) + _report_served(result) + _report_baselines(result)
    c = result.control
    lines += ["", f"Control set ({c['n']} general texts): base {c['base_loss']:.4f}, routed {c['routed_loss']:.4f} "
              f"(delta {c['delta']:+.4f}), {c['fallback_rate']:.0%} routed to the base.", "",
              "Integrity: " + ("every artifact passed its hash check; adapters match the base; outputs unchanged."
                               if not result.integrity else "; ".join(result.integrity)),
              "", "![heatmap](heatmap.png)", "",
              "The heatmap shows each system's loss minus the base model's on the same domain, on one colour scale "
              "for every panel.", "",
              "Definitions (Avalanche): forgetting_j = R[j][j] - R[L][j] for accuracies, negated for losses; "
              "BWT = -mean forgetting; FWT = mean_j (R[j-1][j] - base_j), signed the same way. A one-stage system "
              "(joint) has ACC only.", ""]
    (out / "report.md").write_text("\n".join(lines))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:+.4f}"


def _report_tables(result: AuditResult) -> list[str]:
    """The final stage's losses per domain, and the continual-learning metrics per system."""
    lines = ["", "## Final stage: mean token loss per domain (lower is better)", "",
             "| domain | " + " | ".join(result.current) + " | routing accuracy |",
             "|---|" + "---|" * (len(result.current) + 1)]
    for d in result.domains:
        acc = result.routing_accuracy.get(d)
        lines.append(f"| {d} | " + " | ".join(f"{result.current[s][d]:.4f}" for s in result.current)
                     + f" | {'-' if acc is None else f'{acc:.1%}'} |")
    lines += ["", "## Continual-learning metrics (signed: positive forgetting = worse; positive BWT/FWT = better)", "",
              "| system | ACC (mean loss) | BWT | FWT | max forgetting |", "|---|---|---|---|---|"]
    for s, m in result.metrics.items():
        lines.append(f"| {s} | {m['acc']:.4f} | {_fmt(m['bwt'])} | {_fmt(m['fwt'])} | {_fmt(m['max_forgetting'])} |")
    lines += ["", "Per-domain forgetting:", ""]
    for s, m in result.metrics.items():
        if s not in ONE_STAGE:
            lines.append(f"- {s}: " + (", ".join(f"{d} {v:+.4f}" for d, v in m["forgetting"].items()) or "-"))
    return lines


def _report_served(result: AuditResult) -> list[str]:
    """Which version the router served each domain with at each stage, and each domain's own version."""
    if not result.served:
        return []
    if len(result.domains) > HEATMAP_LABELS:  # one row per domain, not a domains x domains table
        return ["", "## Versions serving each domain at the final stage (own = the oracle's version)", "",
                "| domain | served | own |", "|---|---|---|"] + [
            f"| {d} | {result.served[d][-1] or '-'} | {result.own_versions.get(d) or '-'} |" for d in result.domains]
    lines = ["", "## Versions serving each domain (router's choice per stage; own = the oracle's version)", "",
             "| stage | router | " + " | ".join(result.domains) + " |", "|---|---|" + "---|" * len(result.domains)]
    for i, d_i in enumerate(result.domains):
        router = result.stage_routers[i] if i < len(result.stage_routers) else None
        lines.append(f"| after {d_i} | {router or '-'} | "
                     + " | ".join(result.served[d][i] or "-" for d in result.domains) + " |")
    lines.append("| own (final) | | " + " | ".join(result.own_versions.get(d) or "-" for d in result.domains) + " |")
    return lines


def _report_baselines(result: AuditResult) -> list[str]:
    """How each baseline was built."""
    lines = []
    seq = result.baselines.get("sequential")
    if seq:
        lines += ["", f"Sequential baseline: {' <- '.join(seq['links'])} (each warm-started from the previous), "
                  f"lr {seq['lr']:g}, steps {'+'.join(map(str, seq['steps']))}."]
    merged = result.baselines.get("merged")
    if merged:
        lines += ["", f"Merged baseline (`--merge {merged['method']}`; peft add_weighted_adapter):", ""]
        lines += [f"- {st['note']}" for st in merged["stages"]]
    joint = result.baselines.get("joint")
    if joint:
        lines += ["", f"Joint baseline: {joint_note(joint)}."]
    return lines


def joint_note(joint: dict[str, Any]) -> str:
    """One line saying what the joint baseline is."""
    return (f"{joint['ref']}, one LoRA trained on the {joint['rows']} shuffled training rows of "
            f"{', '.join(joint['domains'])} ({joint['steps']} steps = the sequential chain's total, batch "
            f"{joint['batch_size']}, lr {joint['lr']:g}; {'trained now' if joint['trained'] else 'reused'})")


def _track(ws, result: AuditResult, out: Path) -> None:
    tracking = ws.registry.tracking
    if tracking is None:
        return
    try:
        with tracking.run("plait-audit", f"audit-{result.audit_id}", {"domains": ",".join(result.domains),
                                                                        "max_forgetting": result.max_forgetting}) as run:
            flat = {"passed": float(result.passed)}
            for s, m in result.metrics.items():
                flat[f"{s}.acc_loss"] = m["acc"]
                for k in ("bwt", "fwt", "max_forgetting"):
                    if m[k] is not None:
                        flat[f"{s}.{k}"] = m[k]
            run.log_metrics(flat)
            run.log_artifacts(out, "report")
        ws.registry.drain_mlflow()  # MLflow is open now: mirror what lighter commands queued
    except Exception as e:  # noqa: BLE001 - MLflow mirrors the audit; the registry already holds it
        import warnings

        warnings.warn(f"could not log the audit to MLflow ({e})", stacklevel=2)
