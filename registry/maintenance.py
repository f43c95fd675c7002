"""Keeping the registry whole: PEFT import and export, verifying every artifact and live
router's coverage, garbage-collecting unreferenced artifacts, and a dump of every table.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from registry.context import SPLITS, RegistryContext
from registry.entities import VersionInfo
from registry.errors import BadInputError, IntegrityError, NotFoundError
from registry.hashing import read_safetensors_header
from registry.models import Adapter, AdapterVersion, Domain, RouterVersion
from registry.names import validate_name


class Maintenance(RegistryContext):
    """The `Registry` part for import/export, verify and gc."""

    def import_peft(self, src: Path, *, name: str, domain: str, base_fingerprint: str,
                    kind: str = "lora", description: str = "") -> VersionInfo:
        """Register a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

        Args:
            kind: the adapter kind to record. The registry reads no training code, so the caller
                detects it (`training.methods.detect_folder`: a `use_dora` config is `dora`).

        Raises:
            NotFoundError: the folder does not exist.
            BadInputError: not a PEFT LoRA folder, or its weights are pickle files.
        """
        validate_name(name, "adapter name")
        validate_name(domain, "domain name")
        src = Path(src)
        if not src.is_dir():
            raise NotFoundError(f"{src} is not a directory; give the folder holding adapter_config.json")
        cfg_path, weights = src / "adapter_config.json", src / "adapter_model.safetensors"
        if not cfg_path.is_file():
            raise BadInputError(f"{src} is not a PEFT adapter directory: it has no adapter_config.json")
        try:
            config = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInputError(f"{cfg_path} is not valid JSON ({e}); re-save the adapter with peft") from None
        if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
            raise BadInputError(f"{cfg_path} has peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                                f"only LoRA adapters can be imported")
        if not weights.is_file():
            if (src / "adapter_model.bin").exists():
                raise BadInputError(f"{src} holds pickle weights (adapter_model.bin), which plait never loads; "
                                    f"re-save with safe_serialization=True")
            raise BadInputError(f"{src} is not a PEFT adapter directory: it has no adapter_model.safetensors")
        try:
            header, _ = read_safetensors_header(weights)
        except IntegrityError as e:
            raise BadInputError(str(e)) from None
        if not set(header) - {"__metadata__"}:
            raise BadInputError(f"{weights} holds no tensors; re-save the adapter with peft")
        return self.register_version(
            name, domain=domain, kind=kind, files={"adapter_config.json": cfg_path, "adapter_model.safetensors": weights},
            base_fingerprint=base_fingerprint, config=config, base_relation="import",
            description=description or f"imported from {src.resolve()}")

    def export_version(self, ref: str, out_dir: Path) -> Path:
        """Copy a verified version's files to `out_dir` (PEFT layout), writable."""
        info, path = self.artifact_path(ref, allow_archived=True)  # an export is how an archived one is kept
        out_dir = Path(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise BadInputError(f"{out_dir} exists and is not an empty directory; choose a new folder")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"cannot create the export folder {out_dir} ({e.strerror}); choose a writable path") from None
        for f in sorted(path.rglob("*")):
            if f.is_file():
                dest = out_dir / f.relative_to(path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
        return out_dir

    def verify(self) -> list[dict[str, Any]]:
        """Check every ready version's and router's artifact against its recorded hash, and
        every live router's coverage.

        A live router (see `live_routers`) covers exact refs; each must exist with a present,
        hash-matching artifact, and, for the newest router of each name (the one served),
        be ready: an archived version there fails every request routed to it.

        Returns:
            one row per artifact: {"ref", "sha256", "ok", "error"}; one row per live router
            with ref `coverage of router NAME:V`.
        """
        with self._session() as s:
            # columns, not ORM objects: thousands of rows (issue 16)
            rows = [(f"{name}:{version}", location, sha) for name, version, location, sha in s.exec(
                select(Adapter.name, AdapterVersion.version, AdapterVersion.location, AdapterVersion.sha256)
                .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
                .where(AdapterVersion.status == "ready").order_by(Adapter.name, AdapterVersion.version)).all()]
            rows += [(f"router {name}:{version}", location, sha) for name, version, location, sha in s.exec(
                select(RouterVersion.name, RouterVersion.version, RouterVersion.location, RouterVersion.sha256)
                .where(RouterVersion.status == "ready").order_by(RouterVersion.id)).all()]
            cols = [getattr(Domain, f"{split}_{what}") for split in SPLITS for what in ("location", "sha256")]
            for name, *places in s.exec(select(Domain.name, *cols).order_by(Domain.position)).all():
                rows += [(f"{split} set {name}", places[2 * i], places[2 * i + 1])
                         for i, split in enumerate(SPLITS) if places[2 * i]]
            coverage = self._coverage(s)
        self.store.preload_digests()
        checked: dict[tuple[str, str], str | None] = {}

        def check(location: str, sha: str, what: str) -> str | None:
            if (location, sha) not in checked:
                try:
                    self.store.verify(location, sha, what=what)
                    checked[(location, sha)] = None
                except IntegrityError as e:
                    checked[(location, sha)] = str(e)
            return checked[(location, sha)]

        report = [{"ref": ref, "sha256": sha, "ok": (err := check(loc, sha, ref)) is None, "error": err}
                  for ref, loc, sha in rows]
        for router, targets in coverage:
            errors = [problem or check(loc, sha, ref) for ref, loc, sha, problem in targets]
            errors = [e for e in errors if e]
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            report.append({"ref": f"coverage of router {router.name}:{router.version}", "sha256": router.sha256,
                           "ok": not errors, "error": "; ".join(errors[:3]) + more if errors else None})
        return report

    def _coverage(self, s: Session) -> list[tuple[RouterVersion, list[tuple[str, str | None, str | None, str | None]]]]:
        """Per live router: (ref, location, sha256, problem found without hashing) of every covered ref."""
        versions = {f"{name}:{v.version}": v for name, v in s.exec(
            select(Adapter.name, AdapterVersion).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)).all()}
        out = []
        for router, covers, served in self._live_routers(s):
            targets = []
            for ref in covers:
                v = versions.get(ref)
                problem = None
                if v is None:
                    problem = f"router {router.name}:{router.version} covers {ref}, which does not exist"
                elif served and v.status != "ready":
                    problem = (f"router {router.name}:{router.version} serves {ref}, which is {v.status}: requests "
                               f"routed to it fail")
                targets.append((ref, v.location if v else None, v.sha256 if v else None, problem))
            out.append((router, targets))
        return out

    def gc(self, grace_s: float = 600.0) -> dict[str, int]:
        """Delete artifacts nothing live references, and stale temp folders.

        Kept: every ready version, router and frozen domain split, and every version a live
        router covers (archived with force or not). Aliases point at ready versions only.

        Args:
            grace_s: keep anything younger than this, so a writer between storing its
                artifact and committing its version never loses the files.
        """
        if not isinstance(grace_s, (int, float)) or not math.isfinite(grace_s) or grace_s < 0:
            raise BadInputError(f"invalid gc grace period {grace_s!r}: give a number of seconds >= 0")
        with self._session() as s:
            live = set(s.exec(select(AdapterVersion.location).where(AdapterVersion.status == "ready")).all())
            live |= set(s.exec(select(RouterVersion.location).where(RouterVersion.status == "ready")).all())
            for split in SPLITS:
                column = getattr(Domain, f"{split}_location")
                live |= set(s.exec(select(column).where(column.is_not(None))).all())
            live |= {loc for _, targets in self._coverage(s) for _, loc, _, _ in targets if loc}
        removed = freed = 0
        now = time.time()
        for loc in self.store.locations():
            if loc in live:
                continue
            try:
                if now - self.store.path(loc).stat().st_mtime >= grace_s:
                    freed += self.store.remove(loc)
                    removed += 1
            except FileNotFoundError:  # another gc (another process) removed it first
                continue
        return {"artifacts_removed": removed, "bytes_freed": freed,
                "temp_removed": self.store.remove_stale_temp(grace_s)}

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table, for before/after comparisons in tests and audits."""
        from sqlmodel import SQLModel

        out = {}
        with self.engine.connect() as conn:
            for table in SQLModel.metadata.sorted_tables:
                rows = conn.execute(table.select().order_by(*table.primary_key.columns)).mappings().all()
                out[table.name] = [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
                                   for r in rows]
        return out
