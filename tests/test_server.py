"""`plait serve` end to end: the real server on a loopback port, the official `openai` client.

One tiny workspace (two domains trained for a few steps: `cats` as LoRA, `law` as a
bottleneck adapter, the default hybrid router) is served by uvicorn in a background thread.
Answers are compared with the composition engine's own output for the same prompt and
adapters (greedy decoding), an alias is moved while the server runs, a version with a
corrupted artifact is refused while the rest keeps being served, and malformed requests get
OpenAI-shaped errors with the right status codes.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import requests  # noqa: E402

CATS = ["the cat sat on the mat and the cat was happy", "a cat chased the mouse across the mat"]
LAW = ["the court ruled that the contract binds the parties", "legal contracts bind the parties in court"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def build_served_model(root: Path):
    """(workspace, routed model) over two tiny trained domains (`cats` LoRA, `law` bottleneck) under `root`."""
    from plait.service import RoutedModel
    from plait.workspace import Workspace
    from tests.tiny import make_tiny_base

    base = make_tiny_base(root / "base")
    ws = Workspace.init(root / "ws", base_model=str(base), tracking_uri="none")
    # these tests serve each domain with its own adapter; re-pointing (tests/test_repoint.py) is off here:
    # after 6 steps the bottleneck law adapter is better on cats' validation rows than the cats LoRA
    ws.config.repoint_margin = math.inf
    for name, texts, method in (("cats", CATS, "lora"), ("law", LAW, "bottleneck")):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": f"{texts[i % 2]} {i}"}) + "\n" for i in range(40)))
        ws.add_domain(name, data, method=method, steps=6, batch_size=4, max_length=32, progress=False, audit=False)
    rm = RoutedModel(ws)
    rm.engine.tokenizer.chat_template = CHAT_TEMPLATE
    return ws, rm


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """(workspace, routed model) over the two tiny domains, without a server (tests/test_continuous.py)."""
    return build_served_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module", params=["continuous", "static"])
def served(request, tmp_path_factory):
    """(workspace, routed model, live server, openai client), once per scheduler (`live.scheduler`).

    Each scheduler gets its own workspace: the tests register versions and move aliases.
    """
    from plait.server import ServerConfig, create_app

    ws, rm = build_served_model(tmp_path_factory.mktemp(f"serve-{request.param}"))
    config = ServerConfig(scheduler=request.param, max_batch=16, max_wait_ms=50, max_queue=64, max_prompt_tokens=64,
                          max_tokens_limit=32)
    live = LiveServer(create_app(rm, config))
    live.scheduler = request.param
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield ws, rm, live, client
    live.stop()


def direct(rm, prompt: str, ref: str | None, max_new_tokens: int, chat: bool = False) -> str:
    """The engine's own greedy output for `prompt` under adapter `ref` (None = base)."""
    from routing.engine import Routing

    with rm._lock:
        return rm.engine.generate([prompt], Routing.one(ref) if ref else None, max_new_tokens=max_new_tokens,
                                  chat=chat)[0]


def plait_field(choice) -> dict:
    return choice.model_extra["plait"]


def test_models_lists_auto_base_versions(served):
    _, _, _, client = served
    ids = {m.id for m in client.models.list().data}
    assert {"auto", "base", "cats:1", "law:1"} <= ids


def test_completion_equals_engine_for_explicit_refs(served):
    _, rm, _, client = served
    for model, ref in (("cats:1", "cats:1"), ("law", "law:1"), ("base", None)):
        r = client.completions.create(model=model, prompt="the cat sat on", max_tokens=8, temperature=0)
        choice = r.choices[0]
        assert choice.text == direct(rm, "the cat sat on", ref, 8)
        assert plait_field(choice)["adapters"] == ([{"ref": ref, "domain": ref.split(":")[0], "weight": 1.0}]
                                                   if ref else [])
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
        assert choice.finish_reason in ("stop", "length")
    # the adapters change the answer (otherwise the comparison above proves little)
    outs = {direct(rm, "the court ruled", ref, 8) for ref in ("cats:1", "law:1", None)}
    assert len(outs) > 1


