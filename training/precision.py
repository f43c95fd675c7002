"""Which precision `auto` means on this machine: measured once per workload, then cached.

CPU flags do not tell whether bf16 is the fast path. A CPU with AVX512-BF16 trained 2x
faster in bf16 on one machine, while on another 2-core machine with the same flag (and no
AMX) a 1024x576 @ 576x1536 matmul took 11.0 ms in bf16 against 6.0 ms in fp32 and
`plait train --dtype auto` ran at half the speed of fp32. So the rule is one measurement:

    on CUDA:  bf16 where the device supports it (no timing: tensor cores are faster at it)
    on a CPU: time fp32 against bf16 autocast on the workload's own shapes, interleaved,
              a few repeats (well under a second in all), and take bf16 only when its median is
              at least `BF16_MARGIN` faster; a tie keeps fp32, the exact path

per workload, because one may win in bf16 while another loses:

    train   forward + backward of a SmolLM2-shaped MLP block (576 -> 1536 -> 576, 128
            tokens), frozen weights, gradients flowing to the input (as through a LoRA base)
    encode  the router encoder's forward (all-MiniLM-L6-v2: 384 -> 1536 -> 384 and the
            attention projections, 512 tokens: a batch of 16 short inputs), no grad
    serve   one decode step of 8 rows through SmolLM2's MLP and a slice of its output head

The answer is cached in `$PLAIT_CACHE/precision.json` (default ~/.cache/plait), keyed by the
CPU's model name, the torch version and the workload, so a machine measures each once; an
unwritable cache only means measuring again next process. Within a process each workload is
decided once. `auto` everywhere goes through `choose`: the trainer's `--dtype auto`
(`training.evaluation.resolve_dtype`) and the router encoder's autocast
(`routing.routers.embedding.MiniLMEncoder`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from registry.errors import BadInputError

log = logging.getLogger("plait.precision")

WORKLOADS = {"train": "training", "encode": "the router encoder", "serve": "serving"}
"""The workloads `auto` is decided for, and how the announcement names each."""
BF16_MARGIN = 0.05
"""bf16 is chosen only when it is at least this much faster (a tie keeps fp32, the exact path)."""
REPEATS = 5
"""Most timed calls per precision, interleaved so load on the machine hits both alike."""
BUDGET_S = 0.3
"""Seconds of timing after which no further round starts (the first always runs)."""
CLEAR_GAP = 2.5
"""A ratio of medians above which further rounds cannot change the answer."""

Measure = Callable[[str], "tuple[float, float]"]
"""A function timing a workload: workload -> (fp32 ms, bf16 ms)."""


@dataclass(frozen=True)
class Choice:
    """The precision `auto` resolves to for one workload, and why."""

    workload: str
    """train, encode or serve."""
    dtype: str
    """fp32 or bf16."""
    reason: str
    """Why, in words (the measured figures, or the CUDA rule)."""
    fp32_ms: float | None = None
    """Median time of the workload in fp32 (None on CUDA)."""
    bf16_ms: float | None = None
    """Median time under bf16 autocast (None on CUDA)."""
    cached: bool = False
    """Read from the cache file rather than measured by this process."""

    def describe(self) -> str:
        """The one line plait prints, e.g. `precision auto: fp32 for training (bf16 11.0 ms vs fp32 6.0 ms ...)`."""
        return f"precision auto: {self.dtype} for {WORKLOADS[self.workload]} ({self.reason})"


_memo: dict[str, Choice] = {}
_announced: set[str] = set()
_lock = threading.Lock()


def choose(workload: str, *, device: str | None = None, measure: Measure | None = None,
           announce: bool = False) -> Choice:
    """The precision `auto` means for `workload` on this machine.

    Args:
        workload: train, encode or serve.
        device: cpu or cuda (default: cuda when available).
        measure: the timing function (default `measure_ms`; tests inject their figures).
        announce: print the choice and its reason to stderr (once per workload and process).

    Returns:
        The `Choice` (measured, or read from this process's memo or the machine's cache).

    Raises:
        BadInputError: an unknown workload.
    """
    if workload not in WORKLOADS:
        raise BadInputError(f"precision workload {workload!r} is unknown: use {', '.join(WORKLOADS)}")
    with _lock:  # two threads asking at once measure once
        choice = _decide(workload, device or _default_device(), measure or measure_ms)
        if workload not in _announced:
            _announced.add(workload)
            log.info(choice.describe())
            if announce:
                print(choice.describe(), file=sys.stderr)
    return choice


def forget() -> None:
    """Drop this process's decisions (the cache file stays); the next `choose` reads or measures again."""
    with _lock:
        _memo.clear()
        _announced.clear()


def _decide(workload: str, device: str, measure: Measure) -> Choice:
    if device == "cuda":
        import torch

        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return Choice(workload, "bf16" if ok else "fp32",
                      "the CUDA device supports bf16" if ok else "the CUDA device lacks bf16")
    key = machine_key(workload)
    if key in _memo:
        return _memo[key]
    choice = _read_cache(key, workload)
    if choice is None:
        fp32_ms, bf16_ms = measure(workload)
        choice = decide(workload, fp32_ms, bf16_ms)
        _write_cache(key, choice)
    _memo[key] = choice
    return choice


