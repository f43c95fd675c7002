"""The forgetting audit: the continual-learning report card of a workspace, and a gate.

A *stage* is the system after adding domain i: the router version that covers the first
i+1 domains, the exact adapter versions it covers, and the base. For every stage and every
domain's frozen eval set the audit records the mean token loss (and, for prompt/completion
rows, the exact match of the greedy completion) of

    base        the base model alone
    own         the domain's own adapter at that stage (oracle routing)
    routed      the stage's router choosing per input (base fallback below its threshold)
    sequential  one LoRA fine-tuned on the domains one after another (baseline: the naive
                practice that forgets), kept in the registry as the lineage chain
                `sequential-baseline:1 <- :2 <- ...`, one version per stage
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

into the matrix R[i][j] (stage i, domain j), and computes ACC, BWT, FWT and per-domain
forgetting with Avalanche's definitions (`plait.forgetting`). Figures of earlier stages come
from the registry's stored audit metrics (name `R.<system>.loss`, with the stage and the
eval domain; for `merged` also the exact version measured, so a change of method or of a
stage's adapters is measured afresh), so an audit after domain N measures one new row plus
R[N-2][N-1] (the previous system on the new domain, for FWT); a stage never audited before is
measured once from its router version and stored.

Integrity: every stored artifact must pass its hash check (`Registry.verify`), every covered
adapter must have been trained on the workspace base (fingerprint), and an adapter's loss on
its own eval set must equal what earlier audits recorded for the same version (its outputs
did not change). The control set (general text outside every domain) checks that the routed
system stays at the base model's level there.

Gate: the audit fails when integrity fails or when any domain's forgetting under `own` or
`routed` exceeds `max_forgetting` (nats of mean token loss; positive = worse).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.continual import AUDIT_CONTROL, row_input
from plait.forgetting import continual_metrics
from registry.errors import BadInputError, NotFoundError
from training.merge import check_method

SYSTEMS = ("base", "own", "routed")
BASELINES = ("sequential", "merged")
#: tokens per eval text of a workspace's first audit, unless given
DEFAULT_MAX_LENGTH = 256
SEQUENTIAL = "sequential-baseline"
MERGED = "merged-baseline"
BASELINE_DOMAIN = "plait-baselines"
#: outputs of an unchanged adapter on its own eval set must reproduce to this (nats)
OUTPUT_TOLERANCE = 1e-4
#: how far the routed system may sit above the base on the control set (nats)
CONTROL_TOLERANCE = 0.05


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
    out_dir: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _texts(rows: list[dict]) -> tuple[list[str], list[str] | None]:
    if all("prompt" in r and "completion" in r for r in rows):
        return [r["prompt"] for r in rows], [r["completion"] for r in rows]
    return [r.get("text") or r.get("prompt", "") for r in rows], None


class _Auditor:
    def __init__(self, ws, rm, max_length: int, progress):
        self.ws, self.rm, self.reg = ws, rm, ws.registry
        self.max_length, self.progress = max_length, progress
        self.rows: list[dict[str, Any]] = []  # metrics to store with the audit
        self.eval_cache: dict[str, tuple[list[str], list[str] | None]] = {}
        self.routers: dict[int, Any] = {}
        self.row_cache: dict[tuple, Any] = {}  # (domain, ("base",) | ("one", ref)) -> per-row losses
        self.merge_model = None  # a full-precision base for peft merges, loaded on first use

    def eval_set(self, domain: str):
        if domain not in self.eval_cache:
            self.eval_cache[domain] = _texts(self.reg.get_domain_eval(domain))
        return self.eval_cache[domain]

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
            routings = [Routing.blend([(self.load(a.ref), a.weight) for a in decisions[i].adapters]) for i in todo]
            out[todo] = self.rm.engine.loss([texts[i] for i in todo], routings,
                                            completions=[completions[i] for i in todo] if completions else None)
        return out

    def load(self, ref: str) -> str:
        # past stages may cover versions archived since (kept by gc while a live router covers them)
        return self.rm.ensure_adapter(ref, allow_archived=True)

    def stage_router(self, router_info):
        from plait.continual import router_runtime
        from routing.routers import load_router, read_files

        if router_info.id not in self.routers:
            self.routers[router_info.id] = load_router(read_files(self.reg.router_path(router_info)),
                                                       **router_runtime(router_info.kind, self.rm.engine))
        return self.routers[router_info.id]

    def measure(self, stage: int, router_info, domain: str, systems: tuple[str, ...]) -> dict[str, float]:
        """Losses of the stage's systems on one domain's eval set."""
        from routing.engine import Routing

        router = self.stage_router(router_info)
        texts, _ = self.eval_set(domain)
        out = {}
        # the base, and one adapter version, give the same figure at every stage of one audit:
        # each is measured once per domain (`row_cache`)
        if "base" in systems:
            out["base"] = self.loss(domain, Routing.base(), key=("base",))
        if "own" in systems:
            own = router.refs.get(domain)
            out["own"] = (self.loss(domain, Routing.one(self.load(own)), key=("one", own)) if own
                          else self.loss(domain, Routing.base(), key=("base",)))
        if "routed" in systems:
            decisions = router.route([t[:1000] for t in texts])
            out["routed"] = float(self.routed_row_losses(domain, decisions).mean())
            out["routing_accuracy"] = sum(d.domain == domain for d in decisions) / len(decisions)
        return out


def _stage_routers(reg, kind: str, domains: list[str]) -> dict[int, Any]:
    """The newest router version for each stage (stage i covers the first i+1 domains)."""
    out = {}
    for info in reg.search_router_versions(kind):
        n = len(info.covers)
        if 1 <= n <= len(domains):
            out[n - 1] = info
    return out


def run_audit(ws, *, domains: list[str] | None = None, baselines: tuple[str, ...] | list[str] = (),
              max_forgetting: float = 0.05, out_dir: str | Path | None = None, max_length: int | None = None,
              merge: str = "cat", progress: bool = True, log=print) -> AuditResult:
    """Audit the workspace's continual system; see the module docstring.

    Args:
        domains: restrict to these domains (default: every domain with an eval set, in order).
        baselines: any of ("sequential", "merged").
        merge: how the merged baseline merges: cat, ties or linear (`training.merge`).
        max_forgetting: the gate's threshold on own/routed forgetting, in nats.
        out_dir: where report.md, audit.json and the heatmaps go (default: workspace/audits/<id>).
        max_length: tokens per eval text; None = the length earlier audits of this workspace
            used (DEFAULT_MAX_LENGTH for the first). Figures at another length are not comparable
            with the stored ones, so a different length than earlier audits' is refused.

    Returns:
        the `AuditResult` (also stored in the registry and MLflow).
    """
    t0 = time.time()
    reg = ws.registry
    for b in baselines:
        if b not in BASELINES:
            raise BadInputError(f"unknown baseline {b!r}: use {', '.join(BASELINES)} or none")
    check_method(merge)
    max_length = _audit_length(reg, max_length)
    if not math.isfinite(max_forgetting) or max_forgetting < 0:
        raise BadInputError(f"--max-forgetting {max_forgetting} must be a number >= 0 (nats of mean token loss)")
    all_domains = [d["name"] for d in reg.search_domains() if d["eval_sha256"] and d["name"] != BASELINE_DOMAIN]
    if domains:
        unknown = [d for d in domains if d not in all_domains]
        if unknown:
            raise NotFoundError(f"unknown domain(s) {', '.join(unknown)}; domains with eval sets: "
                                f"{', '.join(all_domains) or 'none'}")
    order = [d for d in all_domains if not domains or d in domains]
    if not order:
        raise NotFoundError("nothing to audit: no domain has been trained yet (plait train)")
    broken = [f"hash check failed: {r['error']}" for r in reg.verify() if not r["ok"]]
    if broken:  # nothing is loaded from a store that fails its checks: record the failure and stop
        return _failed_audit(ws, order, broken, max_forgetting, out_dir, t0)
    rm = ws.routed_model
    rm.refresh()
    rm.engine.max_length = max_length
    aud = _Auditor(ws, rm, max_length, progress)
    kind = ws.router_kind
    stage_of = _stage_routers(reg, kind, all_domains)
    L = len(order) - 1
    pos = {d: all_domains.index(d) for d in order}
    last_stage = pos[order[-1]]
    if last_stage not in stage_of:
        raise NotFoundError(f"no router version covers the first {last_stage + 1} domains; train a domain to fit one")

    stored = {}
    for m in reg.search_audit_metrics("R."):
        stored[(m["name"], m["stage"], m["eval_domain"])] = m  # newest wins

    def value(system: str, stage: int, domain: str) -> float | None:
        key = (f"R.{system}.loss", stage, domain)
        if key in stored:
            return stored[key]["value"]
        return None

    matrices: dict[str, list[list[float | None]]] = {s: [[None] * len(order) for _ in order] for s in SYSTEMS}
    routing_accuracy: dict[str, float] = {}
    current_stage_info = stage_of[last_stage]
    # rows of earlier stages: stored figures, else measured once now
    for i, d_i in enumerate(order):
        stage = pos[d_i]
        info = stage_of.get(stage)
        for j, d_j in enumerate(order):
            if j > i + 1 or info is None:
                continue
            # j == i + 1: FWT needs the previous stage's system on the next domain
            is_current = stage == last_stage
            need = [s for s in SYSTEMS if is_current or value(s, stage, d_j) is None]
            got = {s: value(s, stage, d_j) for s in SYSTEMS}
            if need:
                if progress:
                    log(f"  measuring stage {stage + 1} ({d_i}) on {d_j}: {', '.join(need)}")
                fresh = aud.measure(stage, info, d_j, tuple(need))
                if is_current and "routing_accuracy" in fresh:
                    routing_accuracy[d_j] = fresh["routing_accuracy"]
                for s in need:
                    got[s] = fresh[s]
                    own_ref = aud.stage_router(info).refs.get(d_j) or info.covers[0]
                    aud.rows.append({"ref": own_ref, "eval_domain": d_j, "name": f"R.{s}.loss", "value": fresh[s],
                                     "stage": stage})
            for s in SYSTEMS:
                matrices[s][i][j] = got[s]

    base_row = [matrices["base"][L][j] for j in range(len(order))]
    # baselines
    if "sequential" in baselines:
        matrices["sequential"] = _sequential(ws, aud, order, all_domains, value, log if progress else None)
    baseline_info: dict[str, Any] = {}
    if "merged" in baselines:
        matrices["merged"], baseline_info["merged"] = _merged(ws, aud, order, all_domains, stage_of, matrices["base"],
                                                              merge, log if progress else None)

    metrics = {s: continual_metrics(R, order, higher_is_better=False, base=base_row).to_dict()
               for s, R in matrices.items()}

    # control set: the routed system must stay at the base's level outside every domain
    from routing.engine import Routing

    router = aud.stage_router(current_stage_info)
    control_texts = list(AUDIT_CONTROL)
    decisions = router.route(control_texts)
    routed = [Routing.blend([(aud.load(a.ref), a.weight) for a in d.adapters]) for d in decisions]
    control_base = float(rm.engine.loss(control_texts, Routing.base()).mean())
    control_routed = float(rm.engine.loss(control_texts, routed).mean())
    control = {"base_loss": control_base, "routed_loss": control_routed, "delta": control_routed - control_base,
               "fallback_rate": sum(d.domain is None for d in decisions) / len(decisions), "n": len(control_texts)}

    integrity = _integrity(ws, aud, order, stored, matrices, L, pos)
    reasons = list(integrity)
    for s in ("own", "routed"):
        for d, f in metrics[s]["forgetting"].items():
            if f > max_forgetting:
                reasons.append(f"{s} forgetting on {d} is {f:.4f} nats > --max-forgetting {max_forgetting}")
    if control["delta"] > CONTROL_TOLERANCE:
        reasons.append(f"routed system is {control['delta']:.4f} nats worse than the base on the control set "
                       f"(tolerance {CONTROL_TOLERANCE})")
    passed = not reasons
    current = {s: {d: matrices[s][L][j] for j, d in enumerate(order)} for s in matrices}
    result = AuditResult(None, order, matrices, metrics, current, routing_accuracy, control, integrity, passed,
                         reasons, max_forgetting, baselines=baseline_info)

    summary = {"domains": order, "metrics": metrics, "current": current, "routing_accuracy": routing_accuracy,
               "control": control, "integrity": integrity, "passed": passed, "reasons": reasons,
               "max_forgetting": max_forgetting, "max_length": max_length, "router": current_stage_info.ref,
               "matrices": matrices,
               "baselines": baseline_info}
    audit = reg.create_audit(domains=order, passed=passed, summary=summary)
    result.audit_id = audit.id
    if aud.rows:
        reg.log_audit_metrics(audit.id, aud.rows)
    out = Path(out_dir) if out_dir else ws.path / "audits" / f"{audit.id:04d}"
    result.out_dir = str(out)
    result.seconds = time.time() - t0
    write_report(result, out)
    _track(ws, result, out)
    return result


def _audit_length(reg, max_length: int | None) -> int:
    """The eval length of this audit: the one earlier audits used, which an explicit value must match."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise BadInputError(f"--max-length {max_length!r} must be a whole number >= 2 (tokens per eval text)")
    earlier = [a.summary["max_length"] for a in reg.search_audits() if "max_length" in a.summary]
    if not earlier:
        return max_length or DEFAULT_MAX_LENGTH
    if max_length is not None and max_length != earlier[-1]:
        raise BadInputError(f"--max-length {max_length} differs from the {earlier[-1]} tokens earlier audits of this "
                            f"workspace measured with; audit with --max-length {earlier[-1]} (figures at other "
                            f"lengths are not comparable)")
    return earlier[-1]


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