def test_concurrent_mixed_requests_share_batches(served):
    _, rm, live, client = served
    before = requests.get(live.url + "/health").json()["stats"]
    jobs = [("cats:1", "the cat", 6), ("law:1", "the court", 3), ("base", "legal contracts", 5),
            ("cats:1", "a cat chased", 4), ("law:1", "patients take", 6), ("base", "the quick", 2),
            ("auto", "the cat sat on the mat", 5), ("auto", "the court and the contract", 4)] * 2

    def call(job):
        model, prompt, n = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    for (model, prompt, n), r in zip(jobs, results):
        if model == "auto":  # routed in one router call with the other auto requests of its batch
            adapters = plait_field(r.choices[0])["adapters"]
            assert adapters and adapters[0]["domain"] == ("cats" if "cat" in prompt else "law")
            with rm._lock:
                want = rm.engine.generate([prompt], [[(a["ref"], a["weight"]) for a in adapters]],
                                          max_new_tokens=n)[0]
            assert r.choices[0].text == want
            continue
        ref = None if model == "base" else model
        assert r.choices[0].text == direct(rm, prompt, ref, n), (model, prompt)
    after = requests.get(live.url + "/health").json()["stats"]
    assert after["requests"] - before["requests"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # gathered: fewer batches than requests
    assert after["max_batch_rows"] > 1


def test_several_prompts_in_one_request(served):
    _, rm, _, client = served
    r = client.completions.create(model="law:1", prompt=["the court", "a cat"], max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [direct(rm, p, "law:1", 5) for p in ("the court", "a cat")]


def test_auto_routes_and_matches_engine(served):
    from routing.engine import Routing

    _, rm, _, client = served
    for prompt, domain in (("the cat sat on the mat", "cats"), ("the court and the contract", "law")):
        r = client.completions.create(model="auto", prompt=prompt, max_tokens=6, temperature=0)
        info = plait_field(r.choices[0])
        assert info["model"] == "auto" and info["domain"] == domain
        assert set(info["scores"]) == {"cats", "law"}
        with rm._lock:
            want = rm.engine.generate([prompt], Routing.blend([(a["ref"], a["weight"]) for a in info["adapters"]]),
                                      max_new_tokens=6)[0]
        assert r.choices[0].text == want
    route = requests.post(served[2].url + "/v1/route", json={"input": ["the cat on the mat", "the court and the contract"], "top_k": 2})
    assert route.status_code == 200
    data = route.json()["data"]
    assert [d["domain"] for d in data] == ["cats", "law"]
    assert abs(sum(a["weight"] for a in data[0]["adapters"]) - 1) < 1e-5


def test_chat_uses_the_chat_template(served):
    _, rm, _, client = served
    r = client.chat.completions.create(model="cats:1", messages=[{"role": "user", "content": "the cat"}],
                                       max_tokens=7, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == direct(rm, "the cat", "cats:1", 7, chat=True)
    assert plait_field(r.choices[0])["adapters"][0]["ref"] == "cats:1"


def test_streaming_completion_and_chat(served):
    _, rm, _, client = served
    chunks = list(client.completions.create(model="law:1", prompt="the court ruled", max_tokens=10,
                                            temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == direct(rm, "the court ruled", "law:1", 10)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert plait_field(chunks[-1].choices[0])["adapters"][0]["ref"] == "law:1"
    assert sum(1 for c in chunks if c.choices[0].text) >= 2  # tokens arrive as they are decoded

    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "a cat"}],
                                            max_tokens=6, temperature=0, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(parts) == direct(rm, "a cat", None, 6, chat=True)


def test_raw_stream_ends_with_done(served):
    _, _, live, _ = served
    with requests.post(live.url + "/v1/completions", timeout=30, stream=True,
                       json={"model": "cats:1", "prompt": "the cat", "max_tokens": 3, "temperature": 0,
                             "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_stop_sequences_trim(served):
    _, rm, _, client = served
    full = direct(rm, "the cat", "cats:1", 12)
    stop = full.strip()[:3] if len(full.strip()) >= 6 else None
    if not stop:
        pytest.skip("the tiny model's answer is too short to pick a stop string")
    r = client.completions.create(model="cats:1", prompt="the cat", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_alias_move_serves_next_request(served, tmp_path):
    from tests.tiny import make_peft_lora

    ws, rm, _, client = served
    reg = ws.registry
    v2 = reg.import_peft(make_peft_lora(Path(ws.config.base_model), tmp_path / "cats2", seed=7), name="cats",
                         domain="cats", base_fingerprint=ws.base_fingerprint)
    assert v2.ref == "cats:2"
    ids = {m.id for m in client.models.list().data}
    assert "cats:2" in ids  # registered while the server runs
    reg.set_alias("cats:1", "staging")
    a = client.completions.create(model="cats@staging", prompt="the cat sat", max_tokens=8, temperature=0)
    assert plait_field(a.choices[0])["adapters"][0]["ref"] == "cats:1"
    reg.set_alias("cats:2", "staging")
    b = client.completions.create(model="cats@staging", prompt="the cat sat", max_tokens=8, temperature=0)
    assert plait_field(b.choices[0])["adapters"][0]["ref"] == "cats:2"
    assert b.choices[0].text == direct(rm, "the cat sat", "cats:2", 8)
    assert a.choices[0].text != b.choices[0].text
    # `auto` serves the routed domain's production alias when it exists
    reg.set_alias("cats:2", "production")
    r = client.completions.create(model="auto", prompt="the cat sat on the mat", max_tokens=4, temperature=0)
    assert plait_field(r.choices[0])["adapters"][0]["ref"] == "cats:2"
    assert "cats@staging" in {m.id for m in client.models.list().data}


def test_corrupt_version_is_refused_and_others_served(served, tmp_path):
    from tests.tiny import make_peft_lora

    ws, _, live, client = served
    reg = ws.registry
    info = reg.import_peft(make_peft_lora(Path(ws.config.base_model), tmp_path / "bad", seed=9), name="broken",
                           domain="cats", base_fingerprint=ws.base_fingerprint)
    _, path = reg.artifact_path(info)
    weights = path / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    r = requests.post(live.url + "/v1/completions", json={"model": "broken:1", "prompt": "the cat", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "integrity_error"
    ok = client.completions.create(model="cats:1", prompt="the cat", max_tokens=2, temperature=0)
    assert ok.choices[0].text is not None
    assert requests.get(live.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "the cat"}, 400, "model"),
    ({"model": "cats:1"}, 400, "prompt"),
    ({"model": "nope", "prompt": "the cat"}, 400, "model"),
    ({"model": "cats:99", "prompt": "the cat"}, 400, "model"),
    ({"model": "bad ref!", "prompt": "the cat"}, 400, "model"),
    ({"model": "base", "prompt": "the cat", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "base", "prompt": "the cat", "temperature": -1}, 400, "temperature"),
    ({"model": "base", "prompt": "the cat", "n": 3}, 400, "n"),
    ({"model": "base", "prompt": "the cat " * 200}, 413, "prompt"),
    ({"model": "base", "prompt": "x" * 100_000}, 413, "prompt"),
])
def test_malformed_requests(served, body, status, param):
    live = served[2]
    kw = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = requests.post(live.url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_bad_chat_and_route_requests(served):
    _, _, live, client = served
    r = requests.post(live.url + "/v1/chat/completions", json={"model": "base", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = requests.post(live.url + "/v1/chat/completions", json={"model": "base", "messages": [{"role": "x", "content": "a"}]})
    assert r.status_code == 400
    r = requests.post(live.url + "/v1/route", json={"input": ""})
    assert r.status_code == 400
    r = requests.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # unknown refs are refused before a stream starts
        client.completions.create(model="nope:3", prompt="x", max_tokens=2, stream=True)


def test_queue_full_gets_503_and_server_survives(served):
    from plait.server import ServerConfig, create_app

    _, rm, _, _ = served
    small = LiveServer(create_app(rm, ServerConfig(scheduler=served[2].scheduler, max_batch=1, max_wait_ms=0,
                                                   max_queue=1, max_tokens_limit=32)))
    try:
        def call(_):
            return requests.post(small.url + "/v1/completions", timeout=60,
                              json={"model": "base", "prompt": "the cat", "max_tokens": 32, "temperature": 0})

        with ThreadPoolExecutor(12) as pool:
            codes = [r.status_code for r in pool.map(call, range(12))]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        r = call(0)
        assert r.status_code == 200
        busy = [c for c in codes if c == 503]
        assert busy
    finally:
        small.stop()


def test_engine_on_step_hook_sees_every_token_and_can_stop(served):
    _, rm, _, _ = served
    eng = rm.engine
    ids, mask = eng.encode(["the cat", "the court ruled"], padding_side="left")
    routing = ["cats:1", "law:1"]
    with rm._lock:
        full = eng.generate_ids(ids, mask, routing, max_new_tokens=6, eos_token_id=[])
        seen = []
        out = eng.generate_ids(ids, mask, routing, max_new_tokens=6, eos_token_id=[],
                               on_step=lambda new, done: seen.append(new.clone()) or len(seen) == 3)
    assert torch.equal(torch.stack(seen, 1), out)
    assert out.shape == (2, 3) and torch.equal(out, full[:, :3])  # stopped after step 3, same tokens


def test_cli_serve_refuses_bad_limits(tmp_path):
    from plait.cli import main

    assert main(["serve", "--workspace", str(tmp_path), "--max-batch", "0"]) == 2
    assert main(["serve", "--workspace", str(tmp_path), "--port", "70000"]) == 2
    assert main(["serve", "--workspace", str(tmp_path / "missing")]) == 2  # no workspace there
