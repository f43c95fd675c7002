"""Continuous batching (issue 16, item 2): rows join and leave the running batch at every step.

The tiny two-domain workspace of tests/test_server.py (`cats` a LoRA, `law` a bottleneck
adapter). The engine's step API (`prefill`, `decode_step`, `join_states`, `keep_rows`) and the
`ContinuousBatcher` are driven directly; every answer is compared, token for token (greedy,
fp32), with the same request decoded alone by `CompositionEngine.generate_ids`.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("fastapi")

from tests.test_server import served_model  # noqa: E402,F401 - the shared workspace fixture

PROMPTS = {"cats:1": "the cat sat on", "law:1": "the court ruled that the contract", None: "patients take"}


@pytest.fixture(scope="module")
def rm(served_model):  # noqa: F811 - the imported fixture
    routed = served_model[1]
    for ref in ("cats:1", "law:1"):
        routed.ensure_adapter(ref)
    return routed


def tokens(rm, prompt: str) -> list[int]:
    return rm.engine._token_lists([prompt])[0]


def alone(rm, prompt: str, ref: str | None, n: int, **sampling) -> list[int]:
    """The tokens `generate_ids` gives `prompt` decoded alone (no eos stop: every step counts)."""
    with rm._lock:
        out = rm.engine.generate_ids(torch.tensor([tokens(rm, prompt)]), None, ref, max_new_tokens=n,
                                     eos_token_id=[], **sampling)
    return out[0].tolist()


# --------------------------------------------------------------------------- the engine's step API


def test_rows_that_join_and_leave_get_their_alone_tokens(rm):
    eng = rm.engine
    want = {ref: alone(rm, p, ref, 12) for ref, p in PROMPTS.items()}
    assert len({tuple(w) for w in want.values()}) == 3  # the adapters change the answer
    got: dict = {}
    with rm._lock:
        # cats starts alone; law (a longer prompt, another adapter kind) joins after 3 steps
        state, logits = eng.prefill([tokens(rm, PROMPTS["cats:1"])], ["cats:1"])
        got["cats:1"] = [int(logits.argmax(-1)[0])]
        for _ in range(3):
            got["cats:1"].append(int(eng.decode_step(state, [got["cats:1"][-1]]).argmax(-1)[0]))
        new, logits = eng.prefill([tokens(rm, PROMPTS["law:1"]), tokens(rm, PROMPTS[None])], ["law:1", None])
        got["law:1"], got[None] = [int(logits[0].argmax())], [int(logits[1].argmax())]
        width_before = max(state.width, new.width)
        state = eng.join_states(state, new)
        assert state.size == 3 and state.width == width_before
        order = ["cats:1", "law:1", None]
        for _ in range(5):
            logits = eng.decode_step(state, [got[r][-1] for r in order])
            for i, r in enumerate(order):
                got[r].append(int(logits[i].argmax()))
        # law (the longest cache) leaves: the padding columns no row uses any more go with it
        state = eng.keep_rows(state, [0, 2])
        order = ["cats:1", None]
        assert state.size == 2 and state.width < width_before + 5
        assert bool((state.mask.sum(0) > 0).all())
        for _ in range(12 - 9):
            logits = eng.decode_step(state, [got[r][-1] for r in order])
            for i, r in enumerate(order):
                got[r].append(int(logits[i].argmax()))
        assert eng.keep_rows(state, []) is None
    assert got["cats:1"] == want["cats:1"]
    assert got[None] == want[None][:len(got[None])] and len(got[None]) == 9
    assert got["law:1"] == want["law:1"][:6]


def test_step_api_refuses_bad_input(rm):
    from registry.errors import BadInputError

    with pytest.raises(BadInputError, match="at least one prompt"):
        rm.engine.prefill([], None)
    state, _ = rm.engine.prefill([tokens(rm, "the cat")], None)
    with pytest.raises(BadInputError, match="got 2 tokens for a decoding state of 1 rows"):
        rm.engine.decode_step(state, [1, 2])


# --------------------------------------------------------------------------- the scheduler


def request(model: str, prompt: str, n: int, rm, *, stream: bool = False, **sampling):
    from plait.server import GenerationRequest, Prompt, Sampling

    return GenerationRequest(model, [Prompt(tokens(rm, prompt), prompt)], Sampling(n, **sampling), stream=stream)


def drive(rm, script, metrics=None, **config):
    """Run `script(batcher)` against a started ContinuousBatcher on a fresh event loop."""
    from plait.server import ContinuousBatcher, ServerConfig

    async def main():
        batcher = ContinuousBatcher(rm, ServerConfig(**{"max_batch": 8, **config}), metrics)
        await batcher.start()
        try:
            return await script(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


async def answer(ticket, order: list | None = None, name: str = ""):
    """The request's Done rows (raises its Failed error); appends `name` to `order` when done."""
    from plait.server import Done, Failed

    async for event in ticket:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Done):
            if order is not None:
                order.append(name)
            return event.rows
    raise AssertionError("no Done")


