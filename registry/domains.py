"""Domains, in the order they were added, and their frozen `eval` / `validation` / `train` rows."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import update
from sqlmodel import select

from registry.context import RegistryContext, _check_split, _with_write_retries
from registry.errors import BadInputError, ConflictError, NotFoundError
from registry.models import Adapter, Domain
from registry.names import validate_name


class Domains(RegistryContext):
    """The `Registry` part for domains and their frozen row sets."""

    def create_domain(self, name: str, description: str = "") -> str:
        """Add a domain (or return the existing one); domains keep the order they were added in."""
        validate_name(name, "domain name")

        def tx():
            with self._session(write=True) as s:
                return self._domain_row(s, name, create=True, description=description).name

        return _with_write_retries(tx)

    def set_domain_rows(self, domain: str, split: str, rows: list[dict[str, Any]]) -> str:
        """Freeze a domain's `eval`, `validation` or `train` rows as a JSONL artifact; set once, then kept.

        Returns:
            the rows' sha256. Setting them again with other rows is refused: audits compare
            figures over time, which only means something on the same rows.
        """
        validate_name(domain, "domain name")
        _check_split(split)
        if not rows:
            raise BadInputError(f"the {split} set of domain {domain!r} is empty; give at least one row")
        payload = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()
        with self._session() as s:  # decide before writing any byte
            row = s.exec(select(Domain).where(Domain.name == domain)).first()
            if row is not None and getattr(row, f"{split}_sha256"):
                sha, loc = getattr(row, f"{split}_sha256"), getattr(row, f"{split}_location")
                current = self.store.verify(loc, sha, what=f"{split} set of domain {domain!r}")
                if (current / f"{split}.jsonl").read_bytes() == payload:
                    return sha
                raise ConflictError(f"domain {domain!r} already has a frozen {split} set (sha256 {sha[:12]}); "
                                    f"audits keep using it")
        stored = self.store.put({f"{split}.jsonl": payload})

        def tx():
            with self._session(write=True) as s:
                row = self._domain_row(s, domain, create=True)
                sha_col = getattr(Domain, f"{split}_sha256")
                # freeze only if still unfrozen: another writer may have frozen it since the check
                # above, and whoever it told "stored" keeps that promise
                frozen = s.execute(update(Domain).where(Domain.id == row.id, sha_col.is_(None)).values(
                    {f"{split}_sha256": stored.sha256, f"{split}_location": stored.location,
                     f"{split}_rows": len(rows)})).rowcount
                if frozen == 0:
                    current = s.exec(select(sha_col).where(Domain.id == row.id)).one()
                    if current != stored.sha256:
                        raise ConflictError(f"domain {domain!r} already has a frozen {split} set (sha256 "
                                            f"{current[:12]}); audits keep using it")
                return stored.sha256

        return _with_write_retries(tx)

    def get_domain_rows(self, domain: str, split: str = "eval") -> list[dict[str, Any]]:
        """A domain's frozen `eval`, `validation` or `train` rows, after the file's hash check.

        Raises:
            NotFoundError: the domain has no such set (a domain made before validation splits
                existed gets one when it is trained again).
        """
        _check_split(split)
        with self._session() as s:
            row = self._domain_row(s, domain, create=False)
            sha, loc = getattr(row, f"{split}_sha256"), getattr(row, f"{split}_location")
            if not sha:
                raise NotFoundError(f"domain {domain!r} has no {split} set yet; train it with plait train")
        path = self.store.verify(loc, sha, what=f"{split} set of domain {domain!r}")
        return [json.loads(line) for line in (path / f"{split}.jsonl").read_text().splitlines() if line.strip()]

    def set_domain_eval(self, domain: str, rows: list[dict[str, Any]]) -> str:
        return self.set_domain_rows(domain, "eval", rows)

    def get_domain_eval(self, domain: str) -> list[dict[str, Any]]:
        return self.get_domain_rows(domain, "eval")

    def get_many_domain_rows(self, domains: list[str], split: str = "eval") -> dict[str, list[dict[str, Any]]]:
        """`get_domain_rows` of several domains, with one query for all of them (not one per domain).

        Returns:
            {domain: rows} for the domains that have the split (the others are left out).
        """
        _check_split(split)
        wanted = set(domains)
        with self._session() as s:
            found = [(name, sha, loc) for name, sha, loc in s.exec(  # columns, not a Domain object a row
                select(Domain.name, getattr(Domain, f"{split}_sha256"), getattr(Domain, f"{split}_location"))).all()
                if name in wanted and sha]
        if len(found) > 8:
            self.store.preload_digests()
        out = {}
        for name, sha, loc in found:
            path = self.store.verify(loc, sha, what=f"{split} set of domain {name!r}")
            out[name] = [json.loads(line) for line in (path / f"{split}.jsonl").read_text().splitlines()
                         if line.strip()]
        return {d: out[d] for d in domains if d in out}

    def search_domains(self) -> list[dict[str, Any]]:
        """Every domain in the order it was added, with its adapters (two queries, whatever the count)."""
        with self._session() as s:
            out = []
            adapters: dict[int, list[str]] = {}
            for domain_id, name in s.exec(select(Adapter.domain_id, Adapter.name).order_by(Adapter.name)).all():
                adapters.setdefault(domain_id, []).append(name)
            for d in s.exec(select(Domain).order_by(Domain.position)).all():
                names = adapters.get(d.id, [])
                out.append({"name": d.name, "position": d.position, "description": d.description,
                            "adapters": list(names), "eval_sha256": d.eval_sha256, "eval_rows": d.eval_rows,
                            "validation_rows": d.validation_rows,
                            "created_at": d.created_at.isoformat()})
            return out
