"""Precision chosen by measurement (issue 16, item 6): the rule, the cache, and everything that says `auto`.

The timing is injected (`measure=`) to force each outcome; one test runs the real
measurement on this machine and checks it stays well under a second or two.
"""

from __future__ import annotations

import json
import time

import pytest

from registry.errors import BadInputError
from training import precision
from training.precision import Choice, cache_path, choose, decide, machine_key, measure_ms


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test: its own cache folder and no decision remembered by the process."""
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    precision.forget()
    yield
    precision.forget()  # later tests in this process measure for real, not with these figures


class Timer:
    """A measurement that returns fixed figures per workload and counts its calls."""

    def __init__(self, **figures: tuple[float, float]):
        self.figures = figures
        self.calls: list[str] = []

    def __call__(self, workload: str) -> tuple[float, float]:
        self.calls.append(workload)
        return self.figures[workload]


@pytest.mark.parametrize("fp32_ms, bf16_ms, expected", [
    (6.0, 11.0, "fp32"),    # bf16 slower (AVX512-BF16 without AMX)
    (10.0, 4.0, "bf16"),    # bf16 2.5x faster
    (10.0, 9.5, "bf16"),    # exactly the margin: 5% faster
    (10.0, 9.6, "fp32"),    # a near tie keeps the exact path
    (10.0, 10.0, "fp32"),
])
def test_the_rule(fp32_ms, bf16_ms, expected):
    assert decide("train", fp32_ms, bf16_ms).dtype == expected


def test_each_outcome_flows_to_every_auto(monkeypatch):
    from routing.routers.embedding import MiniLMEncoder
    from training.evaluation import fast_bf16, resolve_dtype

    timer = Timer(train=(6.0, 11.0), encode=(10.0, 4.0), serve=(3.0, 3.0))
    monkeypatch.setattr(precision, "measure_ms", timer)
    assert resolve_dtype("auto") == "fp32" and not fast_bf16("train")
    assert MiniLMEncoder(bf16=None).bf16 is True and fast_bf16("encode")
    assert resolve_dtype("auto", "serve") == "fp32"
    assert resolve_dtype("bf16") == "bf16" and resolve_dtype("fp32") == "fp32"  # explicit is never measured
    assert MiniLMEncoder().bf16 is False  # the plain encoder's default stays fp32
    assert timer.calls == ["train", "encode", "serve"]  # once per workload and process


def test_the_answer_is_cached_per_machine_and_workload():
    import torch

    other = "Some Other CPU | torch 0.0 | train"  # another machine sharing the cache folder
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text(json.dumps({other: {"dtype": "bf16", "reason": "r", "fp32_ms": 2.0, "bf16_ms": 1.0}}))
    timer = Timer(train=(6.0, 11.0), encode=(10.0, 4.0))
    first = choose("train", measure=timer, device="cpu")
    assert first == Choice("train", "fp32", "bf16 step 11.0 ms vs fp32 6.0 ms on this CPU", 6.0, 11.0, cached=False)
    assert choose("encode", measure=timer, device="cpu").dtype == "bf16"
    assert choose("train", measure=timer, device="cpu") is first  # decided once per process
    assert timer.calls == ["train", "encode"]
    stored = json.loads(cache_path().read_text())
    assert set(stored) == {other, machine_key("train"), machine_key("encode")}
    assert machine_key("train") == f"{precision.cpu_model()} | torch {torch.__version__} | train"
    assert stored[machine_key("encode")]["dtype"] == "bf16" and stored[machine_key("encode")]["bf16_ms"] == 4.0
    precision.forget()  # a new process: read from the file, not measured again
    again = choose("train", measure=timer, device="cpu")
    assert again.dtype == "fp32" and again.cached and again.reason == first.reason
    assert timer.calls == ["train", "encode"]


@pytest.mark.parametrize("damage", ["not json {", "[1, 2]", '{"%s": {"dtype": "fp16"}}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(damage):
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text(damage.replace("%s", machine_key("train")))
    timer = Timer(train=(10.0, 4.0))
    assert choose("train", measure=timer, device="cpu").dtype == "bf16" and timer.calls == ["train"]
    assert json.loads(cache_path().read_text())[machine_key("train")]["dtype"] == "bf16"


def test_an_unwritable_cache_still_decides(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PLAIT_CACHE", str(blocker / "cache"))  # under a file: nothing can be made there
    timer = Timer(train=(6.0, 11.0))
    assert choose("train", measure=timer, device="cpu").dtype == "fp32"
    precision.forget()
    assert choose("train", measure=timer, device="cpu").dtype == "fp32"
    assert timer.calls == ["train", "train"]  # nothing was cached, so it measured again


def test_it_says_what_it_chose_and_why_once(capsys):
    timer = Timer(train=(6.0, 11.0))
    choose("train", measure=timer, device="cpu", announce=True)
    choose("train", measure=timer, device="cpu", announce=True)
    err = capsys.readouterr().err
    assert err == "precision auto: fp32 for training (bf16 step 11.0 ms vs fp32 6.0 ms on this CPU)\n"


def test_cuda_keeps_bf16_where_supported_without_timing():
    import torch

    timer = Timer()
    c = choose("train", measure=timer, device="cuda")
    ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert c.dtype == ("bf16" if ok else "fp32") and timer.calls == [] and c.fp32_ms is None
    assert not cache_path().exists()


def test_an_unknown_workload_is_refused():
    with pytest.raises(BadInputError) as e:
        choose("infer")
    assert str(e.value) == "precision workload 'infer' is unknown: use train, encode, serve"


def test_the_real_measurement_is_quick_and_sane():
    for workload in precision.WORKLOADS:
        t = time.perf_counter()
        fp32_ms, bf16_ms = measure_ms(workload)
        took = time.perf_counter() - t
        assert 0 < fp32_ms < 1000 and 0 < bf16_ms < 5000, (workload, fp32_ms, bf16_ms)
        assert took < 3.0, (workload, took)  # ~0.2-0.8 s on the shared 2-core CPU


def test_the_trainer_records_the_measured_choice(tmp_path, tiny_base, monkeypatch):
    from registry.client import Registry
    from tests.train_helpers import write_jsonl
    from training.trainer import TrainConfig, train_domain

    monkeypatch.setattr(precision, "measure_ms", Timer(train=(10.0, 4.0)))
    reg = Registry(f"sqlite:///{tmp_path}/r.db", tmp_path / "artifacts")
    rows = [{"text": f"apple apple number {i % 4} says apple."} for i in range(24)]
    res = train_domain(reg, tiny_base, "apples", write_jsonl(tmp_path / "a.jsonl", rows),
                       config=TrainConfig(method="lora", steps=2, batch_size=4, max_length=32, dtype="auto",
                                          progress=False))
    assert res.version.config["dtype"] == "bf16"
    reg.close()
