"""Concurrent router writers: every domain added at the same moment lands (issue 15, item 1).

`update_router` loads the newest router, adds a domain and registers the result. Two jobs that
both loaded version N used to register N + 1 and N + 2, each covering only its own new domain
besides N's: the newest router silently lost a domain. Now a router version is registered
against the version it was built from (compare-and-swap in the write transaction) and the
loser rebuilds on the winner's version.

The writers are made to collide for certain: each one's first `register_router` call waits
until every writer has loaded the same version and built its change (a barrier), then they
all register at once. Both backends; threads in one process and separate processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from registry.errors import StaleRouterError

ROOT = Path(__file__).resolve().parents[1]
FP = "sha256:" + "ab" * 32
WORDS = ["apple", "zebra", "court", "piano"]


def domain_texts(i: int) -> list[str]:
    return [f"the {WORDS[i]} {WORDS[i]}s and one more {WORDS[i]} number {k}" for k in range(6)]


def prepare_domain(reg, i: int, lora: Path) -> str:
    """Register domain d{i}'s adapter version and freeze its eval and validation sets (the router
    calibrates on validation); returns the version's ref."""
    info = reg.register_version(f"ad{i}", domain=f"d{i}", kind="lora", files=lora, base_fingerprint=FP)
    reg.set_domain_eval(f"d{i}", [{"text": t} for t in domain_texts(i)[:3]])
    reg.set_domain_rows(f"d{i}", "validation", [{"text": t} for t in domain_texts(i)[3:6]])
    return info.ref


def check_router_history(reg, refs: list[str]) -> None:
    """All writers' versions registered; the newest covers every domain; no version drops one its parent had."""
    from routing.routers import load_router, read_files

    versions = reg.search_router_versions("lexical")
    assert [v.version for v in versions] == list(range(1, len(refs) + 1))
    assert sorted(versions[-1].covers) == sorted(refs)
    for parent, child in zip(versions, versions[1:]):
        assert set(parent.covers) <= set(child.covers), (parent.covers, child.covers)
        assert len(child.covers) == len(parent.covers) + 1
    router = load_router(read_files(reg.router_path(versions[-1])))
    assert sorted(router.domains) == [f"d{i}" for i in range(len(refs))]
    for i in range(len(refs)):  # every domain's routing state survived: its own text routes to it
        assert router.route([f"a {WORDS[i]} and another {WORDS[i]}"])[0].domain == f"d{i}"


@pytest.fixture
def ws(tmp_path, db_url, tiny_base, monkeypatch):
    from plait.workspace import Workspace

    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    w = Workspace.init(tmp_path / "ws", base_model=str(tiny_base), db_url=db_url, tracking_uri="none")
    yield w
    w.registry.close()


def test_threads_adding_domains_at_the_same_moment_all_land(ws, tiny_loras, monkeypatch):
    from plait.continual import update_router
    from registry.client import Registry

    refs = [prepare_domain(ws.registry, i, tiny_loras[i]) for i in range(4)]
    barrier, local = threading.Barrier(4, timeout=120), threading.local()
    real = Registry.register_router

    def register_together(self, *args, **kwargs):
        if not getattr(local, "waited", False):  # the first attempt of each writer: all at once
            local.waited = True
            barrier.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Registry, "register_router", register_together)
    results, errors = {}, []

    def add(i: int) -> None:
        try:
            results[i] = update_router(ws, f"d{i}", domain_texts(i), refs[i], kind="lexical")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert sorted(r.version for r in results.values()) == [1, 2, 3, 4]
    check_router_history(ws.registry, refs)


def test_a_stale_parent_is_refused_inside_the_transaction(ws, tiny_loras):
    """The registry's half of the swap: a version built from N is refused once N is not the newest."""
    ref = prepare_domain(ws.registry, 0, tiny_loras[0])
    files = {"router.json": b"{}"}
    first = ws.registry.register_router("lexical", kind="lexical", files=files, covers=[ref], parent_version=0)
    assert first.version == 1
    with pytest.raises(StaleRouterError, match="router 'lexical' is at version 1, not 0 as when this change"):
        ws.registry.register_router("lexical", kind="lexical", files=files, covers=[], parent_version=0)
    assert ws.registry.register_router("lexical", kind="lexical", files=files, covers=[ref],
                                       parent_version=1).version == 2
    assert [v.version for v in ws.registry.search_router_versions("lexical")] == [1, 2]


def test_change_router_gives_up_after_its_attempts(ws, tiny_loras, monkeypatch):
    """A writer that keeps losing raises StaleRouterError (one line, exit 2) instead of looping forever."""
    import plait.continual as continual
    from registry.client import Registry

    from routing.routers import get_router_class

    refs = [prepare_domain(ws.registry, i, tiny_loras[i]) for i in range(2)]
    other = get_router_class("lexical")()
    other.add_domain("d1", domain_texts(1), ref=refs[1])
    real = Registry.register_router

    def always_beaten(self, name, **kwargs):  # another writer registers just before each attempt
        real(self, name, kind=kwargs["kind"], files=other.to_files(), covers=[refs[1]])
        return real(self, name, **kwargs)

    monkeypatch.setattr(Registry, "register_router", always_beaten)
    monkeypatch.setattr(continual, "ROUTER_CHANGE_ATTEMPTS", 3)
    with pytest.raises(StaleRouterError) as e:
        continual.update_router(ws, "d0", domain_texts(0), refs[0], kind="lexical")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert all(v.covers == [refs[1]] for v in ws.registry.search_router_versions("lexical"))


WRITER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from plait.continual import update_router
    from plait.workspace import Workspace
    from registry.client import Registry

    ws_path, barrier, i, n, lora = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    words = ["apple", "zebra", "court", "piano"]
    texts = [f"the {words[i]} {words[i]}s and one more {words[i]} number {k}" for k in range(6)]
    ws = Workspace(ws_path)
    info = ws.registry.register_version(f"ad{i}", domain=f"d{i}", kind="lora", files=Path(lora),
                                        base_fingerprint="sha256:" + "ab" * 32)
    ws.registry.set_domain_eval(f"d{i}", [{"text": t} for t in texts[:3]])
    ws.registry.set_domain_rows(f"d{i}", "validation", [{"text": t} for t in texts[3:6]])
    real, waited = Registry.register_router, []

    def register_together(self, *args, **kwargs):  # every process's first attempt at the same moment
        if not waited:
            waited.append(1)
            (barrier / str(i)).touch()
            deadline = time.time() + 240
            while len(list(barrier.iterdir())) < n and time.time() < deadline:
                time.sleep(0.005)
        return real(self, *args, **kwargs)

    Registry.register_router = register_together
    router = update_router(ws, f"d{i}", texts, info.ref, kind="lexical")
    print(json.dumps({"ref": info.ref, "router": router.version}))
""")


def test_processes_adding_domains_at_the_same_moment_all_land(ws, tiny_loras, tmp_path):
    """4 processes each register a domain's version and add it to the router at the same moment."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(ws.path), str(barrier), str(i), "4",
                               str(tiny_loras[i])], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(4)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr.decode()[-3000:]
        out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    assert sorted(o["router"] for o in out) == [1, 2, 3, 4]
    assert sorted(v.ref for v in ws.registry.search_versions()) == [f"ad{i}:1" for i in range(4)]
    check_router_history(ws.registry, [f"ad{i}:1" for i in range(4)])
