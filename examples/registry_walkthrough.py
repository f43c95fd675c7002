"""A short walkthrough of the registry on the shipped SmolLM2 base (offline, about a minute).

    python examples/registry_walkthrough.py [WORKSPACE]

Makes two PEFT LoRA adapters on SmolLM2 (random, untrained: this shows the registry, not
training), imports them as versions 1 and 2 of `support`, promotes version 1 to production,
moves it to version 2, rolls back, exports it in PEFT layout and verifies every artifact.
"""

import sys
import tempfile
from pathlib import Path

import torch

from plait import Workspace
from training.base import load_base

root = Path(sys.argv[1] if len(sys.argv) > 1 else "plait-walkthrough")
ws = Workspace.init(root / ".plait", base_model="smollm2")
print(f"workspace: {ws.path}")
tmp = Path(tempfile.mkdtemp())
from peft import LoraConfig, get_peft_model  # noqa: E402

for seed in (1, 2):
    torch.manual_seed(seed)
    model = get_peft_model(load_base("smollm2").model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp / f"lora-{seed}")
    v = ws.registry.import_peft(tmp / f"lora-{seed}", name="support", domain="support",
                                base_fingerprint=ws.base_fingerprint)
    print(f"imported {v.ref}  sha256 {v.sha256[:12]}  {v.size_bytes:,} bytes")
reg = ws.registry
print("production ->", reg.set_alias("support:1", "production").ref)
print("production ->", reg.set_alias("support:2", "production").ref)
print("rolled back, production ->", reg.rollback_alias("support", "production").ref)
out = reg.export_version("support@production", tmp / "exported")
print(f"exported support@production to {out}")
report = reg.verify()
print(f"verified {len(report)} artifacts: {sum(r['ok'] for r in report)} ok")
print(f"\nnext: .venv/bin/plait registry list --workspace {ws.path}")