async def first_delta(ticket, log: list):
    from plait.server import Delta

    while True:
        event = await ticket.next_event()
        log.append(event)
        if isinstance(event, Delta):
            return


def text(rm, toks: list[int]) -> str:
    """The answer text of tokens decoded alone: up to the first eos, as the server stops there."""
    eos = set(rm.engine._eos_ids(None))
    end = next((i for i, t in enumerate(toks) if t in eos), len(toks))
    return rm.engine.tokenizer.decode(toks[:end], skip_special_tokens=True)


def test_requests_joining_mid_run_equal_their_alone_answers(rm):
    from plait.server import ServerMetrics

    jobs = [("cats:1", PROMPTS["cats:1"], 24), ("law:1", PROMPTS["law:1"], 5), ("base", PROMPTS[None], 12),
            ("cats:1", "a cat chased the mouse", 9)]
    eos = set(rm.engine._eos_ids(None))
    want_tokens = [alone(rm, p, None if m == "base" else m, n) for m, p, n in jobs]
    ends = [next((i for i, t in enumerate(w) if t in eos), None) for w in want_tokens]
    want = [text(rm, w) for w in want_tokens]

    async def script(b):
        first = b.submit(request(*jobs[0], rm, stream=True))
        seen: list = []
        await first_delta(first, seen)  # the first request is decoding: the others join its batch
        rest = [b.submit(request(m, p, n, rm)) for m, p, n in jobs[1:]]
        held = rm.engine.residency.is_held("cats:1")  # a running row's adapter cannot be evicted
        results = [await answer(first)] + [await answer(t) for t in rest]
        return results, b.stats(), held

    metrics = ServerMetrics()
    results, stats, held = drive(rm, script, metrics)
    assert held and rm.engine.residency.stats()["in_flight"] == 0  # every hold given back as rows left
    assert sum(e is None for e in ends) >= 3  # most rows run to their own max_tokens
    for (m, p, n), rows, w, e in zip(jobs, results, want, ends):
        assert rows[0].text == w, (m, p)
        assert (rows[0].completion_tokens, rows[0].finish_reason) == ((n, "length") if e is None else (e + 1, "stop"))
    assert stats["joined"] == 3 and stats["rows"] == 4 and stats["max_batch_rows"] == 4
    assert stats["batches"] == 1 and stats["running_rows"] == 0
    # /metrics: one first token per row, one batch-size observation per decode step, their sizes summed
    assert metrics.ttft.count == 4 and metrics.batch.count == stats["decode_steps"]
    assert metrics.batch.sum == stats["row_steps"]
    assert metrics.per_token.count == sum(r[0].completion_tokens for r in results) - 4  # eos counts as a token


def test_a_finished_row_leaves_at_once(rm):
    async def script(b):
        order: list = []
        long = b.submit(request("cats:1", PROMPTS["cats:1"], 30, rm))
        short = b.submit(request("law:1", PROMPTS["law:1"], 2, rm))
        done = await asyncio.gather(answer(long, order, "long"), answer(short, order, "short"))
        return done, order, b.stats()

    (long_rows, short_rows), order, stats = drive(rm, script)
    assert order == ["short", "long"]  # answered while the long row still decodes
    assert long_rows[0].completion_tokens == 30 and short_rows[0].completion_tokens == 2
    # both join at the first step; the short row leaves after 1 decode step, the long one after 29
    assert stats["decode_steps"] == 29
    assert stats["row_steps"] == 2 + 28  # a static batch computes 2 x 29
    assert stats["left"] == 1 and stats["batches"] == 1 and stats["running_rows"] == 0
    assert stats["prefills"] == 1 and stats["max_batch_rows"] == 2