def _sequential(ws, aud, order, all_domains, value, log) -> list[list[float | None]]:
    """The sequential fine-tuning baseline's matrix, training its missing versions."""
    from routing.engine import Routing
    from training.trainer import TrainConfig, train_domain

    reg = ws.registry
    try:
        have = len(reg.search_versions(name=SEQUENTIAL, include_archived=True))
    except NotFoundError:
        have = 0
    R = [[None] * len(order) for _ in order]
    for i, d_i in enumerate(order):
        stage = all_domains.index(d_i)
        if have < stage + 1:  # train version stage+1 on domain stage, warm-started from the previous one
            for k in range(have, stage + 1):
                dk = all_domains[k]
                own = reg.search_versions(domain=dk)
                own = [v for v in own if v.name != SEQUENTIAL]
                cfg = own[-1].config if own else {}
                rows = reg.get_domain_rows(dk, "train")
                tmp = ws.path / "tmp" / f"seq-{k}.jsonl"
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                evtmp = tmp.with_suffix(".eval.jsonl")
                evtmp.write_text("".join(json.dumps(r) + "\n" for r in reg.get_domain_eval(dk)))
                if log:
                    log(f"  training {SEQUENTIAL}:{k + 1} on {dk} (warm start from :{k})" if k else
                        f"  training {SEQUENTIAL}:1 on {dk}")
                train_domain(reg, ws.config.base_model, BASELINE_DOMAIN, tmp, evtmp, TrainConfig(
                    method="lora", name=SEQUENTIAL, steps=cfg.get("steps") or 20, batch_size=cfg.get("batch_size", 4),
                    max_length=cfg.get("max_length", 256), lr=cfg.get("lr"), seed=0, progress=False, evaluate=False,
                    from_ref=f"{SEQUENTIAL}:{k}" if k else None))
            have = stage + 1
        for j, d_j in enumerate(order[:i + 2]):  # i + 1: the next domain, for FWT
            v = value("sequential", stage, d_j)
            if v is None:
                ref = aud.load(f"{SEQUENTIAL}:{stage + 1}")
                v = aud.loss(d_j, Routing.one(ref))
                aud.rows.append({"ref": f"{SEQUENTIAL}:{stage + 1}", "eval_domain": d_j, "name": "R.sequential.loss",
                                 "value": v, "stage": stage})
            R[i][j] = v
    return R


