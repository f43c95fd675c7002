"""Forward transfer (`--init auto|base|REF`, training.warmstart) on a tiny pretrained Llama.

A random tiny base predicts so badly that almost any adapter lowers its loss on any text, so
these tests first pretrain the tiny base briefly on ordinary sentences (a real base knows its
language). Then an adapter trained on the new domain's kind of text is "related", and one
trained on the same letters with a 7 between every character is "conflicting": it predicts
a 7 where the new domain never has one, so it is worse than the base there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plait.cli import main
from registry.client import Registry
from registry.errors import BadInputError
from tests.train_helpers import write_jsonl
from training.methods import get_kind
from training.trainer import TrainConfig, train_domain
from training.warmstart import (BASELINE_DOMAIN, MAX_SAMPLE_TOKENS, SAMPLE_SHARE, SCORE_SHARE, find_candidates,
                                sample_examples, score_candidates)


def apple_rows(n: int = 24, offset: int = 0) -> list[dict]:
    return [{"text": f"apple apple number {(i + offset) % 4} says apple."} for i in range(n)]


def conflicting_rows() -> list[dict]:
    return [{"text": "7".join(r["text"])} for r in apple_rows()]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny Llama, pretrained for 150 full steps on plain sentences (tests.tiny.CORPUS)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.tiny import CORPUS, make_tiny_base

    out = make_tiny_base(tmp_path_factory.mktemp("pretrained") / "base")
    tok = AutoTokenizer.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out)
    texts = CORPUS[:4] + ["the zebra says hello to the fox.", "an apple a day, number one."]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(f"sqlite:///{tmp_path}/r.db", tmp_path / "artifacts")
    yield r
    r.close()


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(method="lora", steps=10, batch_size=4, max_length=48, lr=1e-2, dtype="fp32",
                                 progress=False), **kw})


def data(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    return write_jsonl(tmp_path / f"{name}.jsonl", rows)


def test_auto_starts_from_the_related_adapter_and_records_it(reg, base, tmp_path):
    train_domain(reg, base, "fruit", data(tmp_path, "fruit", apple_rows()), config=cfg())
    train_domain(reg, base, "sevens", data(tmp_path, "sevens", conflicting_rows()), config=cfg(steps=30))
    new = data(tmp_path, "orchard", apple_rows(offset=1))
    auto = train_domain(reg, base, "orchard", new, config=cfg(init="auto"))
    fresh = train_domain(reg, base, "orchard", new, config=cfg(init="base", name="orchard-fresh"))

    losses = auto.init.losses
    assert set(losses) == {"base", "fruit:1", "sevens:1"}
    assert losses["fruit:1"] < losses["base"] < losses["sevens:1"]  # related helps, conflicting hurts
    assert auto.init.ref == "fruit:1" and 0 < auto.init.seconds < 5 and auto.init.sample_tokens > 0
    v = auto.version
    assert v.parents == [{"ref": "fruit:1", "relation": "warm-start", "weight": None}]
    assert v.config["init"] == "auto" and v.config["warm_start"] == "fruit:1"
    assert v.config["init_candidates"] == pytest.approx(losses)
    assert v.config["init_seconds"] == pytest.approx(auto.init.seconds) and v.config["init_sample_tokens"] > 0
    assert reg.get_lineage("orchard:1", "up")["edges"][0]["relation"] == "warm-start"
    # the forward transfer bought: the warm start begins (and ends) lower than a fresh adapter
    assert auto.losses[0] < fresh.losses[0] - 0.3
    assert auto.metrics["eval_loss"] < fresh.metrics["eval_loss"]
    assert fresh.init.ref is None and fresh.version.config["init"] == "base"
    assert "init_seconds" not in fresh.version.config and "init_candidates" not in fresh.version.config
    assert fresh.version.parents[0]["relation"] == "trained-from-base"


def test_auto_starts_fresh_when_no_candidate_beats_the_base(reg, base, tmp_path):
    """A conflicting adapter is scored, loses to the base, and the run is bit-identical to --init base."""
    train_domain(reg, base, "sevens", data(tmp_path, "sevens", conflicting_rows()), config=cfg(steps=30))
    new = data(tmp_path, "orchard", apple_rows(offset=1))
    auto = train_domain(reg, base, "orchard", new, config=cfg(init="auto"))
    assert auto.init.ref is None and set(auto.init.losses) == {"base", "sevens:1"}
    assert auto.init.losses["sevens:1"] > auto.init.losses["base"]
    assert auto.version.parents[0]["relation"] == "trained-from-base"
    # scoring left no trace on the base or the seeded init: the same bytes as a fresh run in an empty registry
    empty = Registry(f"sqlite:///{tmp_path}/empty.db", tmp_path / "empty-artifacts")
    fresh = train_domain(empty, base, "orchard", new, config=cfg(init="base"))
    assert fresh.version.sha256 == auto.version.sha256 and fresh.losses == auto.losses
    empty.close()


def _bottleneck_artifact(base: Path, out: Path) -> Path:
    method = get_kind("bottleneck")
    model = method.attach(method.load_base(base).model, method.make_config(reduction_factor=4))
    return method.save(model, out)


def test_candidates_are_newest_real_versions_of_a_kind_that_can_seed(reg, base, tmp_path, tiny_loras, tiny_base):
    from training.base import fingerprint

    fp = fingerprint(base)
    bneck = _bottleneck_artifact(base, tmp_path / "bneck")
    reg.register_version("fruit", domain="fruit", kind="lora", files=tiny_loras[0], base_fingerprint=fp)
    reg.register_version("fruit", domain="fruit", kind="lora", files=tiny_loras[1], base_fingerprint=fp)
    reg.register_version("four", domain="four", kind="qlora", files=tiny_loras[2], base_fingerprint=fp)
    reg.register_version("seq", domain=BASELINE_DOMAIN, kind="lora", files=tiny_loras[3], base_fingerprint=fp)
    reg.register_version("gone", domain="gone", kind="lora", files=tiny_loras[3], base_fingerprint=fp)
    reg.archive("gone:1")
    reg.import_peft(tiny_loras[3], name="imported", domain="law", base_fingerprint=fp)
    reg.register_version("elsewhere", domain="law", kind="lora", files=tiny_loras[3],
                         base_fingerprint=fingerprint(tiny_base))
    reg.register_version("bn", domain="fruit", kind="bottleneck", files=bneck, base_fingerprint=fp)

    def refs(kind: str, given: dict | None = None) -> list[str]:
        return [info.ref for info, _ in find_candidates(reg, get_kind(kind), fp, given or {})]

    # newest first; only the newest version of an adapter; never a baseline, archived, import or other base
    assert refs("lora") == ["four:1", "fruit:2"]
    assert refs("qlora") == ["four:1", "fruit:2"]  # LoRA and QLoRA seed each other
    assert refs("bottleneck") == ["bn:1"]  # a bottleneck only from a bottleneck
    assert refs("lora", {"r": 4}) == ["four:1", "fruit:2"] and refs("lora", {"r": 8}) == []
    assert refs("lora", {"target_modules": ["v_proj", "q_proj"]}) == ["four:1", "fruit:2"]
    assert refs("lora", {"target_modules": ["q_proj"]}) == []


def _noisy_bottleneck(base: Path, out: Path, seed: int) -> Path:
    """A bottleneck artifact whose weights all differ from their init (a fresh one leaves outputs unchanged)."""
    method = get_kind("bottleneck")
    model = method.attach(method.load_base(base).model, method.make_config(reduction_factor=4))
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return method.save(model, out)


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_stacked_scores_equal_the_one_at_a_time_scores(reg, tiny_base, tiny_loras, tmp_path, kind):
    """The candidates held side by side in the engine stackers score what peft-loading each one scores."""
    from training.base import fingerprint
    from training.data import Example
    from training.methods._stacking import LinearSite

    fp = fingerprint(tiny_base)
    if kind == "lora":  # a QLoRA candidate too: LoRA and QLoRA share one stacker (and seed each other)
        for i, files in enumerate(tiny_loras[:3]):
            reg.register_version(f"d{i}", domain=f"d{i}", kind="qlora" if i == 1 else "lora", files=files,
                                 base_fingerprint=fp)
    else:
        for i in range(2):
            reg.register_version(f"b{i}", domain=f"b{i}", kind="bottleneck", base_fingerprint=fp,
                                 files=_noisy_bottleneck(tiny_base, tmp_path / f"bn{i}", seed=i))
    method = get_kind(kind)
    candidates = find_candidates(reg, method, fp, {})
    model = method.load_base(tiny_base).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = [Example(tuple(range(3 + i, 30 + i)), tuple([-100] * 2 + list(range(5 + i, 30 + i))))
              for i in range(5)]
    kw = dict(pad_id=0, batch_size=2)
    stacked, tokens = score_candidates(model, method, candidates, sample, **kw)
    one_by_one, tokens2 = score_candidates(model, method, candidates, sample, stacked=False, **kw)
    assert set(stacked) == {"base", *(info.ref for info, _ in candidates)} and len(stacked) == (4 if kind == "lora" else 3)
    assert tokens == tokens2 == 5 * 25
    for ref, loss in one_by_one.items():
        assert stacked[ref] == pytest.approx(loss, abs=1e-5), ref
        assert ref == "base" or abs(loss - one_by_one["base"]) > 1e-3  # each candidate changes the outputs
    # the stackers took everything off again: the bare base, its weights untouched
    assert not any(isinstance(m, LinearSite) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert score_candidates(model, method, candidates, sample, **kw)[0] == stacked  # and scores the same again


def test_a_bottleneck_is_never_scored_for_a_lora(reg, base, tmp_path):
    rows = data(tmp_path, "fruit", apple_rows())
    train_domain(reg, base, "fruitbn", rows, config=cfg(method="bottleneck", lr=2e-2))
    lora = train_domain(reg, base, "orchard", rows, config=cfg(init="auto"))
    assert lora.init.losses == {} and lora.init.ref is None  # no candidate at all: nothing scored
    bn = train_domain(reg, base, "orchardbn", rows, config=cfg(method="bottleneck", lr=2e-2, init="auto"))
    assert set(bn.init.losses) == {"base", "fruitbn:1"} and bn.init.ref == "fruitbn:1"


def test_resume_keeps_the_choice(reg, base, tmp_path):
    train_domain(reg, base, "fruit", data(tmp_path, "fruit", apple_rows()), config=cfg())
    new = data(tmp_path, "orchard", apple_rows(offset=1))
    ckpt = tmp_path / "ckpt"

    def stop_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_domain(reg, base, "orchard", new, checkpoint_dir=ckpt, on_step=stop_at_5,
                     config=cfg(init="auto", steps=7, checkpoint_every=2))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    recorded = state["run_key"]["init_choice"]
    assert recorded["ref"] == "fruit:1"
    # a better candidate appears (trained on the new domain's own rows); the resumed run does not re-score
    train_domain(reg, base, "twin", new, config=cfg(steps=20))
    resumed = train_domain(reg, base, "orchard", new, checkpoint_dir=ckpt,
                           config=cfg(init="auto", steps=7, checkpoint_every=2, resume=True))
    assert resumed.init.to_dict() == recorded
    assert resumed.version.parents == [{"ref": "fruit:1", "relation": "warm-start", "weight": None}]
    assert set(resumed.version.config["init_candidates"]) == {"base", "fruit:1"}
    with pytest.raises(KeyboardInterrupt):
        train_domain(reg, base, "orchard", new, checkpoint_dir=ckpt, on_step=stop_at_5,
                     config=cfg(init="auto", steps=7, checkpoint_every=2, name="again"))
    with pytest.raises(BadInputError, match="is from a run with other init"):
        train_domain(reg, base, "orchard", new, checkpoint_dir=ckpt,
                     config=cfg(init="base", steps=7, checkpoint_every=2, name="again", resume=True))


def test_init_settings_are_checked():
    assert TrainConfig().init == "base" and TrainConfig(from_ref="law:2").init == "law:2"
    assert TrainConfig(init="law@prod").from_ref == "law@prod"
    assert TrainConfig(init="law:2", from_ref="law:2").from_ref == "law:2"
    with pytest.raises(BadInputError, match="init base and from_ref law:2 disagree"):
        TrainConfig(init="base", from_ref="law:2")
    with pytest.raises(BadInputError, match="init 'law:02' is invalid: use auto, base or a version"):
        TrainConfig(init="law:02")


def test_the_sample_keeps_to_the_budget():
    from training.data import Example

    examples = [Example(tuple(range(50)), tuple(range(50))) for _ in range(100)]
    train_tokens = 16 * 4 * 50
    for passes in (1, 3, 6):
        picked = sample_examples(examples, passes, train_tokens, seed=0)
        budget = min(MAX_SAMPLE_TOKENS, SAMPLE_SHARE * 2 * train_tokens / passes)  # a forward = half a step
        assert SAMPLE_SHARE == 0.75 * SCORE_SHARE
        assert sum(len(e.input_ids) for e in picked) <= budget < sum(len(e.input_ids) for e in picked) + 50
    assert len(sample_examples(examples, 50, 100, seed=0)) == 1  # at least one example, whatever the budget
    assert sample_examples(examples, 2, train_tokens, 0) == sample_examples(examples, 2, train_tokens, 0)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_init(workspace, tmp_path, capsys):
    w = ["--workspace", workspace.path]
    rows = data(tmp_path, "law", [{"text": f"the court ruled on case {i} today"} for i in range(16)])
    common = ["--data", rows, "--steps", 2, "--max-length", 32, "--dtype", "fp32", "--no-audit", *w]
    code, out, err = cli(capsys, "train", "law", *common)
    assert code == 0, err
    assert "init        auto: fresh adapter (no candidate" in out
    code, out, err = cli(capsys, "train", "law", *common, "--json")
    assert code == 0, err
    init = json.loads(out)["train"]["init"]
    assert init["init"] == "auto" and set(init["losses"]) == {"base", "law:1"}
    for args, message in [
        (["--init", "nope:9"], "error: no adapter named 'nope'"),
        (["--init", "base", "--from", "law:1"], "error: --init base and --from law:1 disagree"),
        (["--init", "law:0"], "error: --init 'law:0' is invalid: use auto, base or a version"),
    ]:
        code, out, err = cli(capsys, "train", "law", *common, *args)
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
