"""`plait serve` hardening (issue 15, items 8-12): auth, limits, disconnects, the event loop, errors.

The same tiny two-domain workspace as tests/test_server.py (its `served` fixture), served by
uvicorn on loopback; servers with other settings (an API key, small limits, long answers) are
started on the same routed model. Every test here failed on the code before these fixes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import requests  # noqa: E402

from tests.test_server import LiveServer, direct, served  # noqa: E402,F401 - `served` is the shared fixture

KEY = "s3cret-key"


@pytest.fixture
def server_with(served):  # noqa: F811 - the imported fixture
    """Start servers on the shared routed model with other settings; stops them after the test."""
    from plait.server import ServerConfig, create_app

    started = []

    def start(api_key: str | None = None, **config) -> LiveServer:
        cfg = dict(scheduler=served[2].scheduler, max_batch=16, max_wait_ms=20, max_queue=64, max_prompt_tokens=64,
                   max_tokens_limit=32)
        live = LiveServer(create_app(served[1], ServerConfig(**{**cfg, **config}), api_key=api_key))
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


def stats(live) -> dict:
    return requests.get(live.url + "/health", timeout=10).json()["stats"]


# --------------------------------------------------------------------------- 8: authentication


def test_api_key_guards_every_route_but_health(server_with):
    live = server_with(api_key=KEY)
    calls = [("get", "/v1/models", None),
             ("post", "/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 1}),
             ("post", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "a"}]}),
             ("post", "/v1/route", {"input": "the cat"}), ("get", "/v1/nothing", None)]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-API-Key": KEY}):
            r = requests.request(method, live.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["request_id"] == r.headers["x-request-id"]
    assert requests.get(live.url + "/health", timeout=10).status_code == 200  # load balancers probe without a key
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert client.completions.create(model="base", prompt="the cat", max_tokens=2, temperature=0).choices
    assert requests.post(live.url + "/v1/route", json={"input": "the cat"}, timeout=30,
                         headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_docs_are_off_unless_asked_for(served, server_with):  # noqa: F811
    live = served[2]
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(live.url + path, timeout=10).status_code == 404, path
    on = server_with(docs=True)
    assert "/v1/completions" in requests.get(on.url + "/openapi.json", timeout=10).json()["paths"]


def test_cli_refuses_a_public_host_without_a_key(tmp_path, capsys, monkeypatch):
    from plait.cli import main
    from plait.server import is_loopback

    monkeypatch.delenv("PLAIT_API_KEY", raising=False)
    missing = str(tmp_path / "missing")
    assert main(["serve", "--workspace", missing, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--host 0.0.0.0" in err and "--api-key" in err and "--insecure" in err
    # past that check (the missing workspace is the next refusal) with a key, the key's env var, or --insecure
    for extra in (["--api-key", KEY], ["--insecure"]):
        assert main(["serve", "--workspace", missing, "--host", "0.0.0.0", *extra]) == 2
        assert "no plait workspace" in capsys.readouterr().err
    monkeypatch.setenv("PLAIT_API_KEY", KEY)
    assert main(["serve", "--workspace", missing, "--host", "0.0.0.0"]) == 2
    assert "no plait workspace" in capsys.readouterr().err
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.com", ""))


# --------------------------------------------------------------------------- 9: limits


def test_body_over_the_limit_gets_413_before_it_is_read(server_with):
    live = server_with(max_body_bytes=64 * 1024)
    big = {"model": "base", "prompt": "the cat", "max_tokens": 2, "ignored": "x" * 200_000}
    r = requests.post(live.url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert "65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit counts the bytes as they arrive
        yield b'{"model": "base", "prompt": "the cat", "ignored": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    r = requests.post(live.url + "/v1/completions", data=chunks(), timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    ok = requests.post(live.url + "/v1/completions", timeout=30,
                       json={"model": "base", "prompt": "the cat", "max_tokens": 2, "ignored": "x" * 1000})
    assert ok.status_code == 200


def test_unknown_fields_are_ignored_not_kept():
    from plait.server.protocol import ChatBody, CompletionBody, RouteBody

    body = CompletionBody.model_validate({"model": "base", "prompt": "a", "user": "u", "junk": "x" * 1000})
    assert not body.model_extra and "junk" not in body.model_dump()
    chat = ChatBody.model_validate({"model": "base", "messages": [{"role": "user", "content": "a", "name": "n"}],
                                    "logit_bias": {"1": 2}})
    assert not chat.model_extra and not chat.messages[0].model_extra
    assert not RouteBody.model_validate({"input": "a", "extra": 1}).model_extra


def test_messages_and_route_inputs_are_bounded(server_with):
    live = server_with(max_messages=8, max_route_inputs=4, max_route_input_chars=100)
    many = [{"role": "user", "content": ""}] * 9
    r = requests.post(live.url + "/v1/chat/completions", json={"model": "base", "messages": many}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_messages"
    long_chat = [{"role": "user", "content": "the cat sat on the mat"}] * 8  # rendered: over 64 tokens
    r = requests.post(live.url + "/v1/chat/completions", json={"model": "base", "messages": long_chat}, timeout=30)
    assert r.status_code == 413 and "rendered" in r.json()["error"]["message"]
    r = requests.post(live.url + "/v1/route", json={"input": ["the cat"] * 5}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_inputs"
    r = requests.post(live.url + "/v1/route", json={"input": ["the cat", "x" * 101]}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_long"
    assert requests.post(live.url + "/v1/route", json={"input": ["the cat"] * 4}, timeout=30).status_code == 200


# --------------------------------------------------------------------------- 10: disconnects


LONG = 1500  # the tiny base decodes "the cat" greedily for 1500 tokens without eos (~2.6 s here)


def _wait_for_batch(live, before: dict) -> dict:
    """The server's counters once the batch started after `before` has ended."""
    deadline = time.time() + 30
    while time.time() < deadline:
        now = stats(live)
        if now["batches"] > before["batches"]:
            return now
        time.sleep(0.05)
    raise AssertionError("the batch did not end")


