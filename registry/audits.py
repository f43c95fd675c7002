"""Audit records: what an audit judged, whether it passed, and where its report is."""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import select

from registry.context import RegistryContext, _with_write_retries
from registry.entities import AuditInfo
from registry.models import Audit


class Audits(RegistryContext):
    """The `Registry` part for audit records."""

    def create_audit(self, *, domains: list[str], passed: bool, summary: dict[str, Any],
                     report_location: str | None = None, mlflow_run_id: str | None = None,
                     covers: list[str] | None = None) -> AuditInfo:
        """Record an audit.

        Args:
            covers: exact refs of the versions the audit judged, kept as the summary's
                `covers`; the production gate reads it together with the audit's figures.
        """
        if covers is not None:
            summary = {**summary, "covers": list(covers)}

        def tx():
            with self._session(write=True) as s:
                row = Audit(domains_json=json.dumps(domains), passed=passed, summary_json=json.dumps(summary),
                            report_location=report_location, mlflow_run_id=mlflow_run_id)
                s.add(row)
                s.flush()
                return self._audit_info(row)

        return _with_write_retries(tx)

    @staticmethod
    def _audit_info(row: Audit) -> AuditInfo:
        return AuditInfo(row.id, row.created_at, json.loads(row.domains_json), row.passed,
                         json.loads(row.summary_json), row.report_location, row.mlflow_run_id)

    def get_latest_audit(self) -> AuditInfo | None:
        with self._session() as s:
            row = s.exec(select(Audit).order_by(Audit.id.desc()).limit(1)).first()
            return self._audit_info(row) if row else None

    def search_audits(self) -> list[AuditInfo]:
        with self._session() as s:
            return [self._audit_info(r) for r in s.exec(select(Audit).order_by(Audit.id)).all()]
