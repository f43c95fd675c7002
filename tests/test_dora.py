"""DoRA, the fourth adapter kind: trained, saved, detected and served in a mixed batch.

A tiny seeded Llama (hidden 64, 2 layers) and real PEFT DoRA folders (peft `use_dora=True`,
random A, B and magnitudes). References are independent of the engine: peft's own DoRA model
for a row routed to one DoRA adapter, and for blends a hand-written layer that applies the
definition y = W x + sum_j w_j ((g_j - 1) W x + g_j s_j B_j A_j x), g_j = m_j / ||W + s_j B_j A_j||_row,
straight from the files.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from registry.errors import BadInputError
from routing.engine import CompositionEngine
from tests.test_engine import _ids, _make_bottleneck, _make_lora, _tiny_model, _tokenizer

ATOL = 1e-5


def _make_dora(base, folder, seed: int, **cfg):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, **cfg))
    for name, p in pm.named_parameters():
        if "lora_A" in name or "lora_B" in name:  # random A and B, so the adapter changes the output
            p.data = torch.randn_like(p) * 0.2
        elif "lora_magnitude_vector" in name:  # and m away from ||W||, so g differs from 1
            p.data = p.data * (1 + 0.3 * torch.randn_like(p))
    pm.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    base = _tiny_model()
    folders = {
        "d1": _make_dora(base, root / "d1", 11, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "d2": _make_dora(base, root / "d2", 12, r=8, lora_alpha=16, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
        "a": _make_lora(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": _make_lora(base, root / "b", 2, r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
        "p": _make_bottleneck(root / "p", 4, "pfeiffer", 16, "relu", 1.0),
    }
    return {"base": base, "tok": _tokenizer(), "folders": folders}


def _engine(world):
    eng = CompositionEngine(copy.deepcopy(world["base"]), world["tok"])
    for n in ("d1", "a", "p", "d2"):
        eng.add_adapter(n, world["folders"][n])
    eng.add_adapter("q", world["folders"]["b"], kind="qlora")  # a qlora artifact is a LoRA folder
    return eng


def _peft_alone(world, name):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(world["base"]), str(world["folders"][name])).eval()


def test_dora_rows_of_a_mixed_batch_equal_peft_alone(world):
    eng = _engine(world)
    assert {n: i.kind for n, i in eng.adapters.items()} == {"d1": "dora", "a": "lora", "p": "bottleneck",
                                                            "d2": "dora", "q": "qlora"}
    ids = _ids(6, 10, seed=3)
    routing = ["d1", "a", "q", "p", "d2", None]
    out = eng.forward(ids, routing=routing).logits
    for row, name in ((0, "d1"), (4, "d2"), (1, "a"), (2, "b")):
        with torch.no_grad():
            ref = _peft_alone(world, name)(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(out[row:row + 1], ref, atol=ATOL, rtol=0)
    with torch.no_grad():
        assert torch.equal(out[5], world["base"](input_ids=ids).logits[5])  # the base row: bit for bit
        # DoRA really changes the output (so the comparison above can fail)
        assert (out[0] - world["base"](input_ids=ids[:1]).logits[0]).abs().max() > 1e-2
    # the single-adapter fast path (every row on one DoRA adapter) gives the same numbers
    torch.testing.assert_close(eng.forward(ids[:1], routing="d1").logits, out[:1], atol=ATOL, rtol=0)


def _reference_blend(world, weights: dict[str, float]):
    """The base with every targeted linear layer replaced by the blend's definition, from the files."""
    model = copy.deepcopy(world["base"])
    per_module: dict[str, list] = {}
    for name, w in weights.items():
        folder = world["folders"][name]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        t = load_file(str(folder / "adapter_model.safetensors"))
        s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
        for key in t:
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                stem = key.removesuffix(".lora_A.weight")
                m = t.get(f"{stem}.lora_magnitude_vector")
                per_module.setdefault(module, []).append((w, s, t[key], t[f"{stem}.lora_B.weight"], m))

    class Blended(torch.nn.Module):
        def __init__(self, linear, entries):
            super().__init__()
            self.linear, self.entries = linear, entries

        def forward(self, x):
            W = self.linear.weight
            wx = x @ W.T
            y = wx.clone()
            for w, s, A, B, m in self.entries:
                if m is None:  # plain LoRA
                    y = y + w * s * (x @ A.T @ B.T)
                else:
                    g = m / torch.linalg.norm(W + s * B @ A, dim=1)
                    y = y + w * ((g - 1) * wx + g * s * (x @ A.T @ B.T))
            return y

    for module, entries in per_module.items():
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, Blended(model.get_submodule(module), entries))
    return model


