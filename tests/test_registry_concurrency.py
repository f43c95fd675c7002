"""Many processes registering versions of one adapter at once, on a real SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

WRITER = textwrap.dedent("""
    import sys
    from registry.client import Registry
    url, root, worker, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    reg = Registry(url, root)
    for i in range(n):
        payload = f"worker {worker} registration {i}".encode()
        reg.register_version("shared", domain="d", kind="lora", base_fingerprint="sha256:base",
                             files={"adapter_config.json": b"{}", "adapter_model.safetensors": payload},
                             metrics={"worker": worker, "i": i})
""")


def run_writers(url: str, root, reader, n_procs: int = 8, per_proc: int = 25) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(root), str(w), str(per_proc)], env=env,
                              stderr=subprocess.PIPE) for w in range(n_procs)]
    deadline = time.time() + 300
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        reader()
    for p in procs:
        _, err = p.communicate(timeout=max(1, deadline - time.time()))
        assert p.returncode == 0, err.decode()[-2000:]


def check_concurrent_registration(url, tmp_path):
    """8 writers x 25 versions on a database none of them has opened before."""
    from registry.client import Registry

    seen_partial, opened = [], []

    def reader():
        # every version a reader can see must be complete: its artifact passes the hash check
        if not opened:
            opened.append(Registry(url, tmp_path / "artifacts"))
        reg = opened[0]
        for v in reg.search_versions(name="shared"):
            _, path = reg.artifact_path(v)
            if not (path / "adapter_model.safetensors").is_file():
                seen_partial.append(v.ref)
        time.sleep(0.05)

    run_writers(url, tmp_path / "artifacts", reader)
    reg = opened[0] if opened else Registry(url, tmp_path / "artifacts")
    versions = reg.search_versions(name="shared")
    assert sorted(v.version for v in versions) == list(range(1, 201))
    payloads = {(reg.store.path(v.location) / "adapter_model.safetensors").read_bytes() for v in versions}
    assert payloads == {f"worker {w} registration {i}".encode() for w in range(8) for i in range(25)}
    assert seen_partial == []
    assert all(r["ok"] for r in reg.verify())


def test_eight_writers_sqlite(tmp_path):
    check_concurrent_registration(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)


@pytest.mark.postgres
def test_eight_writers_postgres(tmp_path, postgres_url):
    check_concurrent_registration(postgres_url, tmp_path)
