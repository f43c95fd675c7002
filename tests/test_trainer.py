"""The incremental trainer end to end on a tiny seeded Llama and a real SQLite registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import write_jsonl
from registry.client import Registry
from registry.errors import BadInputError, IncompatibleBaseError, NotFoundError
from training.data import load_domain_data
from training.methods import get_kind
from training.trainer import (TrainConfig, check_only_adapter_trainable, fast_bf16, resolve_dtype, train_domain)

METRICS = {"eval_loss", "eval_perplexity", "base_eval_loss", "train_tokens_per_s", "peak_rss_mb", "trainable_params"}
KINDS = [("lora", {}, 1e-2), ("qlora", {}, 1e-2), ("bottleneck", {"placement": "pfeiffer", "reduction_factor": 4}, 2e-2),
         ("bottleneck", {"placement": "houlsby", "reduction_factor": 4}, 2e-2)]
IDS = ["lora", "qlora", "pfeiffer", "houlsby"]
X = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(5))


def domain_rows(word: str, n: int = 24) -> list[dict]:
    return [{"text": f"{word} {word} number {i % 4} says {word}."} for i in range(n)]


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(f"sqlite:///{tmp_path}/r.db", tmp_path / "artifacts")
    yield r
    r.close()


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return {"a": write_jsonl(tmp_path / "a.jsonl", domain_rows("apple")),
            "b": write_jsonl(tmp_path / "b.jsonl", domain_rows("zebra"))}


def cfg(kind: str, options: dict, lr: float, **kw) -> TrainConfig:
    base = dict(method=kind, method_options=options, steps=10, batch_size=4, max_length=48, lr=lr, dtype="fp32",
                progress=False)
    return TrainConfig(**{**base, **kw})


def outputs_of(reg: Registry, ref: str, tiny_base) -> torch.Tensor:
    """Load a registered version onto a fresh base (through the registry's verified path) and run it."""
    info, path = reg.artifact_path(ref)
    method = get_kind(info.kind)
    settings = method.read_config(path)
    model = method.load(method.load_base(tiny_base, settings).model, path)
    model.eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def artifact_bytes(reg: Registry, ref: str) -> dict[str, bytes]:
    _, path = reg.artifact_path(ref)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("kind,options,lr", KINDS, ids=IDS)
def test_train_register_and_leave_earlier_domains_untouched(reg, data, tiny_base, kind, options, lr):
    a = train_domain(reg, tiny_base, "apples", data["a"], config=cfg(kind, options, lr))
    losses = a.losses
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.25, losses
    assert set(a.metrics) == METRICS
    assert a.metrics["eval_loss"] < a.metrics["base_eval_loss"] - 0.2
    assert a.metrics["eval_perplexity"] == pytest.approx(torch.tensor(a.metrics["eval_loss"]).exp().item())
    assert a.metrics["trainable_params"] == sum(p.numel() for p in a.model.parameters() if p.requires_grad)
    assert a.metrics["train_tokens_per_s"] > 0 and a.metrics["peak_rss_mb"] > 100
    v = reg.get_version("apples:1")
    assert v.kind == kind and v.domain == "apples" and v.config["base_quantized"] == (kind == "qlora")
    assert v.parents == [{"base": v.base_fingerprint, "relation": "trained-from-base", "weight": None}]
    assert v.data_fingerprint.startswith("sha256:")
    assert {m["name"] for m in reg.get_metrics("apples:1")} == METRICS
    assert sorted(artifact_bytes(reg, "apples:1")) == ["adapter_config.json", "adapter_model.safetensors"]

    # the base is bit-identical to a fresh load after training
    fresh = get_kind(kind).load_base(tiny_base, get_kind(kind).make_config(**options)).model
    trained_base = a.model.base if kind == "bottleneck" else a.model.get_base_model()
    names = {n.replace(".base_layer", ""): p for n, p in trained_base.named_parameters() if "lora_" not in n}
    for n, p in fresh.named_parameters():
        assert torch.equal(names[n], p), n
    # the registered artifact reproduces the trained model's outputs
    a.model.eval()
    with torch.no_grad():
        live = a.model(input_ids=X).logits
    a_out = outputs_of(reg, "apples:1", tiny_base)
    assert torch.equal(a_out, live)
    a_bytes = artifact_bytes(reg, "apples:1")

    b = train_domain(reg, tiny_base, "zebras", data["b"], config=cfg(kind, options, lr))
    assert b.version.ref == "zebras:1"
    assert artifact_bytes(reg, "apples:1") == a_bytes
    assert torch.equal(outputs_of(reg, "apples:1", tiny_base), a_out)
    assert not torch.equal(outputs_of(reg, "zebras:1", tiny_base), a_out)


@pytest.mark.parametrize("kind,options,lr", [KINDS[0], KINDS[2]], ids=["lora", "pfeiffer"])
def test_resume_continues_bit_exactly(reg, data, tiny_base, tmp_path, kind, options, lr):
    from safetensors.torch import load_file

    straight = train_domain(reg, tiny_base, "apples", data["a"],
                            config=cfg(kind, options, lr, name="straight", steps=7, checkpoint_every=2))

    class Crash(Exception):
        pass

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt, on_step=crash_at_5,
                     config=cfg(kind, options, lr, name="resumed", steps=7, checkpoint_every=2))
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.safetensors").is_file()
    assert not list(ckpt.rglob("*.bin")) and not list(ckpt.rglob("*.pt"))
    with pytest.raises(NotFoundError, match="no adapter named 'resumed'"):
        reg.get_version("resumed")  # nothing registered by the crashed run
    with pytest.raises(BadInputError, match="is from a run with other lr"):
        train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt,
                     config=cfg(kind, options, lr * 2, name="resumed", steps=7, checkpoint_every=2, resume=True))
    resumed = train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt,
                           config=cfg(kind, options, lr, name="resumed", steps=7, checkpoint_every=2, resume=True))
    assert resumed.losses == straight.losses
    t1 = load_file(str(reg.artifact_path("straight:1")[1] / "adapter_model.safetensors"))
    t2 = load_file(str(reg.artifact_path("resumed:1")[1] / "adapter_model.safetensors"))
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert not ckpt.exists()  # removed once the version is registered
    with pytest.raises(NotFoundError, match="no checkpoint to resume"):
        train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt,
                     config=cfg(kind, options, lr, name="resumed", resume=True))


