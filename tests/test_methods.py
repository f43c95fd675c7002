"""The adapter kinds on a tiny seeded Llama: identity at init, gradients, frozen base,
exact save/load, plain-peft interop, the QLoRA CPU repacking guard, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from registry.errors import BadInputError, NotFoundError
from training.data import Example
from training.methods import KINDS, count_trainable, get_kind
from training.methods.bottleneck import BottleneckSettings
from training.methods.lora import LoraSettings
from training.methods.qlora import QLoraSettings
from training.trainer import GradientError, evaluate, train_steps

KIND_CASES = [("lora", {}), ("qlora", {}), ("bottleneck", {"placement": "pfeiffer", "reduction_factor": 4}),
         ("bottleneck", {"placement": "houlsby", "reduction_factor": 4}), ("dora", {})]
IDS = ["lora", "qlora", "pfeiffer", "houlsby", "dora"]
X = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(1))


def examples(n: int = 8, length: int = 24) -> list[Example]:
    g = torch.Generator().manual_seed(2)
    pattern = torch.randint(3, 250, (length,), generator=g).tolist()
    return [Example(tuple(pattern), tuple(pattern)) for _ in range(n)]


def base_params(model) -> dict[str, torch.Tensor]:
    """The base's parameters under their plain names, whatever wraps them."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith("adapters."):
            continue
        for prefix in ("base_model.model.", "base."):
            name = name.removeprefix(prefix)
        out[name.replace(".base_layer", "")] = p.detach().clone()
    return out


def logits(model, x=X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def fresh(tiny_base, kind, options):
    method = get_kind(kind)
    settings = method.make_config(**options)
    return method, settings, method.load_base(tiny_base, settings)


def trained(tiny_base, kind, options, steps: int = 8, lr: float | None = None):
    lr = lr or (2e-2 if kind == "bottleneck" else 1e-2)
    method, settings, base = fresh(tiny_base, kind, options)
    before = base_params(base.model)
    base_out = logits(base.model)
    torch.manual_seed(0)
    model = method.attach(base.model, settings)
    opt = method.make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
    losses, _, _ = train_steps(model, method, opt, examples(), start=0, total=steps, batch_size=4, seed=0,
                               pad_id=0)
    return method, model, before, base_out, losses


@pytest.mark.parametrize("kind,options", KIND_CASES, ids=IDS)
def test_fresh_adapter_is_the_identity(tiny_base, kind, options):
    method, settings, base = fresh(tiny_base, kind, options)
    base_out = logits(base.model)
    model = method.attach(base.model, settings)
    torch.testing.assert_close(logits(model), base_out, rtol=0, atol=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n) or n.startswith("adapters.") for n in names)
    assert count_trainable(model) == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind,options", KIND_CASES, ids=IDS)
def test_training_learns_with_a_gradient_everywhere_and_a_frozen_base(tiny_base, kind, options):
    method, model, before, base_out, losses = trained(tiny_base, kind, options)
    assert losses[-1] < losses[0] - 0.25, losses
    # one more step: every trainable tensor gets a nonzero gradient
    model.train()
    method.prepare_for_training(model)
    batch = torch.tensor([e.input_ids for e in examples(4)])
    model(input_ids=batch, labels=batch).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    after = base_params(model)
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    # the adapter changed the outputs; switched off, the model is the base again, bit for bit
    assert not torch.equal(logits(model), base_out)
    with method.disabled(model):
        assert torch.equal(logits(model), base_out)


