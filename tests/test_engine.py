"""Composition engine: per-row routing over many adapters on one base is exact.

Everything runs on a tiny seeded Llama built in-process (hidden 64, 2 layers, vocab 320) with
real PEFT LoRA folders (peft `save_pretrained`, random lora_B) and real bottleneck folders
(safetensors in plait's layout), and checks numbers against independent references: peft's
own PeftModel, a hand-merged copy of the base, and plain forward hooks written from the
format's definition.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.errors import BadInputError, ConflictError, IncompatibleBaseError, NotFoundError
from routing.engine import CompositionEngine, Routing

ATOL = 1e-5
FP = "sha256:" + "a" * 64


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=320, eos_token_id=1, bos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _make_lora(base, folder: Path, seed: int, **cfg) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    for name, p in pm.named_parameters():
        if "lora_" in name:  # random A and B, so every adapter changes the output
            p.data = torch.randn_like(p) * 0.2
    pm.save_pretrained(str(folder))
    return folder


def _make_bottleneck(folder: Path, seed: int, placement: str, size: int, act: str, scaling: float,
                     hidden: int = 64, layers: int = 2, zero_up: bool = False) -> Path:
    g = torch.Generator().manual_seed(seed)
    sites = ["mlp"] if placement == "pfeiffer" else ["attn", "mlp"]
    tensors = {}
    for i in range(layers):
        for s in sites:
            up = torch.zeros(hidden, size) if zero_up else torch.randn(hidden, size, generator=g) * 0.2
            tensors[f"layers.{i}.{s}.down.weight"] = torch.randn(size, hidden, generator=g) * 0.2
            tensors[f"layers.{i}.{s}.down.bias"] = torch.randn(size, generator=g) * 0.1
            tensors[f"layers.{i}.{s}.up.weight"] = up
            tensors[f"layers.{i}.{s}.up.bias"] = torch.zeros(hidden) if zero_up else torch.randn(hidden, generator=g) * 0.1
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "plait_adapter": "bottleneck", "placement": placement, "reduction_factor": hidden // size,
        "bottleneck_size": size, "hidden_size": hidden, "non_linearity": act, "layers_path": "model.layers",
        "sites": {"mlp": "mlp", "attn": "self_attn"}, "num_layers": layers, "scaling": scaling}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The bare base, a tokenizer and adapter folders of every kind."""
    root = tmp_path_factory.mktemp("adapters")
    base = _tiny_model()
    folders = {
        "a": _make_lora(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": _make_lora(base, root / "b", 2, r=8, lora_alpha=16, use_rslora=True,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "c": _make_lora(base, root / "c", 3, r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
        "p": _make_bottleneck(root / "p", 4, "pfeiffer", 16, "relu", 1.0),
        "h": _make_bottleneck(root / "h", 5, "houlsby", 8, "gelu", 0.5),
        "z": _make_bottleneck(root / "z", 6, "pfeiffer", 16, "silu", 1.0, zero_up=True),
    }
    return {"base": base, "tok": _tokenizer(), "folders": folders}


def _engine(world, names=("a", "b", "c", "p", "h")) -> CompositionEngine:
    eng = CompositionEngine(copy.deepcopy(world["base"]), world["tok"], fingerprint=FP)
    for n in names:
        eng.add_adapter(n, world["folders"][n], fingerprint=FP)
    return eng


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def _peft(world, names):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(world["base"]), str(world["folders"][names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(world["folders"][n]), adapter_name=n)
    return pm.eval()


def _merged(world, weights: dict[str, float]):
    """A copy of the base with sum_j w_j * s_j * B_j A_j added to every targeted weight."""
    model = copy.deepcopy(world["base"])
    for name, w in weights.items():
        folder = world["folders"][name]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
        t = load_file(str(folder / "adapter_model.safetensors"))
        for key, a in t.items():
            if ".lora_A." in key:
                b = t[key.replace("lora_A", "lora_B")]
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                model.get_submodule(module).weight.data += w * scale * (b @ a)
    return model


def _with_bottleneck_hooks(model, world, weights: dict[str, float]):
    """Reference bottleneck hooks written straight from the definition in training/methods/bottleneck.py's docstring."""
    acts = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}
    per_module: dict[str, list] = {}
    for name, w in weights.items():
        folder = world["folders"][name]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        t = load_file(str(folder / "adapter_model.safetensors"))
        for i in range(cfg["num_layers"]):
            for site, mod in cfg["sites"].items():
                if f"layers.{i}.{site}.down.weight" in t:
                    p = {k: t[f"layers.{i}.{site}.{k}"] for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
                    per_module.setdefault(f"model.layers.{i}.{mod}", []).append((w, cfg, p))

    def hook_for(entries):
        def hook(module, args, output):
            o = output[0] if isinstance(output, tuple) else output
            delta = 0
            for w, cfg, p in entries:
                h = acts[cfg["non_linearity"]](o @ p["down.weight"].T + p["down.bias"])
                delta = delta + w * cfg["scaling"] * (h @ p["up.weight"].T + p["up.bias"])
            return (o + delta, *output[1:]) if isinstance(output, tuple) else o + delta
        return hook

    for module, entries in per_module.items():
        model.get_submodule(module).register_forward_hook(hook_for(entries))
    return model


# ---------------------------------------------------------------------------- exactness


def test_lora_mixed_batch_rows_equal_alone_and_peft(world):
    eng = _engine(world, names=("a", "b", "c"))
    ids = _ids(6, 12)
    routing = ["a", "b", None, "c", "a", "b"]
    mixed = eng.forward(ids, routing=routing).logits
    for i, r in enumerate(routing):
        alone = eng.forward(ids[i:i + 1], routing=[r]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=ATOL, rtol=0)
    pm = _peft(world, ["a", "b", "c"])
    with torch.no_grad():
        ref = pm(input_ids=ids, adapter_names=[r or "__base__" for r in routing]).logits
    torch.testing.assert_close(mixed, ref, atol=ATOL, rtol=0)
    # peft alone, one adapter at a time (set_adapter), as a second reference
    for name in ("a", "b", "c"):
        pm.set_adapter(name)
        rows = [i for i, r in enumerate(routing) if r == name]
        with torch.no_grad():
            torch.testing.assert_close(mixed[rows], pm(input_ids=ids[rows]).logits, atol=ATOL, rtol=0)


def test_base_routed_rows_equal_bare_base_exactly(world):
    eng = _engine(world)
    ids = _ids(5, 10, seed=1)
    routing = [None, "a", Routing.base(), {"b": 0.5, "p": 0.5}, "h"]
    mixed = eng.forward(ids, routing=routing).logits
    with torch.no_grad():
        bare = world["base"](input_ids=ids).logits
    assert torch.equal(mixed[[0, 2]], bare[[0, 2]])
    assert not torch.allclose(mixed[1], bare[1], atol=1e-3)  # the adapters do change outputs
    # the whole batch on base: the same as the bare model, bit for bit
    assert torch.equal(eng.forward(ids, routing=None).logits, bare)


def test_top2_lora_blend_equals_merged_weights(world):
    eng = _engine(world, names=("a", "b", "c"))
    ids = _ids(4, 9, seed=2)
    blend = {"a": 0.7, "b": 0.3}
    routing = [blend, "c", {"b": 0.25, "c": 0.6}, None]
    out = eng.forward(ids, routing=routing).logits
    with torch.no_grad():
        ref0 = _merged(world, blend)(input_ids=ids[:1]).logits
        ref2 = _merged(world, {"b": 0.25, "c": 0.6})(input_ids=ids[2:3]).logits
        ref1 = _merged(world, {"c": 1.0})(input_ids=ids[1:2]).logits
    torch.testing.assert_close(out[0:1], ref0, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1:2], ref1, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2:3], ref2, atol=ATOL, rtol=0)


