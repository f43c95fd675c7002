"""Adapter versions: registering, resolving and searching them, their lineage, their metrics,
reading their verified artifact, and archiving them.

Writes store the artifact first (atomic, content-addressed) and then commit the version row,
so a version is never visible before its files are complete; a crash between the two leaves
an unreferenced artifact that `gc` removes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert
from sqlmodel import Session, select

from registry.context import RELATIONS, RegistryContext, _validate_filters, _with_write_retries
from registry.entities import AdapterSummary, VersionInfo
from registry.errors import BadInputError, ConflictError, RefusedError
from registry.models import Adapter, AdapterVersion, Alias, Domain, Lineage, Metric, utcnow
from registry.names import validate_name
from registry.store import _fault


class Versions(RegistryContext):
    """The `Registry` part for adapter versions, lineage and metrics."""

    def register_version(
        self,
        name: str,
        *,
        domain: str,
        kind: str,
        files: Path | dict[str, Path | bytes],
        base_fingerprint: str,
        config: dict[str, Any] | None = None,
        parents: Sequence[tuple[str, str] | tuple[str, str, float]] = (),
        base_relation: str = "trained-from-base",
        data_fingerprint: str | None = None,
        mlflow_run_id: str | None = None,
        metrics: dict[str, float] | None = None,
        description: str = "",
        mirror: bool = True,
    ) -> VersionInfo:
        """Store an artifact and register it as the next version of adapter `name`.

        Args:
            name: adapter name; created on first registration with `domain` and `kind`.
            files: the artifact: a folder, or relative file name -> path or bytes.
            base_fingerprint: fingerprint of the base model the adapter was trained on.
            parents: (ref, relation[, weight]) edges to earlier versions (warm-start, merge).
                Without parents the version gets one edge to its base (`base_relation`).
            metrics: name -> value, recorded with eval_domain = the adapter's domain.
            mirror: mirror the version into MLflow now, unless the registry defers mirroring
                (it is queued either way; the trainer mirrors it once its run is logged).

        Returns:
            the new version. Its number is unique per adapter, even under concurrent writers.
        """
        self._check_new_version(name, domain, kind, base_fingerprint, parents, base_relation)
        stored = self.store.put(files) if isinstance(files, dict) else self.store.put_dir(Path(files))
        _fault("registry.before_commit")
        config_json = json.dumps(config or {}, sort_keys=True)

        def tx():
            with self._session(write=True) as s:
                row = AdapterVersion(
                    version=0, base_fingerprint=base_fingerprint, config_json=config_json, sha256=stored.sha256,
                    size_bytes=stored.size_bytes, location=stored.location, data_fingerprint=data_fingerprint,
                    mlflow_run_id=mlflow_run_id, description=description)
                return self._insert_version(s, name, domain, kind, row, parents, base_relation, metrics)

        info = _with_write_retries(tx)
        _fault("registry.after_commit")
        if mirror:
            self._mirror_queued()
        return info

    def check_line(self, name: str, kind: str, domain: str) -> None:
        """Refuse a version of adapter `name` of another kind or domain than the adapter's, before
        any work is done for it (`register_version` checks again when it registers).

        Raises:
            ConflictError: `name` is an adapter of another kind or domain.
        """
        with self._session() as s:
            existing = s.exec(select(Adapter).where(Adapter.name == name)).first()
            if existing is not None:
                self._check_line(s, existing, kind, domain)

    def _check_new_version(self, name: str, domain: str, kind: str, base_fingerprint: str,
                           parents: Sequence[tuple], base_relation: str) -> None:
        """`register_version`'s checks, all made before any byte of the artifact is written."""
        validate_name(name, "adapter name")
        validate_name(domain, "domain name")
        validate_name(kind, "adapter kind")
        for rel in [base_relation, *(p[1] for p in parents)]:
            if rel not in RELATIONS:
                raise BadInputError(f"unknown lineage relation {rel!r}: use one of {', '.join(RELATIONS)}")
        if not base_fingerprint:
            raise BadInputError("a version needs the fingerprint of its base model")
        self.check_line(name, kind, domain)
        with self._session() as s:
            for ref, *_ in parents:
                self._resolve_row(s, ref)

    def _insert_version(self, s: Session, name: str, domain: str, kind: str, row: AdapterVersion,
                        parents: Sequence[tuple], base_relation: str,
                        metrics: dict[str, float] | None) -> VersionInfo:
        """Add `row` as the adapter's next version, with its lineage and metrics, in the caller's write transaction."""
        # the checks again, under the adapter's row lock: a writer that created the
        # adapter since (as another kind or domain) must not gain this version; two
        # writers creating it at once meet the unique name and the loser retries here
        adapter = s.exec(select(Adapter).where(Adapter.name == name).with_for_update()).first()
        if adapter is None:
            adapter = Adapter(name=name, domain_id=self._domain_row(s, domain, create=True).id, kind=kind)
            s.add(adapter)
            s.flush()
        else:
            self._check_line(s, adapter, kind, domain)
        parent_ids = [(self._resolve_row(s, ref)[1].id, rel, w[0] if w else None) for ref, rel, *w in parents]
        top = s.exec(select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id)).one()
        row.adapter_id, row.version = adapter.id, (top or 0) + 1
        s.add(row)
        s.flush()
        if parent_ids:
            for pid, rel, w in parent_ids:
                s.add(Lineage(child_id=row.id, parent_id=pid, relation=rel, weight=w))
        else:
            s.add(Lineage(child_id=row.id, parent_base=row.base_fingerprint, relation=base_relation))
        for mname, value in (metrics or {}).items():
            s.add(Metric(version_id=row.id, eval_domain=domain, name=mname, value=float(value)))
        self._queue_mirror(s, row.id)
        s.flush()
        return self._info(s, adapter, row)

    def get_version(self, ref: str) -> VersionInfo:
        """Resolve `NAME`, `NAME:VERSION` or `NAME@ALIAS` to a version."""
        with self._session() as s:
            return self._info(s, *self._resolve_row(s, ref))

    def search_versions(self, name: str | None = None, domain: str | None = None, kind: str | None = None,
                        base: str | None = None, metric: str | None = None, min_value: float | None = None,
                        max_value: float | None = None, include_archived: bool = False) -> list[VersionInfo]:
        """Versions matching every given filter, by adapter name then version.

        Args:
            base: base fingerprint (a prefix is enough).
            metric: keep versions that have this metric (within min_value/max_value if given).
        """
        _validate_filters(name=name, domain=domain, kind=kind)
        with self._session() as s:
            q = select(Adapter, AdapterVersion).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
            if name:
                q = q.where(Adapter.name == name)
            if domain:
                q = q.join(Domain, Domain.id == Adapter.domain_id).where(Domain.name == domain)
            if kind:
                q = q.where(Adapter.kind == kind)
            if base:
                q = q.where(AdapterVersion.base_fingerprint.startswith(base))
            if not include_archived:
                q = q.where(AdapterVersion.status == "ready")
            if metric:
                m = select(Metric.version_id).where(Metric.name == metric)
                if min_value is not None:
                    m = m.where(Metric.value >= min_value)
                if max_value is not None:
                    m = m.where(Metric.value <= max_value)
                q = q.where(AdapterVersion.id.in_(m))
            rows = s.exec(q.order_by(Adapter.name, AdapterVersion.version)).all()
            return self._infos(s, rows)

    def _infos(self, s, rows) -> list[VersionInfo]:
        """`_info` of many (adapter, version) rows with four queries in all, not three per row
        (issue 16: an audit reads every domain's versions)."""
        if len(rows) <= 1:
            return [self._info(s, a, v) for a, v in rows]
        ids = [v.id for _, v in rows]
        domains = dict(s.exec(select(Domain.id, Domain.name)).all())
        names = {vid: f"{name}:{version}" for vid, name, version in s.exec(  # columns: no ORM object a version
            select(AdapterVersion.id, Adapter.name, AdapterVersion.version)
            .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)).all()}
        parents: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        for edge in s.exec(select(Lineage).where(Lineage.child_id.in_(ids)).order_by(Lineage.id)).all():
            parents[edge.child_id].append(
                {"ref": names[edge.parent_id], "relation": edge.relation, "weight": edge.weight}
                if edge.parent_id is not None else
                {"base": edge.parent_base, "relation": edge.relation, "weight": edge.weight})
        aliases: dict[int, list[str]] = {i: [] for i in ids}
        for version_id, alias in s.exec(select(Alias.version_id, Alias.name).where(Alias.version_id.in_(ids))).all():
            aliases[version_id].append(alias)
        return [VersionInfo(
            id=v.id, name=a.name, domain=domains[a.domain_id], kind=a.kind, version=v.version,
            base_fingerprint=v.base_fingerprint, config=json.loads(v.config_json), sha256=v.sha256,
            size_bytes=v.size_bytes, location=v.location, data_fingerprint=v.data_fingerprint,
            mlflow_run_id=v.mlflow_run_id, status=v.status, description=v.description,
            created_at=v.created_at, parents=parents[v.id], aliases=sorted(aliases[v.id])) for a, v in rows]

    def largest_version_bytes(self) -> int:
        """The artifact size of the largest ready version (0 when there is none)."""
        with self._session() as s:
            return s.exec(select(func.max(AdapterVersion.size_bytes)).where(AdapterVersion.status == "ready")).one() or 0

    def search_adapters(self, domain: str | None = None, kind: str | None = None) -> list[AdapterSummary]:
        """One summary per adapter (version count, newest version, aliases), by name."""
        _validate_filters(domain=domain, kind=kind)
        with self._session() as s:
            # columns, not Adapter objects: thousands of adapters at scale
            q = select(Adapter.id, Adapter.name, Adapter.kind, Adapter.created_at, Domain.name) \
                .join(Domain, Domain.id == Adapter.domain_id)
            if domain:
                q = q.where(Domain.name == domain)
            if kind:
                q = q.where(Adapter.kind == kind)
            rows = s.exec(q.order_by(Adapter.name)).all()
            ids = [aid for aid, *_ in rows]
            counts = {aid: (n, top) for aid, n, top in s.exec(
                select(AdapterVersion.adapter_id, func.count(), func.max(AdapterVersion.version))
                .where(AdapterVersion.status == "ready").group_by(AdapterVersion.adapter_id)).all()}
            aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
            for aid, alias, version in s.exec(select(Alias.adapter_id, Alias.name, AdapterVersion.version)
                                              .join(AdapterVersion, AdapterVersion.id == Alias.version_id)).all():
                aliases.setdefault(aid, {})[alias] = version
            return [AdapterSummary(name, dname, akind, *counts.get(aid, (0, None)), aliases.get(aid, {}), created)
                    for aid, name, akind, created, dname in rows]

    # ----------------------------------------------------------------- lineage
    def get_lineage(self, ref: str, direction: str = "both") -> dict[str, Any]:
        """The lineage graph around a version.

        Args:
            direction: "up" (ancestors), "down" (descendants) or "both".

        Returns:
            {"root": ref, "nodes": [...], "edges": [{"child", "parent", "relation", "weight"}]};
            a base model appears as the node `base:<fingerprint>`.
        """
        if direction not in ("up", "down", "both"):
            raise BadInputError(f"unknown lineage direction {direction!r}: use up, down or both")
        with self._session() as s:
            _, start = self._resolve_row(s, ref)
            names: dict[int, str] = {}

            def label(vid: int) -> str:
                if vid not in names:
                    v = s.get(AdapterVersion, vid)
                    names[vid] = f"{s.get(Adapter, v.adapter_id).name}:{v.version}"
                return names[vid]

            edges, seen, frontier = [], {start.id}, [start.id]
            nodes = {label(start.id)}
            while frontier:
                vid = frontier.pop()
                found = []
                if direction in ("up", "both"):
                    found += s.exec(select(Lineage).where(Lineage.child_id == vid)).all()
                if direction in ("down", "both"):
                    found += s.exec(select(Lineage).where(Lineage.parent_id == vid)).all()
                for e in found:
                    parent = label(e.parent_id) if e.parent_id is not None else f"base:{e.parent_base}"
                    edge = {"child": label(e.child_id), "parent": parent, "relation": e.relation, "weight": e.weight}
                    if edge not in edges:
                        edges.append(edge)
                    nodes.update([edge["child"], parent])
                    for nxt in (e.parent_id, e.child_id):
                        if nxt is not None and nxt not in seen:
                            # when walking one direction only, do not turn around at a node
                            if (direction == "up" and nxt == e.child_id) or (direction == "down" and nxt == e.parent_id):
                                continue
                            seen.add(nxt)
                            frontier.append(nxt)
            return {"root": label(start.id), "nodes": sorted(nodes), "edges": edges}

    # ----------------------------------------------------------------- metrics
    def log_metrics(self, ref: str, metrics: dict[str, float], eval_domain: str | None = None,
                    audit_id: int | None = None) -> None:
        """Record metrics of a version, measured on `eval_domain` (default: its own domain)."""
        if eval_domain is not None:
            validate_name(eval_domain, "domain name")
        for k, v in metrics.items():
            if not isinstance(k, str) or not k or len(k) > 128:
                raise BadInputError(f"invalid metric name {k!r}: use 1-128 characters")
            if not isinstance(v, (int, float)):
                raise BadInputError(f"metric {k!r} has non-numeric value {v!r}")

        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                dom = eval_domain or s.get(Domain, adapter.domain_id).name
                for k, v in metrics.items():
                    s.add(Metric(version_id=row.id, eval_domain=dom, name=k, value=float(v), audit_id=audit_id))

        _with_write_retries(tx)

    def log_audit_metrics(self, audit_id: int, rows: list[dict[str, Any]]) -> None:
        """Record an audit's figures in one transaction.

        Args:
            rows: {"ref", "eval_domain", "name", "value", "stage"} each.
        """
        def tx():
            with self._session(write=True) as s:
                # exact refs (NAME:V) resolved in one query; anything else (an alias) one by one
                ids: dict[str, int] = {f"{name}:{v}": i for name, v, i in s.exec(
                    select(Adapter.name, AdapterVersion.version, AdapterVersion.id)
                    .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)).all()} if len(rows) > 8 else {}
                for r in rows:
                    if r["ref"] not in ids:
                        ids[r["ref"]] = self._resolve_row(s, r["ref"])[1].id
                if rows:  # one executemany, not one ORM object a figure (thousands per audit at scale)
                    now = utcnow()
                    s.connection().execute(insert(Metric.__table__), [
                        {"version_id": ids[r["ref"]], "eval_domain": r["eval_domain"], "name": r["name"],
                         "value": float(r["value"]), "audit_id": audit_id, "stage": r.get("stage"), "created_at": now}
                        for r in rows])

        _with_write_retries(tx)

    def search_audit_metrics(self, name_prefix: str = "") -> list[dict[str, Any]]:
        """Every audit figure whose name starts with `name_prefix`, oldest first."""
        with self._session() as s:
            # columns, not Metric objects: an audit at scale reads tens of thousands of figures
            q = select(Metric.name, Metric.value, Metric.eval_domain, Metric.audit_id, Metric.stage,
                       AdapterVersion.version, Adapter.name).join(
                AdapterVersion, AdapterVersion.id == Metric.version_id).join(
                Adapter, Adapter.id == AdapterVersion.adapter_id).where(Metric.audit_id.is_not(None))
            if name_prefix:
                q = q.where(Metric.name.startswith(name_prefix))
            return [{"ref": f"{a}:{v}", "name": name, "value": value, "eval_domain": dom, "audit_id": aid, "stage": st}
                    for name, value, dom, aid, st, v, a in s.exec(q.order_by(Metric.id)).all()]

    def get_metrics(self, ref: str, audit_id: int | None = None) -> list[dict[str, Any]]:
        """Every metric of a version, oldest first."""
        with self._session() as s:
            _, row = self._resolve_row(s, ref)
            q = select(Metric).where(Metric.version_id == row.id)
            if audit_id is not None:
                q = q.where(Metric.audit_id == audit_id)
            return [{"name": m.name, "value": m.value, "eval_domain": m.eval_domain, "audit_id": m.audit_id,
                     "stage": m.stage, "created_at": m.created_at.isoformat()}
                    for m in s.exec(q.order_by(Metric.id)).all()]

    # ----------------------------------------------------------------- artifacts and lifecycle
    def artifact_path(self, ref: str | VersionInfo, *, allow_archived: bool = False) -> tuple[VersionInfo, Path]:
        """The version and its artifact folder, after the folder's sha256 matched the registry.

        This is the only way plait reads adapter weights from the store. The version is read
        again (a `VersionInfo` may be stale). Loaders check the weights' format with
        `registry.hashing.check_safetensors_folder`.

        Args:
            allow_archived: also return an archived version (the audit re-reading the
                versions of past stages, an export); serving and training refuse them.

        Raises:
            ConflictError: the version is archived and `allow_archived` is False.
            IntegrityError: the files do not match the recorded hash.
        """
        info = self.get_version(ref.ref if isinstance(ref, VersionInfo) else ref)
        if info.status != "ready" and not allow_archived:
            raise ConflictError(f"adapter version {info.ref} is {info.status}: it is no longer served or loaded and gc "
                                f"may delete its files; use a ready version of {info.name}")
        path = self.store.verify(info.location, info.sha256, what=f"adapter version {info.ref}")
        return info, path

    def archive(self, ref: str, *, force: bool = False) -> VersionInfo:
        """Mark a version archived: it is no longer resolved by NAME and `gc` may delete its files.

        Args:
            force: archive a version a live router still covers (gc keeps its files while
                one does; serving it by NAME:V is refused from now on).

        Raises:
            ConflictError: an alias points at the version (move the alias first).
            RefusedError: a live router covers the version and `force` is False.
        """
        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                row = self._lock_version(s, row.id)  # queues with alias moves of this version
                exact = f"{adapter.name}:{row.version}"
                held = s.exec(select(Alias.name).where(Alias.version_id == row.id)).all()
                if held:
                    raise ConflictError(f"{exact} is the target of alias(es) {', '.join(held)}; "
                                        f"move them first (plait registry alias)")
                routers = [f"{r.name}:{r.version}" for r, covers, _ in self._live_routers(s) if exact in covers]
                if routers and not force:
                    raise RefusedError(f"{exact} is covered by live router version(s) {', '.join(routers)}, which can "
                                       f"still route requests or audits to it; archive it after a newer router "
                                       f"replaces it")
                row.status = "archived"
                s.add(row)
                s.flush()
                return self._info(s, adapter, row)

        return _with_write_retries(tx)