def test_a_closed_stream_frees_its_rows(server_with):
    live = server_with(max_tokens_limit=LONG)
    before = stats(live)
    with requests.post(live.url + "/v1/completions", stream=True, timeout=30,
                       json={"model": "base", "prompt": "the cat", "max_tokens": LONG, "temperature": 0,
                             "stream": True}) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln).startswith(b"data: ")  # the first chunk arrived, then we go
    after = _wait_for_batch(live, before)
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["decode_steps"] - before["decode_steps"] < LONG // 2, after


def test_an_abandoned_request_frees_its_rows(server_with):
    live = server_with(max_tokens_limit=LONG)
    before = stats(live)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(live.url + "/v1/completions", timeout=(5, 0.3),
                      json={"model": "base", "prompt": "the cat", "max_tokens": LONG, "temperature": 0})
    after = _wait_for_batch(live, before)
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["decode_steps"] - before["decode_steps"] < LONG // 2, after
    # the server is free again: a full answer of the same request still runs to its length
    r = requests.post(live.url + "/v1/completions", timeout=60,
                      json={"model": "base", "prompt": "the cat", "max_tokens": 40, "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] == 40


# --------------------------------------------------------------------------- 11: the event loop


def test_chat_templating_runs_off_the_event_loop(served):  # noqa: F811
    _, rm, live, _ = served
    tok = rm.engine.tokenizer
    saved = tok.chat_template
    # a template that spends ~2 s rendering (40 million jinja loop steps), then renders the messages
    tok.chat_template = ("{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(40) %}"
                         "{% endfor %}{% endfor %}{% endfor %}" + saved)
    try:
        took = {}

        def chat():
            t = time.perf_counter()
            requests.post(live.url + "/v1/chat/completions", timeout=60,
                          json={"model": "base", "messages": [{"role": "user", "content": "a cat"}], "max_tokens": 2})
            took["chat"] = time.perf_counter() - t

        th = threading.Thread(target=chat)
        th.start()
        time.sleep(0.3)
        t = time.perf_counter()
        assert requests.get(live.url + "/health", timeout=30).status_code == 200
        health_s = time.perf_counter() - t
        th.join(60)
    finally:
        tok.chat_template = saved
    assert took["chat"] > 1.0  # the template really was slow
    assert health_s < took["chat"] / 3, (health_s, took)


# --------------------------------------------------------------------------- 12: 400s, and no internals


def test_bad_values_get_400_not_500(served):  # noqa: F811
    _, rm, live, _ = served
    post = lambda path, body: requests.post(live.url + path, json=body, timeout=30)  # noqa: E731
    for seed in (2**64, -1, 10**30):
        r = post("/v1/completions", {"model": "base", "prompt": "the cat", "temperature": 1.0, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", (seed, r.text)
    r = post("/v1/completions", {"model": "base", "prompt": "the cat", "temperature": 1.0, "seed": 2**64 - 1,
                                 "max_tokens": 3})
    assert r.status_code == 200
    # a temperature too cold to sample decodes greedily (documented), instead of NaN probabilities
    r = post("/v1/completions", {"model": "base", "prompt": "the cat", "temperature": 1e-40, "max_tokens": 6})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == direct(rm, "the cat", None, 6)
    for path, body, param in (
            ("/v1/completions", {"model": "base", "prompt": "a \ud800 b"}, "prompt"),
            ("/v1/completions", {"model": "base", "prompt": ["ok", "\udfff"]}, "prompt"),
            ("/v1/completions", {"model": "base", "prompt": "ok", "stop": ["\ud800"]}, "stop"),
            ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "\ud800"}]},
             "messages[0].content"),
            ("/v1/route", {"input": ["fine", "\ud800"]}, "input")):
        r = post(path, body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


def test_error_bodies_name_no_paths_and_carry_the_request_id(served, tmp_path, caplog):  # noqa: F811
    from tests.tiny import make_peft_lora

    ws, _, live, _ = served
    info = ws.registry.import_peft(make_peft_lora(Path(ws.config.base_model), tmp_path / "bad", seed=11),
                                  name="tampered", domain="cats", base_fingerprint=ws.base_fingerprint)
    _, path = ws.registry.artifact_path(info)
    weights = path / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\1" * 8)
    with caplog.at_level(logging.INFO, logger="plait.server"):
        r = requests.post(live.url + "/v1/completions", json={"model": "tampered:1", "prompt": "a"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["type"] == "integrity_error"
    rid = r.headers["x-request-id"]
    assert r.json()["request_id"] == rid and rid in r.json()["error"]["message"]
    text = r.text
    for private in (str(ws.path), str(ws.config.base_model), str(path), "/tmp"):
        assert private not in text
    assert rid in caplog.text and str(ws.path) in caplog.text  # the operator's log has the details
    # /health and /v1/models name the base by fingerprint, not by its local folder
    for route in ("/health", "/v1/models"):
        got = requests.get(live.url + route, timeout=30)
        assert str(ws.config.base_model) not in got.text and got.headers["x-request-id"]
    assert requests.get(live.url + "/health", timeout=10).json()["base_fingerprint"] == ws.base_fingerprint


def test_an_internal_error_is_logged_not_told(caplog):
    from plait.server import api_error

    exc = RuntimeError("boom: cannot open /home/alice/ws/artifacts/sha256/ab/cd")
    with caplog.at_level(logging.ERROR, logger="plait.server"):
        err = api_error(exc, "rid123")
    body = json.dumps(err.body("rid123"))
    assert err.status == 500 and "boom" not in body and "/home" not in body and "RuntimeError" not in body
    assert "rid123" in err.message and err.body("rid123")["request_id"] == "rid123"
    assert "rid123" in caplog.text and "boom" in caplog.text
    # a refusal that passes its message on still hides local paths
    from registry.errors import BadInputError

    err = api_error(BadInputError("no base at /srv/models/base/v1; check it"), "r", ("/srv/models",))
    assert err.status == 400 and "/srv" not in err.message and "<path>" in err.message