def test_lora_blend_matches_peft_cat_merge(world):
    """peft's add_weighted_adapter(combination_type="cat") is another exact reference."""
    pm = _peft(world, ["a", "b"])
    pm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", combination_type="cat")
    pm.set_adapter("ab")
    eng = _engine(world, names=("a", "b"))
    ids = _ids(3, 7, seed=3)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    torch.testing.assert_close(eng.forward(ids, routing={"a": 0.6, "b": 0.4}).logits, ref, atol=ATOL, rtol=0)


def test_bottleneck_rows_and_blend_match_reference_hooks(world):
    eng = _engine(world, names=("p", "h"))
    ids = _ids(4, 8, seed=4)
    routing = ["p", "h", {"p": 0.4, "h": 0.6}, None]
    out = eng.forward(ids, routing=routing).logits
    for i, r in enumerate(routing):
        weights = {} if r is None else ({r: 1.0} if isinstance(r, str) else r)
        ref_model = _with_bottleneck_hooks(copy.deepcopy(world["base"]), world, weights)
        with torch.no_grad():
            ref = ref_model(input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(out[i:i + 1], ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(out[i:i + 1], eng.forward(ids[i:i + 1], routing=[r]).logits, atol=ATOL, rtol=0)


def test_fresh_bottleneck_is_identity(world):
    eng = _engine(world, names=("z",))
    ids = _ids(2, 6, seed=5)
    with torch.no_grad():
        bare = world["base"](input_ids=ids).logits
    assert torch.equal(eng.forward(ids, routing="z").logits, bare)


def test_lora_and_bottleneck_mixed_in_one_batch_and_one_row(world):
    eng = _engine(world)
    ids = _ids(6, 10, seed=6)
    routing = ["a", "p", None, {"b": 0.5, "h": 0.5}, "h", {"c": 0.3, "a": 0.3, "p": 0.4}]
    out = eng.forward(ids, routing=routing).logits
    for i, r in enumerate(routing):
        torch.testing.assert_close(out[i:i + 1], eng.forward(ids[i:i + 1], routing=[r]).logits, atol=ATOL, rtol=0)
    # the cross-kind blend of row 3 = merged LoRA b at 0.5 + bottleneck h hooks at 0.5
    ref_model = _with_bottleneck_hooks(_merged(world, {"b": 0.5}), world, {"h": 0.5})
    with torch.no_grad():
        torch.testing.assert_close(out[3:4], ref_model(input_ids=ids[3:4]).logits, atol=ATOL, rtol=0)


def test_padding_does_not_change_results(world):
    eng = _engine(world)
    texts = ["hello there, a long-ish sentence", "hi", "medium sized text", "x y"]
    routing = ["a", {"b": 0.5, "p": 0.5}, None, "h"]
    for side in ("right", "left"):
        ids, mask = eng.encode(texts, padding_side=side)
        out = eng.forward(ids, mask, routing).logits
        for i, (t, r) in enumerate(zip(texts, routing)):
            alone_ids, _ = eng.encode([t])
            alone = eng.forward(alone_ids, routing=[r]).logits[0]
            n = alone.shape[0]
            got = out[i, :n] if side == "right" else out[i, -n:]
            torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)
    ids, mask = eng.encode(texts)
    assert torch.equal(eng.logits(texts, routing), eng.forward(ids, mask, routing).logits)


# ---------------------------------------------------------------------------- loss


def test_loss_and_loss_matrix(world):
    eng = _engine(world)
    texts = ["the cat sat on the mat", "adapters compose per row", "ok"]
    names = ["a", "p", None, "b"]
    matrix = eng.loss_matrix(texts, names, batch_size=5)
    assert matrix.shape == (3, 4)
    for j, n in enumerate(names):
        torch.testing.assert_close(matrix[:, j], eng.loss(texts, n), atol=ATOL, rtol=0)
    # per-row loss by hand from a row alone
    ids, _ = eng.encode([texts[0]])
    logits = eng.forward(ids, routing="a").logits[0, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    torch.testing.assert_close(matrix[0, 0], by_hand, atol=ATOL, rtol=0)
    # completion-only loss covers just the completion tokens
    comp = eng.loss(["the cat "], "a", completions=["sat"])
    ids, _ = eng.encode(["the cat sat"])
    logits = eng.forward(ids, routing="a").logits[0, :-1]
    tok = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(comp[0], tok[-3:].mean(), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- generation


def test_greedy_generation_mixed_equals_alone(world):
    eng = _engine(world)
    texts = ["once upon a time", "hi", "the quick brown fox jumps", "abc"]
    routing = ["a", {"b": 0.6, "h": 0.4}, None, "p"]
    mixed = eng.generate(texts, routing, max_new_tokens=12)
    for t, r, m in zip(texts, routing, mixed):
        assert eng.generate([t], [r], max_new_tokens=12) == [m]
    ids, mask = eng.encode(texts, padding_side="left")
    mixed_ids = eng.generate_ids(ids, mask, routing, max_new_tokens=12, eos_token_id=[])
    assert mixed_ids.shape == (4, 12)
    # greedy decoding with the KV cache equals argmax of a full forward at every step
    for i, r in enumerate(routing):
        seq, _ = eng.encode([texts[i]])
        for step in range(12):
            nxt = eng.forward(seq, routing=[r]).logits[0, -1].argmax()
            assert nxt == mixed_ids[i, step]
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    # the base row generates what the bare base generates
    bare = CompositionEngine(copy.deepcopy(world["base"]), world["tok"])
    assert bare.generate([texts[2]], max_new_tokens=12) == [mixed[2]]


def test_sampling_with_seed_is_reproducible(world):
    eng = _engine(world)
    texts = ["sample me", "and me too"]
    routing = ["a", {"p": 0.5, "c": 0.5}]
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95)
    one = eng.generate(texts, routing, seed=7, **kw)
    assert one == eng.generate(texts, routing, seed=7, **kw)
    assert one != eng.generate(texts, routing, seed=8, **kw)


# ---------------------------------------------------------------------------- lifecycle and errors


def test_remove_adapter_keeps_others_and_restores_base(world):
    eng = _engine(world)
    ids = _ids(3, 8, seed=7)
    before = eng.forward(ids, routing=["b", "h", "c"]).logits
    eng.remove_adapter("a")
    eng.remove_adapter("p")
    torch.testing.assert_close(eng.forward(ids, routing=["b", "h", "c"]).logits, before, atol=ATOL, rtol=0)
    for n in ("b", "c", "h"):
        eng.remove_adapter(n)
    assert type(eng.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(eng.forward(ids).logits, world["base"](input_ids=ids).logits)
    eng.add_adapter("a2", world["folders"]["a"])  # adding again after removal works
    solo = _engine(world, names=("a",))
    torch.testing.assert_close(eng.forward(ids, routing="a2").logits, solo.forward(ids, routing="a").logits,
                               atol=ATOL, rtol=0)


def test_bad_input_messages(world, tmp_path):
    eng = _engine(world, names=("a", "p"))
    ids = _ids(2, 5)
    with pytest.raises(NotFoundError, match="'nope' is not loaded"):
        eng.forward(ids, routing=["a", "nope"])
    with pytest.raises(BadInputError, match="3 routings for a batch of 2"):
        eng.forward(ids, routing=["a", None, "p"])
    with pytest.raises(IncompatibleBaseError, match="trained on base"):
        eng.add_adapter("x", world["folders"]["b"], fingerprint="sha256:" + "b" * 64)
    assert "x" not in eng.adapters
    with pytest.raises(ConflictError, match="already loaded"):
        eng.add_adapter("a", world["folders"]["b"])
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        eng.add_adapter("x", tmp_path)
    with pytest.raises(BadInputError, match="holds a bottleneck"):
        eng.add_adapter("x", world["folders"]["h"], kind="lora")
    with pytest.raises(BadInputError, match="appears twice"):
        Routing((("a", 0.5), ("a", 0.5)))
    with pytest.raises(BadInputError, match="finite"):
        Routing.one("a", float("nan"))
    with pytest.raises(NotFoundError, match="'ghost' is not loaded"):
        eng.remove_adapter("ghost")


def test_wrong_shapes_are_refused_without_half_loading(world, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=320))
    folder = _make_lora(other, tmp_path / "wide", 9, r=4, lora_alpha=8, target_modules=["q_proj"])
    eng = _engine(world, names=("a",))
    with pytest.raises(BadInputError, match="made for another base"):
        eng.add_adapter("wide", folder)
    assert list(eng.adapters) == ["a"] and eng._lora_layers["model.layers.0.self_attn.q_proj"].n_slots == 1


# ---------------------------------------------------------------------------- 4-bit base


def test_4bit_base_mixed_batch(world, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))  # keep the fingerprint cache out of ~
    from training.base import load_base

    folder = tmp_path / "tiny"
    world["base"].save_pretrained(str(folder))
    world["tok"].save_pretrained(str(folder))
    loaded = load_base(folder, quantize_4bit=True)
    assert loaded.quantized
    eng = CompositionEngine(loaded.model, loaded.tokenizer, fingerprint=loaded.fingerprint, quantized=True)
    for n in ("a", "b", "p"):
        eng.add_adapter(n, world["folders"][n], fingerprint=loaded.fingerprint)
    import bitsandbytes as bnb

    assert isinstance(eng.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ids = _ids(4, 8, seed=8)
    routing = ["a", None, {"b": 0.5, "p": 0.5}, "b"]
    out = eng.forward(ids, routing=routing).logits
    for i, r in enumerate(routing):
        torch.testing.assert_close(out[i:i + 1], eng.forward(ids[i:i + 1], routing=[r]).logits, atol=1e-4, rtol=0)
    bare = load_base(folder, quantize_4bit=True).model
    with torch.no_grad():
        assert torch.equal(out[1], bare(input_ids=ids).logits[1])
    # against peft on its own 4-bit copy
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_base(folder, quantize_4bit=True).model, str(world["folders"]["a"]),
                                   adapter_name="a").eval()
    pm.load_adapter(str(world["folders"]["b"]), adapter_name="b")
    with torch.no_grad():
        ref = pm(input_ids=ids[[0, 3]], adapter_names=["a", "b"]).logits
    torch.testing.assert_close(out[[0, 3]], ref, atol=1e-4, rtol=0)
    assert len(eng.generate(["hello"], ["a"], max_new_tokens=4)) == 1


def test_bf16_base_casts_adapters_to_compute_dtype(world):
    model = copy.deepcopy(world["base"]).to(torch.bfloat16)
    eng = CompositionEngine(model, world["tok"])
    for n in ("a", "b", "p"):
        eng.add_adapter(n, world["folders"][n])
    layer = eng.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == torch.bfloat16 and eng._bn_sites["model.layers.0.mlp"].down.dtype == torch.bfloat16
    ids = _ids(3, 8, seed=9)
    routing = ["a", [("b", 0.5), ("p", 0.5)], None]  # per-row (name, weight) pairs are accepted too
    out = eng.forward(ids, routing=routing).logits
    assert out.dtype == torch.bfloat16
    pm = _peft(world, ["a"])
    pm = pm.to(torch.bfloat16)
    with torch.no_grad():
        ref = pm(input_ids=ids[:1]).logits
    torch.testing.assert_close(out[:1].float(), ref.float(), atol=0.05, rtol=0.02)
    with torch.no_grad():
        assert torch.equal(out[2], copy.deepcopy(world["base"]).to(torch.bfloat16)(input_ids=ids).logits[2])
