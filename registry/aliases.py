"""Aliases (`NAME@ALIAS`), their history, and the audit gate in front of `production`."""

from __future__ import annotations

import json

from sqlalchemy import func
from sqlmodel import Session, select

from registry.context import PRODUCTION, RegistryContext, _with_write_retries
from registry.entities import VersionInfo
from registry.errors import ConflictError, NotFoundError, RefusedError
from registry.models import Adapter, Alias, AliasEvent, Audit, Metric, utcnow
from registry.names import validate_name


class Aliases(RegistryContext):
    """The `Registry` part for aliases and the production gate."""

    def set_alias(self, ref: str, alias: str, *, force: bool = False) -> VersionInfo:
        """Point `alias` of the referenced adapter at the referenced version (create or move).

        Args:
            force: promote to `production` even where the audit gate refuses it.

        Raises:
            ConflictError: the version is archived.
            RefusedError: `alias` is `production` and the newest audit that covered the
                version failed, or the registry has audits and none covered the version.
        """
        validate_name(alias, "alias")

        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                return self._point_alias(s, adapter, row.id, alias, force)

        info = _with_write_retries(tx)
        self._mirror_queued()
        return info

    def rollback_alias(self, name: str, alias: str, *, force: bool = False) -> VersionInfo:
        """Move `alias` back to the version it pointed at before its latest move.

        The history is read and the alias moved in one write transaction (under the alias's
        row lock on PostgreSQL), so a concurrent move cannot slip in between; the target must
        be ready and, for `production`, pass the audit gate as in `set_alias`.
        """
        validate_name(name, "adapter name")
        validate_name(alias, "alias")

        def tx():
            with self._session(write=True) as s:
                adapter = self._adapter_row(s, name)
                s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias).with_for_update()).first()
                last = s.exec(select(AliasEvent).where(AliasEvent.adapter_id == adapter.id, AliasEvent.alias == alias)
                              .order_by(AliasEvent.id.desc()).limit(1)).first()
                if last is None or last.previous_version_id is None:
                    raise NotFoundError(f"alias {name}@{alias} has no earlier version to roll back to")
                return self._point_alias(s, adapter, last.previous_version_id, alias, force)

        info = _with_write_retries(tx)
        self._mirror_queued()
        return info

    def _point_alias(self, s: Session, adapter: Adapter, version_id: int, alias: str, force: bool) -> VersionInfo:
        """Move `alias` to a version inside the caller's write transaction, checks under row locks.

        Locks are taken alias row first, then version row, in every path (rollback too), so
        two moves never wait on each other crosswise.
        """
        cur = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias).with_for_update()
                     .execution_options(populate_existing=True)).first()
        row = self._lock_version(s, version_id)
        if row.status != "ready":
            raise ConflictError(f"{adapter.name}:{row.version} is {row.status}; only ready versions get aliases")
        if alias == PRODUCTION and not force:
            self._audit_gate(s, f"{adapter.name}:{row.version}", row.id)
        previous = cur.version_id if cur else None
        if cur is None:
            s.add(Alias(adapter_id=adapter.id, name=alias, version_id=row.id))
        else:
            cur.version_id, cur.updated_at = row.id, utcnow()
            s.add(cur)
        s.add(AliasEvent(adapter_id=adapter.id, alias=alias, version_id=row.id, previous_version_id=previous))
        self._queue_mirror(s, row.id, alias)
        s.flush()
        return self._info(s, adapter, row)

    @staticmethod
    def _audit_gate(s: Session, ref: str, version_id: int) -> None:
        """Refuse `production` for a version whose newest covering audit failed or that no audit covered.

        An audit covered a version when it recorded a figure for it (its Metric rows) or lists
        it in its summary's `covers` (an audit stopped by an integrity failure measures nothing
        but still judged the versions its router served). A registry with no audit at all has
        no gate: adapters imported or trained without audits are promoted as before.
        """
        if s.exec(select(func.count()).select_from(Audit)).one() == 0:
            return
        ids = set(s.exec(select(Metric.audit_id).where(Metric.version_id == version_id,
                                                       Metric.audit_id.is_not(None)).distinct()).all())
        for aid, summary in s.exec(select(Audit.id, Audit.summary_json).where(
                Audit.summary_json.contains(f'"{ref}"', autoescape=True))).all():
            if ref in (json.loads(summary).get("covers") or []):
                ids.add(aid)
        if not ids:
            raise RefusedError(f"no audit covered {ref}: production needs a passed audit that measured this version "
                               f"(audits measure the versions the router serves; route it and run an audit)")
        newest = s.get(Audit, max(ids))
        if not newest.passed:
            reasons = json.loads(newest.summary_json).get("reasons") or []
            why = f" ({' '.join(str(reasons[0]).split())[:200]})" if reasons else ""
            raise RefusedError(f"the latest audit that covered {ref} (#{newest.id}) failed{why}; production needs "
                               f"a passed audit of this version")

    def delete_alias(self, name: str, alias: str) -> None:
        def tx():
            with self._session(write=True) as s:
                adapter = self._adapter_row(s, name)
                cur = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias)).first()
                if cur is None:
                    raise NotFoundError(f"adapter {name!r} has no alias {alias!r}")
                s.add(AliasEvent(adapter_id=adapter.id, alias=alias, version_id=None, previous_version_id=cur.version_id))
                s.delete(cur)

        _with_write_retries(tx)