# (fault point, the checkpoint `--resume` must continue from): the second checkpoint (step 4 of
# 7) is cut short at each point of its replacement of the first (step 2)
CHECKPOINT_FAULTS = [("checkpoint.write", 2),  # the temp folder is partial: ignored
                     ("checkpoint.before_swap", 4),  # the temp folder is complete, nothing moved yet
                     ("checkpoint.swap", 4),  # step 2 moved aside to .NAME.old, step 4 not in place
                     ("checkpoint.before_cleanup", 4)]  # step 4 in place, .NAME.old still there


@pytest.mark.parametrize("point,resumes_at", CHECKPOINT_FAULTS, ids=[p for p, _ in CHECKPOINT_FAULTS])
def test_checkpoint_replacement_survives_a_crash_at_each_point(reg, data, tiny_base, tmp_path, monkeypatch,
                                                                point, resumes_at):
    """A crash anywhere in the replacement of a checkpoint leaves a complete one (the newest that
    is complete is taken; partial temp folders are skipped), and the resumed run is bit-exact."""
    from safetensors.torch import load_file

    import registry.store as store_mod
    from training.trainer import latest_checkpoint, read_checkpoint_state

    run = dict(steps=7, checkpoint_every=2)
    straight = train_domain(reg, tiny_base, "apples", data["a"], config=cfg("lora", {}, 1e-2, name="straight", **run))

    class Crash(BaseException):  # stands for SIGKILL: nothing on the way out cleans up
        pass

    seen = []

    def crash(at: str) -> None:
        seen.append(at)
        # "checkpoint.swap" is first reached by the second checkpoint (the first has nothing to move)
        if at == point and seen.count(at) == (1 if point == "checkpoint.swap" else 2):
            raise Crash

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(store_mod, "_fault_hook", crash)
    with pytest.raises(Crash):
        train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt,
                     config=cfg("lora", {}, 1e-2, name="resumed", **run))
    monkeypatch.setattr(store_mod, "_fault_hook", None)
    left = sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name)
    assert ("ckpt" in left) == (point != "checkpoint.swap")  # the window the old code could not resume from
    assert any(n.startswith(".ckpt.tmp-") for n in left) == (point != "checkpoint.before_cleanup")
    found = latest_checkpoint(ckpt)
    assert found is not None and read_checkpoint_state(found)["step"] == resumes_at, left

    resumed = train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt,
                           config=cfg("lora", {}, 1e-2, name="resumed", resume=True, **run))
    assert resumed.losses == straight.losses
    t1 = load_file(str(reg.artifact_path("straight:1")[1] / "adapter_model.safetensors"))
    t2 = load_file(str(reg.artifact_path("resumed:1")[1] / "adapter_model.safetensors"))
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert [p.name for p in tmp_path.iterdir() if "ckpt" in p.name] == []  # slot, .old and temps all gone