def _merged(ws, aud, order, all_domains, stage_of, base_R, method, log
            ) -> tuple[list[list[float | None]], dict[str, Any]]:
    """The merged baseline's matrix and, per stage, what was merged and what was left out."""
    from routing.engine import LORA_KINDS, Routing
    from training.merge import TIES_DENSITY, merge_weights

    reg = ws.registry
    # a figure is reused only for the exact version it was measured on
    done = {(m["ref"], m["stage"], m["eval_domain"]): m["value"] for m in reg.search_audit_metrics("R.merged.loss")}
    R: list[list[float | None]] = [[None] * len(order) for _ in order]
    stages, loaded_here = [], []
    for i, d_i in enumerate(order):
        stage = all_domains.index(d_i)
        info = stage_of.get(stage)
        if info is None:
            continue
        versions = [reg.get_version(r) for r in info.covers]
        loras = [v for v in versions if v.kind in LORA_KINDS]
        skipped = [v.ref for v in versions if v.kind not in LORA_KINDS]
        weights = merge_weights(method, len(loras)) if loras else []
        if len(loras) > 1:
            ref = _merged_version(ws, aud, loras, weights, method, log)
        else:  # merging one LoRA with weight 1 gives it back: use it as it is
            ref = loras[0].ref if loras else None
        entry = {"stage": stage, "domain": d_i, "merged": [v.ref for v in loras], "weights": weights,
                 "skipped_bottleneck": skipped, "ref": ref}
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
    skipped = entry["skipped_bottleneck"]
    tail = f"bottleneck adapters of {', '.join(skipped)} not mergeable, left out" if skipped else ""
    if not entry["merged"]:
        return head + "no LoRA adapter to merge, the row is the base model" + (f" ({tail})" if tail else "")
    if len(entry["merged"]) == 1:
        body = f"one LoRA, {entry['merged'][0]}, used as it is"
    else:
        w = entry["weights"]
        ws_ = f"weights 1/{len(w)} each" if method != "ties" else "weights 1.0 each"
        body = f"merged LoRA of {', '.join(entry['merged'])} ({method}, {ws_}) = {entry['ref']}"
    return head + body + (f"; {tail}" if tail else "")