def test_cancel_frees_the_slot_and_the_others_go_on(rm):
    long_n = 400

    async def script(b):
        seen: list = []
        long = b.submit(request("base", PROMPTS[None], long_n, rm, stream=True))
        await first_delta(long, seen)
        other = b.submit(request("law:1", PROMPTS["law:1"], 6, rm))
        assert b.cancel(long) and not b.cancel(long)
        rows = await answer(other)
        for _ in range(100):  # the batch empties once the cancelled row has left
            if b.stats()["running_rows"] == 0:
                break
            await asyncio.sleep(0.02)
        queued = b.submit(request("base", PROMPTS[None], 3, rm))
        b.cancel(queued)  # cancelled while waiting: never decoded
        again = await answer(b.submit(request("base", PROMPTS[None], 3, rm)))
        return rows, again, b.stats()

    rows, again, stats = drive(rm, script)
    assert rows[0].text == text(rm, alone(rm, PROMPTS["law:1"], "law:1", 6))
    assert again[0].text == text(rm, alone(rm, PROMPTS[None], None, 3))
    assert stats["cancelled"] == 2 and stats["errors"] == 0
    assert stats["decode_steps"] < 20, stats  # the 400-token row stopped at once
    assert rm.engine.residency.stats()["in_flight"] == 0
    assert stats["rows"] == 3  # the request cancelled in the queue was never admitted


def test_seeded_sampling_is_per_row_and_reproducible(rm):
    sampling = dict(temperature=0.9, top_p=0.95, seed=1234)
    want = text(rm, alone(rm, PROMPTS["cats:1"], "cats:1", 16, do_sample=True, temperature=0.9, top_p=0.95,
                          seed=1234))

    async def script(b):
        solo = await answer(b.submit(request("cats:1", PROMPTS["cats:1"], 16, rm, **sampling)))
        # the same request again, in a batch with greedy rows and rows sampled under other seeds
        tickets = [b.submit(request("law:1", PROMPTS["law:1"], 10, rm, temperature=1.0, seed=7)),
                   b.submit(request("base", PROMPTS[None], 12, rm)),
                   b.submit(request("cats:1", PROMPTS["cats:1"], 16, rm, **sampling)),
                   b.submit(request("cats:1", PROMPTS["cats:1"], 16, rm, temperature=0.9, top_p=0.95, seed=99))]
        return solo, [await answer(t) for t in tickets]

    solo, mixed = drive(rm, script)
    assert solo[0].text == want  # row 0 of a request samples as generate_ids(seed=...) alone
    assert mixed[2][0].text == want  # the same request, whatever shares its batch
    assert mixed[3][0].text != want  # another seed samples otherwise
    assert mixed[1][0].text == text(rm, alone(rm, PROMPTS[None], None, 12))  # greedy rows unaffected


def test_stop_strings_and_several_prompts_per_request(rm):
    from plait.server import GenerationRequest, Prompt, Sampling

    full = text(rm, alone(rm, PROMPTS["cats:1"], "cats:1", 12))
    stop = full.strip()[:3]
    assert len(stop) == 3
    prompts = [PROMPTS["cats:1"], "a cat chased the mouse"]
    req = GenerationRequest("cats:1", [Prompt(tokens(rm, p), p) for p in prompts], Sampling(12, stop=(stop,)))

    async def script(b):
        return await answer(b.submit(req))

    rows = drive(rm, script)
    assert rows[0].text == full[:full.find(stop)] and rows[0].finish_reason == "stop"
    other = text(rm, alone(rm, prompts[1], "cats:1", 12))
    assert rows[1].text == (other[:other.find(stop)] if stop in other else other)


def test_the_scheduler_is_a_setting(rm, tmp_path):
    from plait.cli import main
    from plait.server import Batcher, ContinuousBatcher, ServerConfig
    from plait.server.continuous import make_batcher
    from registry.errors import BadInputError

    assert ServerConfig().scheduler == "continuous"
    with pytest.raises(BadInputError, match="scheduler 'dynamic' is not one of continuous, static"):
        ServerConfig(scheduler="dynamic")
    assert main(["serve", "--workspace", str(tmp_path), "--scheduler", "dynamic"]) == 2
    assert type(make_batcher(rm, ServerConfig(scheduler="static"))) is Batcher
    assert type(make_batcher(rm, ServerConfig())) is ContinuousBatcher