def test_a_damaged_checkpoint_is_skipped_for_an_older_complete_one(reg, data, tiny_base, tmp_path):
    """A checkpoint whose files do not match the sizes and hashes its state lists (a torn write) is
    not resumed from; the older complete one is, and with none complete `--resume` says so."""
    from training.trainer import latest_checkpoint, read_checkpoint_state

    ckpt = tmp_path / "ckpt"

    def stop_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt, on_step=stop_at_5,
                     config=cfg("lora", {}, 1e-2, name="torn", steps=7, checkpoint_every=2))
    assert read_checkpoint_state(latest_checkpoint(ckpt))["step"] == 4 and not ckpt.with_name(".ckpt.old").exists()
    import shutil

    shutil.copytree(ckpt, ckpt.with_name(".ckpt.old"))  # an older complete copy, as a crash mid-swap leaves
    state_file = ckpt.with_name(".ckpt.old") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": 2}))
    weights = ckpt / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # torn
    assert latest_checkpoint(ckpt) == ckpt.with_name(".ckpt.old")
    (ckpt.with_name(".ckpt.old") / "rng.safetensors").write_bytes(b"")
    assert latest_checkpoint(ckpt) is None
    with pytest.raises(NotFoundError, match="no checkpoint to resume"):
        train_domain(reg, tiny_base, "apples", data["a"], checkpoint_dir=ckpt,
                     config=cfg("lora", {}, 1e-2, name="torn", steps=7, checkpoint_every=2, resume=True))


def test_warm_start_records_lineage_and_starts_lower(reg, data, tiny_base):
    first = train_domain(reg, tiny_base, "apples", data["a"], config=cfg("lora", {}, 1e-2))
    warm = train_domain(reg, tiny_base, "apples", data["a"], config=TrainConfig(
        from_ref="apples:1", steps=3, batch_size=4, max_length=48, lr=1e-2, dtype="fp32", progress=False))
    assert warm.version.ref == "apples:2" and warm.version.kind == "lora"
    assert warm.version.parents == [{"ref": "apples:1", "relation": "warm-start", "weight": None}]
    assert warm.losses[0] < first.losses[0] - 0.2
    # the first run froze the domain's eval split; later runs keep it
    frozen = reg.get_domain_eval("apples")
    assert frozen == [{"text": r.text} for r in load_domain_data(data["a"]).eval]
    with pytest.raises(BadInputError, match=r"adapter 'apples' is a lora adapter of domain 'apples'; a bottleneck"):
        train_domain(reg, tiny_base, "apples", data["a"], config=TrainConfig(method="bottleneck", steps=1))
    with pytest.raises(BadInputError, match=r"a warm start keeps the shape of apples:1; give no rank or kind options"):
        train_domain(reg, tiny_base, "apples", data["a"], config=TrainConfig(from_ref="apples:1", rank=4))
    with pytest.raises(BadInputError, match="apples:1 is a lora adapter; warm-start it as adapter kind lora"):
        train_domain(reg, tiny_base, "apples", data["a"], config=TrainConfig(method="bottleneck", from_ref="apples:1"))


def test_warm_start_refuses_another_base(reg, data, tiny_base, tmp_path):
    from tests.tiny import make_tiny_base

    train_domain(reg, tiny_base, "apples", data["a"], config=cfg("lora", {}, 1e-2, steps=2))
    other = make_tiny_base(tmp_path / "other", seed=1)
    with pytest.raises(IncompatibleBaseError, match="adapter apples:1 was trained on base sha256:"):
        train_domain(reg, other, "apples", data["a"], config=cfg("lora", {}, 1e-2, from_ref="apples:1", method=None))


