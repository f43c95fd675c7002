"""training.merge on the tiny base: peft merges of LoRAs of different ranks, checked against
the composition engine's exact weighted blend."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from registry.errors import BadInputError
from routing.engine import CompositionEngine, Routing
from tests.tiny import make_peft_lora, make_tiny_base
from training.merge import merge_loras, merge_weights

TEXTS = ["the quick brown fox jumps over the lazy dog", "legal contracts bind the parties"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_base(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    # the first adapter uses rsLoRA: the merged adapter must not inherit its sqrt(r) scaling
    torch.manual_seed(3)
    rs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                         target_modules=["q_proj", "o_proj"]))
    for name, p in rs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    rs.save_pretrained(root / "rs")
    folders = {"rs": root / "rs", "a": make_peft_lora(base, root / "a", seed=1, r=4),
               "b": make_peft_lora(base, root / "b", seed=2, r=8), "c": make_peft_lora(base, root / "c", seed=4, r=4)}
    return {"root": root, "model": model, "tok": AutoTokenizer.from_pretrained(base), "folders": folders}


def _losses(world, merged, blend):
    eng = CompositionEngine(copy.deepcopy(world["model"]), world["tok"])
    for name in blend:
        eng.add_adapter(name, world["folders"][name])
    eng.add_adapter("merged", merged)
    return eng.loss(TEXTS, Routing.one("merged")), eng.loss(TEXTS, Routing.blend(blend)), eng.loss(TEXTS, None)


def test_cat_merge_is_the_exact_weighted_sum_across_ranks_and_modules(world):
    names = ["rs", "a", "b"]
    w = merge_weights("cat", 3)
    assert w == [1 / 3] * 3
    out = merge_loras(copy.deepcopy(world["model"]), [world["folders"][n] for n in names], w,
                      world["root"] / "cat", method="cat")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16 and cfg["use_rslora"] is False
    assert cfg["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    merged, blend, base = _losses(world, out, dict(zip(names, w)))
    torch.testing.assert_close(merged, blend, atol=1e-5, rtol=0)
    assert (merged - base).abs().max() > 1e-3  # and the merge does change the model


def test_ties_and_linear_merges(world):
    f = world["folders"]
    ties = merge_loras(copy.deepcopy(world["model"]), [f["a"], f["b"]], merge_weights("ties", 2),
                       world["root"] / "ties", method="ties")
    assert json.loads((ties / "adapter_config.json").read_text())["r"] == 8  # SVD back to the largest rank
    merged, blend, _ = _losses(world, ties, {"a": 0.5, "b": 0.5})
    assert (merged - blend).abs().max() > 1e-4  # TIES trims and elects signs: not the plain mean
    lin = merge_loras(copy.deepcopy(world["model"]), [f["a"], f["c"]], [0.5, 0.5], world["root"] / "lin",
                      method="linear")
    assert json.loads((lin / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(BadInputError, match=r"needs adapters of one rank, got ranks \[4, 8\]"):
        merge_loras(copy.deepcopy(world["model"]), [f["a"], f["b"]], [0.5, 0.5], world["root"] / "bad",
                    method="linear")
    with pytest.raises(BadInputError, match="unknown merge method 'soup'"):
        merge_weights("soup", 2)
    with pytest.raises(BadInputError, match="2 weights for 1 adapters"):
        merge_loras(world["model"], [f["a"]], [0.5, 0.5], world["root"] / "bad", method="cat")