def _integrity(ws, aud, order, stored, matrices, L, pos) -> list[str]:
    problems = []
    router = aud.stage_router(aud.reg.get_router(ws.router_kind))
    try:
        base_fp = ws.base_fingerprint
    except Exception as e:  # noqa: BLE001 - a base that cannot be read fails the audit, it does not crash it
        return problems + [f"base model unreadable: {e}"]
    for d in order:
        ref = router.refs.get(d)
        if ref is None:
            continue
        info = ws.registry.get_version(ref)
        if info.base_fingerprint != base_fp:
            problems.append(f"{ref} was trained on base {info.base_fingerprint[:23]}…, the workspace base is "
                            f"{base_fp[:23]}…")
        # the same version's loss on its own eval set, recorded by an earlier audit, must reproduce
        j = order.index(d)
        now = matrices["own"][L][j]
        for (name, stage, dom), m in stored.items():
            if name == "R.own.loss" and dom == d and m["ref"] == ref and now is not None \
                    and abs(m["value"] - now) > OUTPUT_TOLERANCE:
                problems.append(f"{ref}'s loss on its own eval set changed since audit {m['audit_id']}: "
                                f"{m['value']:.6f} -> {now:.6f}")
                break
    return problems


def write_report(result: AuditResult, out: Path) -> None:
    """report.md, audit.json and one heatmap PNG per system into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result.summary(), indent=2, default=str))
    # the object API, not pyplot: no global backend switch in the caller's process (a notebook)
    from matplotlib.figure import Figure

    systems = list(result.matrices)
    fig = Figure(figsize=(3.2 * len(systems) + 1, 3.4))
    axes = fig.subplots(1, len(systems), squeeze=False)
    n = len(result.domains)
    for ax, s in zip(axes[0], systems):
        R = [[float("nan") if v is None else v for v in row] for row in result.matrices[s]]
        im = ax.imshow(R, cmap="viridis_r")
        ax.set_title(s)
        ax.set_xticks(range(n), result.domains, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), [f"after {d}" for d in result.domains], fontsize=7)
        for i in range(n):
            for j in range(n):
                if not math.isnan(R[i][j]):
                    ax.text(j, i, f"{R[i][j]:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("mean token loss R[i][j]: after adding domain i (rows), on domain j (columns); lower is better",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=130)
    lines = [f"# plait forgetting audit #{result.audit_id}", "",
             f"**{'PASSED' if result.passed else 'FAILED'}** — domains in order: {', '.join(result.domains)}; "
             f"gate: forgetting <= {result.max_forgetting} nats (own, routed), integrity, control set.", ""]
    for r in result.reasons:
        lines.append(f"- {r}")
    lines += ["", "## Final stage: mean token loss per domain (lower is better)", "",
              "| domain | " + " | ".join(result.current) + " | routing accuracy |",
              "|---|" + "---|" * (len(result.current) + 1)]
    for d in result.domains:
        acc = result.routing_accuracy.get(d)
        lines.append(f"| {d} | " + " | ".join(f"{result.current[s][d]:.4f}" for s in result.current)
                     + f" | {'-' if acc is None else f'{acc:.1%}'} |")
    lines += ["", "## Continual-learning metrics (signed: positive forgetting = worse; positive BWT/FWT = better)", "",
              "| system | ACC (mean loss) | BWT | FWT | max forgetting |", "|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:+.4f}"  # noqa: E731
    for s, m in result.metrics.items():
        lines.append(f"| {s} | {m['acc']:.4f} | {fmt(m['bwt'])} | {fmt(m['fwt'])} | {m['max_forgetting']:+.4f} |")
    lines += ["", "Per-domain forgetting:", ""]
    for s, m in result.metrics.items():
        lines.append(f"- {s}: " + (", ".join(f"{d} {v:+.4f}" for d, v in m["forgetting"].items()) or "-"))
    merged = result.baselines.get("merged")
    if merged:
        lines += ["", f"Merged baseline (`--merge {merged['method']}`; peft add_weighted_adapter):", ""]
        lines += [f"- {st['note']}" for st in merged["stages"]]
    c = result.control
    lines += ["", f"Control set ({c['n']} general texts): base {c['base_loss']:.4f}, routed {c['routed_loss']:.4f} "
              f"(delta {c['delta']:+.4f}), {c['fallback_rate']:.0%} routed to the base.", "",
              "Integrity: " + ("every artifact passed its hash check; adapters match the base; outputs unchanged."
                               if not result.integrity else "; ".join(result.integrity)),
              "", "![heatmap](heatmap.png)", "",
              "Definitions (Avalanche): forgetting_j = R[j][j] - R[L][j] for accuracies, negated for losses; "
              "BWT = -mean forgetting; FWT = mean_j (R[j-1][j] - base_j), signed the same way.", ""]
    (out / "report.md").write_text("\n".join(lines))


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
    except Exception as e:  # noqa: BLE001 - MLflow mirrors the audit; the registry already holds it
        import warnings

        warnings.warn(f"could not log the audit to MLflow ({e})", stacklevel=2)