def test_run_is_logged_to_mlflow(tmp_path, data, tiny_base):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reg = Registry(f"sqlite:///{tmp_path}/r.db", tmp_path / "artifacts", tracking_uri=uri)
    res = train_domain(reg, tiny_base, "apples", data["a"], config=cfg("bottleneck", {}, 2e-2, steps=4))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "bottleneck" and run.data.params["domain"] == "apples"
    assert run.data.metrics["eval_loss"] == pytest.approx(res.metrics["eval_loss"])
    history = client.get_metric_history(res.mlflow_run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(res.losses)
    assert {f.path for f in client.list_artifacts(res.mlflow_run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert reg.get_version("apples:1").mlflow_run_id == res.mlflow_run_id
    reg.close()


def test_bf16_autocast_trains(reg, data, tiny_base):
    assert resolve_dtype("auto") == ("bf16" if fast_bf16() else "fp32")
    res = train_domain(reg, tiny_base, "apples", data["a"], config=cfg("lora", {}, 1e-2, dtype="bf16", steps=8))
    assert res.version.config["dtype"] == "bf16"
    assert res.losses[-1] < res.losses[0] - 0.25


def test_prompt_completion_data_trains(reg, tmp_path, tiny_base):
    rows = [{"prompt": f"Q{i}: colour?", "completion": " blue"} for i in range(12)]
    res = train_domain(reg, tiny_base, "colours", write_jsonl(tmp_path / "p.jsonl", rows),
                       config=cfg("lora", {}, 1e-2, steps=8, rank=4))
    assert res.version.config["adapter"]["r"] == 4
    assert res.metrics["eval_loss"] < res.metrics["base_eval_loss"] - 0.5


def test_only_the_adapter_may_train(tiny_base):
    method = get_kind("lora")
    base = method.load_base(tiny_base)
    before = dict(base.model.named_parameters())
    model = method.attach(base.model, method.make_config())
    r, h, i = 8, 64, 128  # rank, hidden, intermediate; A is [r, in], B is [out, r]
    per_layer = 4 * (r * h + h * r) + 2 * (r * h + i * r) + (r * i + h * r)  # q,k,v,o + gate,up + down
    assert check_only_adapter_trainable(model, before) == 2 * per_layer
    model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.requires_grad_(True)
    from registry.errors import PlaitError

    with pytest.raises(PlaitError, match=r"base parameter .*layers\.0\.mlp\.up_proj\.base_layer\.weight is trainable"):
        check_only_adapter_trainable(model, before)


@pytest.mark.parametrize("kw,message", [
    ({"steps": 5, "epochs": 1}, "give the step count (5) or the epoch count (1), not both"),
    ({"steps": 0}, "steps 0 is invalid: use a whole number >= 1"),
    ({"dtype": "fp16"}, "dtype 'fp16' is invalid: use auto, fp32 or bf16"),
    ({"method": "prefix"}, "unknown adapter kind 'prefix': use one of bottleneck, dora, lora, qlora"),
    ({"lr": 5}, "learning rate 5 is invalid: use a number between 0 and 1 (e.g. 2e-4)"),
    ({"from_ref": "a:b"}, "invalid version 'b' in reference 'a:b': versions are whole numbers from 1"),
    ({"name": "a/b"}, "invalid adapter name 'a/b': use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                      "or digit (no '/', '..', spaces or control characters)"),
])
def test_bad_train_configs(kw, message):
    with pytest.raises(BadInputError) as e:
        TrainConfig(**kw)
    assert str(e.value) == message


def test_bad_rank_reaches_the_kind(reg, data, tiny_base):
    with pytest.raises(BadInputError, match="LoRA alpha 0 is invalid"):
        train_domain(reg, tiny_base, "apples", data["a"], config=cfg("lora", {"alpha": 0}, 1e-2))
    with pytest.raises(BadInputError, match="bottleneck reduction factor 128 leaves no units for hidden size 64"):
        train_domain(reg, tiny_base, "apples", data["a"], config=cfg("bottleneck", {"reduction_factor": 128}, 1e-2))


def test_load_version_checks_the_base_and_reproduces_the_metric(reg, data, tiny_base, tmp_path):
    from tests.tiny import make_tiny_base
    from training.load import eval_loss, eval_split, load_version

    res = train_domain(reg, tiny_base, "apples", data["a"], config=cfg("qlora", {}, 1e-2, steps=4))
    model, info, loaded = load_version(reg, "apples", tiny_base)
    assert info.ref == "apples:1" and loaded.quantized
    got = eval_loss(model, loaded.tokenizer, eval_split(data["a"]), max_length=48, dtype="fp32", kind="qlora")
    assert got["loss"] == pytest.approx(res.metrics["eval_loss"], rel=1e-6)
    with pytest.raises(IncompatibleBaseError):
        load_version(reg, "apples:1", make_tiny_base(tmp_path / "other", seed=3))
