"""The notebooks run end to end (nbclient), on a tiny base with a small budget, so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, env: dict[str, str], monkeypatch, timeout: int = 600):
    import nbformat
    from nbclient import NotebookClient

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is committed with outputs"
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


@pytest.fixture(scope="module")
def nb_env(tmp_path_factory):
    from tests.tiny import make_tiny_base

    root = tmp_path_factory.mktemp("nb")
    return {"PLAIT_NB_BASE": str(make_tiny_base(root / "base")), "PLAIT_NB_STEPS": "4",
            "PLAIT_NB_WORKSPACE": str(root / "ws"), "PLAIT_CACHE": str(root / "cache")}


def test_quickstart_notebook(nb_env, monkeypatch):
    nb = run_notebook("quickstart.ipynb", nb_env, monkeypatch)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "sport:1 lora eval loss" in text and "tech:1 bottleneck" in text and "passed:" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the heatmap and the confusion matrix


def test_forgetting_audit_notebook(nb_env, monkeypatch):
    nb = run_notebook("forgetting_audit.ipynb", nb_env, monkeypatch)  # reads the quickstart's workspace
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "sequential  BWT" in text and "stored figures" in text
    assert "'joint':" in text and "'merged':" in text and "covers ['" in text  # the transfer section
