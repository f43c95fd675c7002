"""Adapter residency (`routing.residency`): at most `max_adapters` adapters stay loaded.

Real engines on the tiny base, real registries (adapters imported and hash-checked on every
load): the LRU order and every counter move exactly as the requests say; pinned (`--preload`,
alias-following) and in-flight adapters are never evicted; a held row decodes exactly as the
adapter alone does after a flood of other adapters went through; the resident count never
passes the limit; a router that needs every adapter resident refuses a smaller limit.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from registry.errors import BadInputError
from routing.residency import AdapterSlotsFullError, Residency, default_max_adapters

N_VERSIONS = 8


@pytest.fixture
def ws(workspace, tiny_loras):
    """The tiny workspace with adapters a0..a7 imported (two per tiny LoRA folder)."""
    for i in range(N_VERSIONS):
        workspace.registry.import_peft(tiny_loras[i % len(tiny_loras)], name=f"a{i}", domain=f"d{i}",
                                       base_fingerprint=workspace.base_fingerprint)
    return workspace


def routed(ws, **kwargs):
    from plait.service import RoutedModel

    return RoutedModel(ws, **kwargs)


def counts(rm) -> dict:
    s = rm.residency_stats()
    return {k: s[k] for k in ("hits", "misses", "loads", "evictions", "resident", "max_adapters")}


# ---------------------------------------------------------------------- LRU order and counters


def test_lru_order_and_counters_move_exactly(ws):
    rm = routed(ws, max_adapters=2)
    res = rm.engine.residency
    assert counts(rm) == dict(hits=0, misses=0, loads=0, evictions=0, resident=0, max_adapters=2)
    rm.ensure_adapter("a0")
    rm.ensure_adapter("a1")
    assert res.resident == ["a0:1", "a1:1"]
    rm.ensure_adapter("a0")  # hit: a0 becomes the most recently used
    assert res.resident == ["a1:1", "a0:1"]
    rm.ensure_adapter("a2")  # full: evicts a1, the least recently used
    assert res.resident == ["a0:1", "a2:1"] and sorted(rm.engine.adapters) == ["a0:1", "a2:1"]
    assert counts(rm) == dict(hits=1, misses=3, loads=3, evictions=1, resident=2, max_adapters=2)
    # a forward pass marks its adapters as used too (the engine's `routed`)
    rm.engine.logits(["the quick brown fox"], "a0:1")
    rm.ensure_adapter("a3")  # evicts a2
    assert res.resident == ["a0:1", "a3:1"]
    assert counts(rm) == dict(hits=1, misses=4, loads=4, evictions=2, resident=2, max_adapters=2)
    assert rm.residency_stats()["load_seconds"] > 0
    # an evicted adapter comes back hash-checked, and serves as before
    before = rm.engine.logits(["the quick brown fox"], "a0:1")
    rm.ensure_adapter("a1"), rm.ensure_adapter("a2")
    assert "a0:1" not in rm.engine.adapters
    rm.ensure_adapter("a0")
    torch.testing.assert_close(rm.engine.logits(["the quick brown fox"], "a0:1"), before)
    assert counts(rm) == dict(hits=1, misses=7, loads=7, evictions=5, resident=2, max_adapters=2)


def test_engine_alone_is_bounded_and_unlimited_by_default(tiny_base, tiny_loras):
    from routing.engine import CompositionEngine

    unlimited = CompositionEngine.from_base(str(tiny_base))
    for i, f in enumerate(tiny_loras):
        unlimited.add_adapter(f"x{i}", f)
    assert len(unlimited.adapters) == 4 and unlimited.residency.stats()["evictions"] == 0

    engine = CompositionEngine.from_base(str(tiny_base), max_adapters=2)
    for i, f in enumerate(tiny_loras):
        engine.add_adapter(f"x{i}", f)
        assert len(engine.adapters) <= 2
    assert sorted(engine.adapters) == ["x2", "x3"]
    s = engine.residency.stats()
    assert (s["loads"], s["evictions"], s["resident"], s["hits"], s["misses"]) == (4, 2, 2, 0, 0)
    engine.remove_adapter("x2")  # a removal by hand is no eviction
    assert engine.residency.resident == ["x3"] and engine.residency.stats()["evictions"] == 2


def test_default_limit_rule():
    mib = 2**20
    assert default_max_adapters(2 * mib, available_bytes=20 * 1024 * mib) == 1024  # capped
    assert default_max_adapters(64 * mib, available_bytes=8 * 1024 * mib) == 32  # 2 GiB / 64 MiB
    assert default_max_adapters(512 * mib, available_bytes=1024 * mib) == 8  # floor
    assert default_max_adapters(None, available_bytes=4 * 1024 * mib) == 64  # nominal 16 MiB
    with pytest.raises(BadInputError) as e:
        Residency(0)
    assert str(e.value) == "max_adapters 0 is invalid: use a whole number >= 1 (e.g. 32)"


def test_routed_model_default_limit_is_sized_for_the_machine(ws):
    from routing.residency import MAX_DEFAULT_ADAPTERS

    rm = routed(ws)
    size = max(v.size_bytes for v in ws.registry.search_versions())
    assert size < 100_000  # tiny adapters: a quarter of any machine's memory holds more than the cap
    assert rm.max_adapters == MAX_DEFAULT_ADAPTERS == 1024


# ---------------------------------------------------------------------- pins


def test_preloaded_and_aliased_adapters_are_never_evicted(ws, tiny_loras):
    reg = ws.registry
    reg.set_alias("a0:1", "stable")
    rm = routed(ws, max_adapters=2, preload=["a0@stable", "a1:1"])
    assert sorted(rm.engine.adapters) == ["a0:1", "a1:1"] and rm.residency_stats()["pinned"] == 2
    with pytest.raises(AdapterSlotsFullError) as e:  # both slots pinned: nothing else fits
        rm.ensure_adapter("a2")
    assert str(e.value) == ("cannot load adapter 'a2:1': all 2 adapter slots are in use by running requests "
                            "(2 of them pinned: preloaded adapters or the router's); raise the adapter limit (now 2) "
                            "or retry when they finish")
    rm = routed(ws, max_adapters=3, preload=["a0@stable"])
    for i in range(1, N_VERSIONS):  # a flood of other adapters
        rm.ensure_adapter(f"a{i}")
        assert "a0:1" in rm.engine.adapters and len(rm.engine.adapters) <= 3
    assert rm.residency_stats()["evictions"] == N_VERSIONS - 3
    # the alias moves: the pin follows it at the next refresh, the old version becomes evictable
    new = reg.import_peft(tiny_loras[3], name="a0", domain="d0", base_fingerprint=ws.base_fingerprint)
    reg.set_alias(new.ref, "stable")
    rm.refresh()
    assert rm.engine.residency.pinned == {"a0:2"} and "a0:2" in rm.engine.adapters
    rm.ensure_adapter("a1"), rm.ensure_adapter("a2")
    assert "a0:1" not in rm.engine.adapters and "a0:2" in rm.engine.adapters


def test_preload_more_than_the_limit_is_refused(ws):
    with pytest.raises(BadInputError) as e:
        routed(ws, max_adapters=2, preload=["a0", "a1", "a2:1"])
    assert str(e.value) == "--preload names 3 adapters, but --max-adapters is 2; give --max-adapters 3 or more, or preload fewer"
    with pytest.raises(BadInputError) as e:
        routed(ws, max_adapters=2, preload=["nope"])
    assert str(e.value) == ("--preload nope: no such adapter version; give NAME, NAME:V or NAME@ALIAS of a "
                            "registered adapter")


# ---------------------------------------------------------------------- in flight


def test_eviction_never_drops_an_in_flight_adapter(ws, tiny_base, tiny_loras):
    """A row holds a0 while a flood of other adapters is requested; it decodes as a0 alone does."""
    from routing.engine import CompositionEngine, Routing

    rm = routed(ws, max_adapters=2)
    prompt = ["the quick brown fox"]
    with rm.using(["a0"]) as refs:
        assert refs == ["a0:1"]
        for i in range(1, N_VERSIONS):
            rm.ensure_adapter(f"a{i}")
            assert "a0:1" in rm.engine.adapters and len(rm.engine.adapters) <= 2
        s = rm.residency_stats()
        assert s["in_flight"] == 1 and s["evictions"] == N_VERSIONS - 2
        with pytest.raises(AdapterSlotsFullError):  # a0 and a7 held: a third adapter cannot load
            with rm.using(["a7"]):
                rm.ensure_adapter("a1")
        held = rm.engine.generate(prompt, Routing.one("a0:1"), max_new_tokens=6)
        held_logits = rm.engine.logits(prompt, "a0:1")
    assert rm.residency_stats()["in_flight"] == 0
    alone = CompositionEngine.from_base(str(tiny_base))
    alone.add_adapter("a0", tiny_loras[0])
    assert held == alone.generate(prompt, Routing.one("a0"), max_new_tokens=6)
    torch.testing.assert_close(held_logits, alone.logits(prompt, "a0"))
    assert not torch.equal(held_logits, alone.logits(prompt, None))  # the adapter does change the output


def test_memory_bound_holds_whatever_clients_name(ws):
    rm = routed(ws, max_adapters=3)
    rng = random.Random(0)
    lookups = 0
    for _ in range(40):
        names = rng.sample([f"a{i}" for i in range(N_VERSIONS)], rng.randint(1, 3))
        texts = ["the lazy dog"] * len(names)
        with rm.using(names) as refs:
            rm.engine.generate(texts, [[(r, 1.0)] for r in refs], max_new_tokens=1)
            lookups += len(names)
            assert len(rm.engine.adapters) <= 3
        s = rm.residency_stats()
        assert s["resident"] == len(rm.engine.adapters) <= 3
    s = rm.residency_stats()
    assert s["hits"] + s["misses"] == lookups and s["loads"] == s["misses"]
    assert s["loads"] - s["evictions"] == s["resident"] == 3


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_batcher_holds_rows_and_fails_only_the_request_that_does_not_fit(ws, scheduler):
    """Three requests for three adapters in one batch with two slots: two are served, the third gets a 503."""
    from plait.server import Done, Failed, GenerationRequest, Prompt, Sampling, ServerConfig, api_error
    from plait.server.continuous import make_batcher
    from routing.engine import Routing

    rm = routed(ws, max_adapters=2)
    tok = rm.engine.tokenizer
    prompt = "the quick brown"
    ids = tok(prompt)["input_ids"]

    async def run(models):
        batcher = make_batcher(rm, ServerConfig(scheduler=scheduler, max_batch=8, max_wait_ms=300))
        await batcher.start()
        try:
            tickets = [batcher.submit(GenerationRequest(m, [Prompt(ids, prompt)], Sampling(max_tokens=4)))
                       for m in models]
            return [[e async for e in t][-1] for t in tickets]
        finally:
            await batcher.stop()

    last = asyncio.run(run(["a0", "a1", "a2"]))
    assert [type(e) for e in last] == [Done, Done, Failed]
    err = api_error(last[2].error)
    assert err.status == 503 and err.code == "adapter_slots_full"
    assert "all 2 adapter slots are in use by running requests" in err.message
    for e, ref in zip(last[:2], ("a0:1", "a1:1")):
        with rm._lock:
            want = rm.engine.generate([prompt], Routing.one(ref), max_new_tokens=4)[0]
        assert e.rows[0].text == want
    assert rm.residency_stats()["in_flight"] == 0  # every hold was given back
    last = asyncio.run(run(["a2"]))  # alone, it fits
    assert isinstance(last[0], Done)


# ---------------------------------------------------------------------- routers that need every adapter


def perplexity_workspace(ws, n: int = 3):
    from routing.routers.perplexity import PerplexityRouter

    refs = {f"d{i}": f"a{i}:1" for i in range(n)}
    router = PerplexityRouter().fit(refs, refs=refs)
    ws.registry.register_router("perplexity", kind="perplexity", files=router.to_files(), covers=refs.values())
    return refs


def test_perplexity_router_pins_its_adapters(ws):
    refs = perplexity_workspace(ws)
    rm = routed(ws, router="perplexity", max_adapters=4)
    assert rm.engine.residency.pinned == set(refs.values())
    for i in range(3, N_VERSIONS):  # the other adapters share the one slot left
        rm.ensure_adapter(f"a{i}")
    assert set(refs.values()) <= set(rm.engine.adapters) and len(rm.engine.adapters) == 4
    decisions = rm.route(["the quick brown fox", "legal contracts bind the parties"])
    assert all(d.domain in refs for d in decisions)


def test_perplexity_router_refuses_a_smaller_limit(ws, capsys):
    from plait.cli import main
    from plait.workspace import _write_private

    perplexity_workspace(ws)
    with pytest.raises(BadInputError) as e:
        routed(ws, router="perplexity", max_adapters=2)
    message = "the perplexity router needs all 3 of its adapters resident, but --max-adapters is 2; give --max-adapters 3 or more"
    assert str(e.value) == message
    ws.config.router = "perplexity"
    _write_private(ws.path / "plait.toml", ws.config.to_toml())
    code = main(["serve", "--workspace", str(ws.path), "--max-adapters", "2", "--port", "9"])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().endswith(message)
    code = main(["serve", "--workspace", str(ws.path), "--max-adapters", "0"])
    assert code == 2 and "--max-adapters 0 is invalid: use a whole number >= 1 (e.g. 32)" in capsys.readouterr().err


def test_serve_refuses_a_malformed_preload_before_loading(tmp_path, capsys):
    from plait.cli import main

    code = main(["serve", "--workspace", str(tmp_path / "nowhere"), "--preload", "a0,,a1"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("error: --preload 'a0,,a1': give adapter references separated by commas "
                                         "(NAME, NAME:V or NAME@ALIAS), e.g. --preload law@production,news:2")