@pytest.mark.parametrize("kind,options", KIND_CASES, ids=IDS)
def test_save_then_load_reproduces_outputs_exactly(tiny_base, kind, options, tmp_path):
    method, model, _, _, _ = trained(tiny_base, kind, options, steps=3)
    out = logits(model)
    method.save(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    _, settings, base2 = fresh(tiny_base, kind, options)
    loaded = method.load(base2.model, tmp_path / "a")
    assert torch.equal(logits(loaded), out)
    assert count_trainable(loaded) == 0
    assert method.read_config(tmp_path / "a") == method.read_config(tmp_path / "a")


def test_bottleneck_artifact_follows_the_shared_format(tiny_base, tmp_path):
    from safetensors import safe_open

    method, model, _, _, _ = trained(tiny_base, "bottleneck", {"placement": "houlsby", "reduction_factor": 8}, 2)
    method.save(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg == {"plait_adapter": "bottleneck", "placement": "houlsby", "reduction_factor": 8, "bottleneck_size": 8,
                   "hidden_size": 64, "non_linearity": "relu", "layers_path": "model.layers",
                   "sites": {"attn": "self_attn", "mlp": "mlp"}, "num_layers": 2, "scaling": 1.0}
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert len(shapes) == 2 * 2 * 4
    assert shapes["layers.1.attn.down.weight"] == [8, 64] and shapes["layers.1.attn.down.bias"] == [8]
    assert shapes["layers.0.mlp.up.weight"] == [64, 8] and shapes["layers.0.mlp.up.bias"] == [64]


def test_bottleneck_hook_semantics_match_the_format(tiny_base):
    """o' = o + scaling * up(act(down(o))) on the hooked module's output."""
    method, model, _, _, _ = trained(tiny_base, "bottleneck", {"placement": "pfeiffer", "scaling": 0.5,
                                                                "non_linearity": "tanh"}, 2)
    mlp = model.base.model.layers[0].mlp
    h = torch.randn(1, 5, 64)
    with model.disable_adapter():
        o = mlp(h)
    a = model.adapters.layers[0]["mlp"]
    expected = o + 0.5 * a.up(torch.tanh(a.down(o)))
    torch.testing.assert_close(mlp(h), expected, rtol=0, atol=0)


def test_lora_artifact_loads_in_plain_peft_with_equal_outputs(tiny_base, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    method, model, _, _, _ = trained(tiny_base, "lora", {}, steps=3)
    out = logits(model)
    method.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in set(f.keys())
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(tmp_path))
    assert torch.equal(logits(plain), out)


def test_lora_load_refuses_an_artifact_missing_tensors(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    from registry.errors import IntegrityError

    method, model, _, _, _ = trained(tiny_base, "lora", {}, steps=1)
    method.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    _, _, base2 = fresh(tiny_base, "lora", {})
    with pytest.raises(IntegrityError, match="missing tensor base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"):
        method.load(base2.model, tmp_path)


def _packed_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
               and getattr(m.weight.quant_state, "packing_format_for_cpu", False))


def test_qlora_trains_after_an_eval_mode_no_grad_evaluation(tiny_base):
    """The 4-bit repacking trap (training/methods/qlora.py): an eval-mode no-grad forward used to repack the 4-bit weights and cut LoRA's gradients."""
    method, settings, base = fresh(tiny_base, "qlora", {})
    assert base.quantized and getattr(base.model, "is_loaded_in_4bit", False)
    torch.manual_seed(0)
    model = method.attach(base.model, settings)
    ev = evaluate(model, examples(4), pad_id=0, adapter_kind=method)  # eval mode, torch.no_grad
    assert _packed_layers(model) == 0
    opt = method.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-2)
    losses, _, _ = train_steps(model, method, opt, examples(), start=0, total=8, batch_size=4, seed=0, pad_id=0)
    assert losses[-1] < losses[0] - 0.5, losses
    batch = torch.tensor([e.input_ids for e in examples(4)])
    model(input_ids=batch, labels=batch).loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 7 * 2  # A and B on 7 projections in 2 layers
    for name, p in lora:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert evaluate(model, examples(4), pad_id=0, adapter_kind=method)["loss"] < ev["loss"] - 0.5


def test_qlora_guard_undoes_a_repack_and_the_trainer_catches_a_missing_gradient(tiny_base):
    """Without the guard the trap is real on this CPU, and train_steps refuses to train silently."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from training.methods.qlora import guard_cpu_4bit

    if not has_avx512bf16():
        pytest.skip("the repacking only happens on CPUs with AVX512-BF16")
    # the trap's case: LoRA on q/v only, whose gradient must pass through the 4-bit o_proj
    method, settings, base = fresh(tiny_base, "qlora", {"target_modules": ["q_proj", "v_proj"]})
    model = method.attach(base.model, settings)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # what bitsandbytes sets by default
    logits(model)
    assert _packed_layers(model) == 14
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(GradientError, match=r"received no gradient \(8 in all\)"):
        train_steps(model, get_kind("lora"), opt, examples(), start=0, total=3, batch_size=4, seed=0, pad_id=0)
    with pytest.warns(UserWarning, match="14 4-bit layers had been repacked"):
        assert guard_cpu_4bit(model) == 14
    assert _packed_layers(model) == 0
    opt.zero_grad(set_to_none=True)
    losses, _, _ = train_steps(model, method, opt, examples(), start=0, total=6, batch_size=4, seed=0, pad_id=0)
    assert losses[-1] < losses[0]


def test_qlora_needs_a_4bit_base(tiny_base):
    method, settings, _ = fresh(tiny_base, "lora", {})
    base = get_kind("lora").load_base(tiny_base)
    with pytest.raises(BadInputError, match="a qlora adapter needs a 4-bit base"):
        get_kind("qlora").attach(base.model, QLoraSettings())


def test_bert_style_defaults():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=100))
    from training.methods.lora import default_targets

    assert default_targets(bert) == ["query", "key", "value", "dense"]
    x = torch.randint(0, 100, (1, 7))
    bert.eval()
    with torch.no_grad():
        ref = bert(input_ids=x).last_hidden_state
    model = get_kind("bottleneck").attach(bert, BottleneckSettings(placement="houlsby"))
    assert model.adapter_config["layers_path"] == "encoder.layer"
    assert model.adapter_config["sites"] == {"attn": "attention.output", "mlp": "output"}
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).last_hidden_state, ref)


def test_registry_of_kinds():
    pkg = Path(__import__("training.methods", fromlist=["x"]).__file__).parent
    modules = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_")}
    assert set(KINDS) == modules == {"lora", "qlora", "bottleneck", "dora"}
    init = (pkg / "__init__.py").read_text()
    assert "import lora" not in init and "from training.methods.lora" not in init  # kinds register themselves
    with pytest.raises(NotFoundError) as e:
        get_kind("prefix")
    assert str(e.value) == "unknown adapter kind 'prefix': use one of bottleneck, dora, lora, qlora"


@pytest.mark.parametrize("make,message", [
    (lambda: LoraSettings(r=0), "LoRA rank 0 is invalid: use a whole number >= 1 (e.g. 8)"),
    (lambda: LoraSettings(alpha=-1), "LoRA alpha -1 is invalid: use a number > 0 (e.g. 16)"),
    (lambda: LoraSettings(dropout=1.5), "LoRA dropout 1.5 is invalid: use a number in [0, 1)"),
    (lambda: QLoraSettings(compute_dtype="fp16"), "QLoRA compute dtype 'fp16' is invalid: use auto, fp32 or bf16"),
    (lambda: BottleneckSettings(placement="parallel"),
     "bottleneck placement 'parallel' is invalid: use pfeiffer or houlsby"),
    (lambda: BottleneckSettings(reduction_factor=0),
     "bottleneck reduction factor 0 is invalid: use a whole number >= 1 (e.g. 16)"),
    (lambda: BottleneckSettings(non_linearity="swish"),
     "bottleneck non-linearity 'swish' is invalid: use one of relu, gelu, silu, tanh"),
    (lambda: get_kind("lora").make_config(rank=4),
     "lora adapters have no option 'rank'; their options are: alpha, dropout, r, target_modules"),
])
def test_bad_configs_say_what_and_how_to_fix(make, message):
    with pytest.raises(BadInputError) as e:
        make()
    assert str(e.value) == message


def test_missing_modules_are_named(tiny_base):
    method, _, base = fresh(tiny_base, "bottleneck", {})
    with pytest.raises(BadInputError) as e:
        method.attach(base.model, BottleneckSettings(sites={"mlp": "ffn"}))
    assert str(e.value) == ("module model.layers.0.ffn does not exist in this architecture (the block has: self_attn, "
                            "mlp, input_layernorm, post_attention_layernorm); set sites to the block's attention/MLP "
                            "module names")
    with pytest.raises(BadInputError, match="has no module 'transformer.blocks' holding its blocks"):
        method.attach(base.model, BottleneckSettings(layers_path="transformer.blocks"))
    with pytest.raises(BadInputError, match="LoRA target module 'c_attn' does not exist in LlamaForCausalLM"):
        get_kind("lora").attach(base.model, LoraSettings(target_modules=["c_attn"]))


def test_artifact_match_rules_and_detection_without_importing_the_kinds():
    """True: present and truthy; False: absent or falsy; strings case-insensitive; others equal."""
    from training.methods import _declared, artifact_matches, detect_kind

    spec = {"peft_type": "LORA", "use_dora": False, "r": 8}
    assert artifact_matches(spec, {"peft_type": "lora", "r": 8})
    assert artifact_matches(spec, {"peft_type": "LORA", "use_dora": None, "r": 8})
    assert not artifact_matches(spec, {"peft_type": "LORA", "use_dora": True, "r": 8})
    assert not artifact_matches(spec, {"peft_type": "LORA", "r": 4})
    assert not artifact_matches(spec, {"peft_type": 7, "r": 8})
    assert artifact_matches({"use_dora": True}, {"use_dora": 1}) and not artifact_matches({"use_dora": True}, {})
    assert detect_kind({"peft_type": "LORA", "use_dora": True}) == "dora"
    assert detect_kind({"peft_type": "LORA"}) == "lora"
    assert detect_kind({"plait_adapter": "bottleneck"}) == "bottleneck"
    assert detect_kind({"peft_type": "IA3"}) is None
    assert _declared("qlora") == {"ARTIFACT_KIND": "lora"}  # writes lora's files: never detected as qlora
    for name, method in KINDS.items():  # the literal read from the source is what the module holds
        assert _declared(name).get("ARTIFACT_MATCH") == getattr(method.module, "ARTIFACT_MATCH", None)