def test_dora_blends_follow_the_documented_definition(world):
    eng = _engine(world)
    ids = _ids(3, 9, seed=5)
    blends = [{"d1": 0.7, "d2": 0.3}, {"d1": 0.5, "a": 0.5}, {"d2": 1.0}]
    out = eng.forward(ids, routing=blends).logits
    for row, blend in enumerate(blends):
        with torch.no_grad():
            ref = _reference_blend(world, blend)(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(out[row:row + 1], ref, atol=ATOL, rtol=0)


def test_dora_folders_are_detected_never_taken_for_lora(world):
    from training.methods import detect_folder

    assert detect_folder(world["folders"]["d1"]) == "dora"
    assert detect_folder(world["folders"]["a"]) == "lora"
    eng = CompositionEngine(copy.deepcopy(world["base"]), world["tok"])
    with pytest.raises(BadInputError, match="holds a dora adapter"):
        eng.add_adapter("x", world["folders"]["d1"], kind="lora")
    with pytest.raises(BadInputError, match="holds a lora adapter"):
        eng.add_adapter("x", world["folders"]["a"], kind="dora")
    assert eng.add_adapter("x", world["folders"]["d1"]).kind == "dora"
    eng.remove_adapter("x")  # the last DoRA adapter out gives the layers back
    assert type(eng.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_dora_merge_is_refused(world, tmp_path):
    from training.merge import merge_loras
    from training.methods import mergeable_kinds

    assert "dora" not in mergeable_kinds() and "lora" in mergeable_kinds()
    with pytest.raises(BadInputError, match="dora adapter, which cannot be merged"):
        merge_loras(copy.deepcopy(world["base"]), [world["folders"]["a"], world["folders"]["d1"]], [0.5, 0.5],
                    tmp_path / "m")


def test_gradients_reach_every_dora_tensor_and_save_load_roundtrip(world, tmp_path):
    from peft import PeftModel

    from training.methods import get_kind

    method = get_kind("dora")
    settings = method.make_config(r=4, target_modules=["q_proj", "v_proj"])
    before = {k: v.clone() for k, v in world["base"].state_dict().items()}
    model = method.attach(copy.deepcopy(world["base"]), settings)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
        assert sum(f".{part}." in n for n in trainable) == 4, part  # 2 layers x (q_proj, v_proj)
    assert len(trainable) == 2 * 2 * 3  # 2 layers x 2 modules x (A, B, m)
    ids = _ids(2, 8, seed=1)
    torch.manual_seed(0)
    for p in trainable.values():  # B = 0 at init gives A no gradient: move off the initial point
        p.data += 0.05 * torch.randn_like(p)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    # save: exactly the two files, use_dora recorded, peft and plait load it back to the same outputs
    out_dir = method.save(model, tmp_path / "art")
    assert sorted(f.name for f in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out_dir / "adapter_config.json").read_text())["use_dora"] is True
    assert method.read_config(out_dir) == settings
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        again = method.load(copy.deepcopy(world["base"]), out_dir).eval()(input_ids=ids).logits
        via_peft = PeftModel.from_pretrained(copy.deepcopy(world["base"]), str(out_dir)).eval()(input_ids=ids).logits
    torch.testing.assert_close(again, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(via_peft, want, atol=ATOL, rtol=0)
    eng = CompositionEngine(copy.deepcopy(world["base"]), world["tok"])
    eng.add_adapter("t", out_dir)
    torch.testing.assert_close(eng.forward(ids, routing="t").logits, want, atol=ATOL, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in world["base"].state_dict().items())
    with pytest.raises(BadInputError, match="not a DoRA config"):
        method.read_config(world["folders"]["a"])


def test_cli_trains_imports_and_exports_dora(workspace, world, tmp_path, capsys):
    """`plait train D --method dora` registers a dora version the engine serves and peft loads on export;
    `plait registry import` of a PEFT DoRA folder records the kind dora."""
    from peft import PeftModel

    from plait.cli import main
    from tests.test_cli_train import rows
    from tests.train_helpers import write_jsonl
    from training.base import load_base

    w = ["--workspace", str(workspace.path)]
    data = write_jsonl(tmp_path / "law.jsonl", rows("law"))
    code = main(["train", "law", "--method", "dora", "--data", str(data), "--steps", "2", "--max-length", "32",
                 "--batch-size", "2", "--lr", "0.01", "--dtype", "fp32", "--rank", "4", *w])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "registered law:1  (dora, domain law, 2 steps)" in out
    v = workspace.registry.get_version("law:1")
    assert v.kind == "dora" and v.config["adapter"]["r"] == 4
    # routed (the router serves the domain with it) and audited (its own figure measured)
    assert workspace.registry.get_router(workspace.router_kind).covers == ["law:1"]
    capsys.readouterr()
    assert main(["audit", "--json", *w]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["own_versions"] == {"law": "law:1"} and audit["served"] == {"law": ["law:1"]}
    assert audit["current"]["own"]["law"] < audit["current"]["base"]["law"]
    assert main(["registry", "export", "law:1", str(tmp_path / "exp"), *w]) == 0
    base = load_base(workspace.config.base_model)
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        via_peft = PeftModel.from_pretrained(copy.deepcopy(base.model), str(tmp_path / "exp")).eval()(input_ids=ids)
        eng = CompositionEngine(base.model, base.tokenizer)
        eng.add_adapter("law:1", tmp_path / "exp", kind=v.kind)
        torch.testing.assert_close(eng.forward(ids, routing="law:1").logits, via_peft.logits, atol=ATOL, rtol=0)
    # a PEFT DoRA folder made on this base: imported as dora, not lora
    folder = _make_dora(load_base(workspace.config.base_model).model, tmp_path / "peft-dora", 7, r=2,
                        target_modules=["q_proj"])
    capsys.readouterr()
    assert main(["registry", "import", str(folder), "--name", "ext", "--domain", "law", *w]) == 0
    assert "dora)" in capsys.readouterr().out
    assert workspace.registry.get_version("ext:1").kind == "dora"
