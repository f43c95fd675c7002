"""`GET /metrics` (issue 16, item 3) and `GET /v1/models`, on the real server.

The tiny two-domain workspace of tests/test_server.py (its `served` fixture) is served again
by fresh apps, so every counter starts at zero; the text is read with `prometheus_client`'s
own parser, and every counter and histogram count is checked against what the requests
were answered (their `usage`) or what the batcher counted.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")
import requests  # noqa: E402

from tests.test_server import LiveServer, served  # noqa: E402,F401 - `served` is the shared fixture

KEY = "metrics-key"


@pytest.fixture
def server_with(served):  # noqa: F811 - the imported fixture
    """Start servers (fresh metrics) on the shared routed model; stops them after the test."""
    from plait.server import ServerConfig, create_app

    started = []

    def start(api_key: str | None = None, **config) -> LiveServer:
        cfg = dict(scheduler=served[2].scheduler, max_batch=16, max_wait_ms=20, max_queue=64, max_prompt_tokens=64,
                   max_tokens_limit=64)
        live = LiveServer(create_app(served[1], ServerConfig(**{**cfg, **config}), api_key=api_key))
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


def scrape(live, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    r = requests.get(live.url + "/metrics", headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in parser.text_string_to_metric_families(r.text):
        assert family.name.startswith("plait_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def complete(live, **body) -> dict:
    r = requests.post(live.url + "/v1/completions", json={"model": "base", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_metrics_parse_and_start_at_zero(server_with):
    m = scrape(server_with())
    for name in ("plait_prompt_tokens_total", "plait_generation_tokens_total", "plait_queue_depth",
                 "plait_time_to_first_token_seconds_count", "plait_time_per_output_token_seconds_count",
                 "plait_batch_size_rows_count"):
        assert (name, ()) in m and m[(name, ())] == 0, name
    assert m[("plait_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 0


def test_counters_move_by_the_requests_answered(served, server_with):  # noqa: F811
    live = server_with()
    answers = [complete(live, prompt="the cat", max_tokens=n) for n in (3, 5, 7)]
    answers.append(complete(live, prompt=["the cat"] * 3, max_tokens=4))  # 3 rows, one request
    chat = requests.post(live.url + "/v1/chat/completions", timeout=60, json={
        "model": "cats:1", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6, "temperature": 0})
    assert chat.status_code == 200
    answers.append(chat.json())
    m = scrape(live)
    stats = requests.get(live.url + "/health", timeout=10).json()["stats"]

    prompt = sum(a["usage"]["prompt_tokens"] for a in answers)
    generated = sum(a["usage"]["completion_tokens"] for a in answers)
    rows = sum(len(a["choices"]) for a in answers)
    assert [a["usage"]["completion_tokens"] for a in answers[:4]] == [3, 5, 7, 12]  # the tiny base never says eos here
    assert value(m, "plait_requests_received_total", kind="completion") == 4
    assert value(m, "plait_requests_received_total", kind="chat") == 1
    assert value(m, "plait_requests_total", kind="completion", status="ok") == 4
    assert value(m, "plait_requests_total", kind="chat", status="ok") == 1
    assert value(m, "plait_prompt_tokens_total") == prompt
    assert value(m, "plait_generation_tokens_total") == generated
    # one first-token observation per row; every later token of a row is one per-token observation
    assert value(m, "plait_time_to_first_token_seconds_count") == rows == 7
    assert value(m, "plait_time_per_output_token_seconds_count") == generated - rows
    assert value(m, "plait_time_to_first_token_seconds_bucket", le="+Inf") == rows
    assert 0 < value(m, "plait_time_to_first_token_seconds_sum") < 60
    # one batch-size observation per decode step; requests one at a time: 1 row, the 3-prompt one: 3
    # (static: the prefill is a step of its batch; continuous: the prefill picks each row's first
    # token and is no decode step, so each request has one step fewer)
    steps = value(m, "plait_batch_size_rows_count")
    first = 0 if served[2].scheduler == "static" else 1
    assert steps == stats["decode_steps"] == 3 + 5 + 7 + 4 + chat.json()["usage"]["completion_tokens"] - 5 * first
    assert value(m, "plait_batch_size_rows_sum") == steps + 2 * (4 - first)
    assert value(m, "plait_batch_size_rows_bucket", le="2") == steps - (4 - first)
    assert value(m, "plait_queue_depth") == 0
    assert value(m, "plait_adapters_resident") == len(served[1].engine.adapters) >= 1


def test_histogram_buckets_are_cumulative(server_with):
    live = server_with()
    complete(live, prompt="the cat", max_tokens=6)
    m = scrape(live)
    for name in ("plait_time_to_first_token_seconds", "plait_time_per_output_token_seconds", "plait_batch_size_rows"):
        buckets = sorted(((float(dict(labels)["le"]), v) for (n, labels), v in m.items() if n == f"{name}_bucket"))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1] == (float("inf"), m[(f"{name}_count", ())]), name
    assert value(m, "plait_time_per_output_token_seconds_count") == 5


def test_failed_and_cancelled_requests_are_counted_by_status(server_with):
    live = server_with(max_tokens_limit=1500)
    bad = requests.post(live.url + "/v1/completions", json={"model": "nosuch:1", "prompt": "a"}, timeout=30)
    assert bad.status_code == 400
    with requests.post(live.url + "/v1/completions", stream=True, timeout=30,
                       json={"model": "base", "prompt": "the cat", "max_tokens": 1500, "temperature": 0,
                             "stream": True}) as r:
        texts = (json.loads(ln[6:])["choices"][0]["text"] for ln in r.iter_lines() if ln.startswith(b"data: {"))
        assert next(t for t in texts if t)  # the first decoded text arrived (the first chunk is only the role)
    deadline = time.time() + 30
    while value(m := scrape(live), "plait_requests_total", kind="completion", status="cancelled") < 1:
        assert time.time() < deadline, m
        time.sleep(0.05)
    assert value(m, "plait_requests_received_total", kind="completion") == 2
    assert value(m, "plait_requests_total", kind="completion", status="invalid") == 1
    assert value(m, "plait_requests_total", kind="completion", status="ok") == 0
    assert value(m, "plait_generation_tokens_total") == 0  # usage counts answered requests only
    assert value(m, "plait_time_to_first_token_seconds_count") == 1  # the stream's row got its first token


def test_metrics_need_the_api_key_unless_public(server_with):
    guarded = server_with(api_key=KEY)
    r = requests.get(guarded.url + "/metrics", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert ("plait_queue_depth", ()) in scrape(guarded, {"Authorization": f"Bearer {KEY}"})
    public = server_with(api_key=KEY, metrics_public=True)
    assert ("plait_queue_depth", ()) in scrape(public)
    assert requests.get(public.url + "/v1/models", timeout=10).status_code == 401  # only /metrics opened


def test_residency_figures_render_when_given():
    from plait.server.metrics import ServerMetrics

    text = ServerMetrics().render({"hits": 7, "misses": 2, "loads": 2, "evictions": 1, "load_seconds": 0.25,
                                   "resident": 32, "max_adapters": None, "unknown": 5})
    got = {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples}
    assert {k: got[k] for k in got if k.startswith("plait_adapter")} == {
        "plait_adapter_hits_total": 7, "plait_adapter_misses_total": 2, "plait_adapter_loads_total": 2,
        "plait_adapter_evictions_total": 1, "plait_adapter_load_seconds_total": 0.25, "plait_adapters_resident": 32}


def test_hooks_fill_exact_buckets_and_escape_labels():
    from plait.server.metrics import ServerMetrics

    m = ServerMetrics()
    for s in (0.004, 0.005, 0.3, 100.0):
        m.first_token(s)
    m.request_started('odd"kind\\')
    m.queue_depth(5)
    fams = {f.name: f for f in parser.text_string_to_metric_families(m.render())}
    le = {s.labels["le"]: s.value for s in fams["plait_time_to_first_token_seconds"].samples
          if s.name.endswith("_bucket")}
    assert (le["0.005"], le["0.25"], le["0.5"], le["80"], le["+Inf"]) == (2, 2, 3, 3, 4)
    assert fams["plait_requests_received"].samples[0].labels == {"kind": 'odd"kind\\'}
    assert fams["plait_queue_depth"].samples[0].value == 5


def test_models_list_versions_names_and_aliases(served):  # noqa: F811
    ws, rm, live, _ = served
    ws.registry.set_alias("law:1", "canary")
    data = {m["id"]: m["plait"] for m in requests.get(live.url + "/v1/models", timeout=10).json()["data"]}
    assert {"auto", "base", "cats:1", "law:1", "cats", "law", "law@canary"} <= set(data)
    assert data["law"]["ref"] == data["law@canary"]["ref"] == "law:1"
    assert data["cats"] == {"ref": "cats:1", "domain": "cats", "kind": "lora", "loaded": "cats:1" in rm.engine.adapters}