def decide(workload: str, fp32_ms: float, bf16_ms: float) -> Choice:
    """The rule: bf16 only when it is at least `BF16_MARGIN` faster than fp32.

    Args:
        workload: train, encode or serve.
        fp32_ms: median time in fp32.
        bf16_ms: median time under bf16 autocast.
    """
    dtype = "bf16" if bf16_ms <= fp32_ms * (1 - BF16_MARGIN) else "fp32"
    what = "step" if workload == "train" else "forward"
    reason = f"bf16 {what} {bf16_ms:.1f} ms vs fp32 {fp32_ms:.1f} ms on this CPU"
    return Choice(workload, dtype, reason, round(fp32_ms, 3), round(bf16_ms, 3))


# ----------------------------------------------------------------------------- the cache
def machine_key(workload: str) -> str:
    """The cache key: the CPU's model name, the torch version and the workload."""
    import torch

    return f"{cpu_model()} | torch {torch.__version__} | {workload}"


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`), or what `platform` knows elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def cache_path() -> Path:
    """`$PLAIT_CACHE/precision.json` (default ~/.cache/plait/precision.json)."""
    from training.base import cache_dir

    return cache_dir() / "precision.json"


def _read_all() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # absent, unreadable or torn: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _read_cache(key: str, workload: str) -> Choice | None:
    entry = _read_all().get(key)
    try:
        return Choice(workload, entry["dtype"], entry["reason"], entry["fp32_ms"], entry["bf16_ms"], cached=True) \
            if entry["dtype"] in ("fp32", "bf16") else None
    except (TypeError, KeyError):
        return None


def _write_cache(key: str, choice: Choice) -> None:
    """Add one answer to the cache file (atomic replace); an unwritable cache is only logged."""
    path = cache_path()
    entry = {k: v for k, v in asdict(choice).items() if k in ("dtype", "reason", "fp32_ms", "bf16_ms")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_all(), key: {**entry, "measured_at": int(time.time())}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("precision cache %s not written (%s); measuring again next time", path, e)


# ----------------------------------------------------------------------------- the measurement
def measure_ms(workload: str, repeats: int = REPEATS, budget_s: float = BUDGET_S) -> tuple[float, float]:
    """Time `workload` in fp32 and under bf16 autocast on the CPU: (fp32 ms, bf16 ms), medians.

    Both precisions first run once on a few rows (oneDNN picks and builds its kernels then,
    so no timed call pays for it). Then they alternate, one call each per round, so a
    neighbour's load on a shared machine lands on both; rounds stop after `repeats`, once
    `budget_s` is spent (at least one round runs), or after the first round when one
    precision is more than `CLEAR_GAP` times slower (a CPU without bf16 hardware emulates
    it, 10-20x slower: one round settles it).
    """
    import torch

    for tokens in (8, None):
        runs = _workload(workload, tokens)
        times: dict[bool, list[float]] = {False: [], True: []}
        start = time.perf_counter()
        for _ in range(repeats if tokens is None else 1):
            for bf16 in (False, True):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    runs()
                times[bf16].append((time.perf_counter() - t0) * 1000)
            fp32_ms, bf16_ms = statistics.median(times[False]), statistics.median(times[True])
            if time.perf_counter() - start > budget_s or max(fp32_ms / bf16_ms, bf16_ms / fp32_ms) > CLEAR_GAP:
                break
    return fp32_ms, bf16_ms


def _workload(workload: str, tokens: int | None = None) -> Callable[[], None]:
    """A function running one step of `workload` on its own shapes (module docstring); `tokens` rows if given."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)

    def linear(i: int, o: int) -> nn.Linear:
        layer = nn.Linear(i, o, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
        layer.weight.requires_grad_(False)  # a frozen base: gradients flow through, not into, it
        return layer

    if workload == "train":
        mlp = nn.Sequential(linear(576, 1536), nn.SiLU(), linear(1536, 576))
        x = torch.randn(tokens or 128, 576, generator=g, requires_grad=True)

        def step() -> None:
            mlp(x).float().square().mean().backward()
            x.grad = None
        return step
    if workload == "encode":
        attn, mlp = linear(384, 4 * 384), nn.Sequential(linear(384, 1536), nn.GELU(), linear(1536, 384))
        x = torch.randn(tokens or 16 * 32, 384, generator=g)

        def forward() -> None:
            with torch.inference_mode():
                mlp(attn(x)[:, :384])
        return forward
    mlp, head = nn.Sequential(linear(576, 1536), nn.SiLU(), linear(1536, 576)), linear(576, 8192)
    x = torch.randn(tokens or 8, 576, generator=g)

    def decode() -> None:
        with torch.inference_mode():
            head(mlp(x))
    return decode


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["BF16_MARGIN", "Choice", "WORKLOADS", "cache_path", "choose", "cpu_model", "decide", "forget",
           "machine_key", "measure_ms"]
