"""The lexical (naive Bayes) and hybrid (default) routers: hand-computed scores, accuracy on
small real-text domains, incremental add_domain, the fallback, artifacts, settings errors,
and old workspaces keeping the router kind they were built with."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from safetensors.torch import load as load_tensors

from registry.errors import BadInputError
from routing.routers import DEFAULT_ROUTER, load_router
from routing.routers.embedding import EmbeddingRouter
from routing.routers.hybrid import HybridRouter
from routing.routers.lexical import LexicalRouter, hashed_terms
from tests.test_routers import EXTRA, HELDOUT, OOD_CALIBRATE, OOD_TEST, TRAIN
from training.precision import choose


def _tensor_bytes(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_tensors(files["router.safetensors"]).items()}


@pytest.fixture(scope="module")
def hybrid():
    return HybridRouter().fit(TRAIN)


# ---------------------------------------------------------------------- lexical
def test_hashed_terms_are_log_counts_of_words_and_word_pairs():
    b = 1 << 20
    got = hashed_terms("Goal, goal! The goal.", b)
    expected: dict[int, float] = {}
    for term, count in (("goal", 3), ("the", 1), ("goal goal", 1), ("goal the", 1), ("the goal", 1)):
        h = zlib.crc32(term.encode()) % b
        expected[h] = expected.get(h, 0) + count
    assert got == {h: math.log1p(c) for h, c in expected.items()}
    assert hashed_terms("Goal goal", b, bigrams=False) == {zlib.crc32(b"goal") % b: math.log1p(2)}
    assert hashed_terms("!!! ...", b) == {}


def test_lexical_logits_are_the_naive_bayes_mean_token_log_likelihood():
    b, alpha = 1024, 0.5
    router = LexicalRouter(alpha=alpha, buckets=b, bigrams=False).fit({"a": ["red red blue"], "b": ["green"]})
    h = {w: zlib.crc32(w.encode()) % b for w in ("red", "blue", "green")}
    assert len(set(h.values())) == 3
    n_a = math.log1p(2) + math.log1p(1)  # log-TF counts of domain a: red 2 -> log 3, blue 1 -> log 2
    n_b = math.log1p(1)
    # query "red green": features log 2 each; logit = mean of the features' log P(w | d)
    lp_a = (math.log((math.log1p(2) + alpha) / (n_a + alpha * b)) + math.log(alpha / (n_a + alpha * b))) / 2
    lp_b = (math.log(alpha / (n_b + alpha * b)) + math.log((math.log1p(1) + alpha) / (n_b + alpha * b))) / 2
    logits = router._score_logits(["red green"])
    torch.testing.assert_close(logits, torch.tensor([[lp_a, lp_b]]), rtol=1e-6, atol=1e-6)
    probs = router.score(["red green"])
    torch.testing.assert_close(probs, torch.softmax(torch.tensor([[lp_a, lp_b]]) / 0.1, -1), rtol=1e-5, atol=1e-6)
    assert torch.equal(router._score_logits(["???"]), torch.zeros(1, 2))  # no words: no evidence


def test_lexical_router_routes_heldout_sentences_and_adds_domains_locally():
    router = LexicalRouter().fit(TRAIN)
    assert router.evaluate(HELDOUT)["accuracy"] == 1.0
    before = _tensor_bytes(router.to_files())
    router.add_domain("music", EXTRA["music"], ref="music:1")
    after = _tensor_bytes(router.to_files())
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["music/buckets", "music/counts"]
    assert router.route(["The cellist tuned the strings of the orchestra"])[0].domain == "music"
    again = load_router(router.to_files())
    assert isinstance(again, LexicalRouter) and again.to_files() == router.to_files()
    assert torch.equal(again.score(HELDOUT["cooking"]), router.score(HELDOUT["cooking"]))


@pytest.mark.parametrize("kwargs,message", [
    ({"alpha": 0}, "alpha=0 must be a positive number (e.g. 0.03)"),
    ({"alpha": "1"}, "alpha='1' must be a positive number (e.g. 0.03)"),
    ({"buckets": 10}, "buckets=10 must be an integer in 1024..16777216 (e.g. 262144)"),
])
def test_lexical_settings_errors(kwargs, message):
    with pytest.raises(BadInputError) as e:
        LexicalRouter(**kwargs)
    assert str(e.value) == message


# ---------------------------------------------------------------------- hybrid
def test_hybrid_is_the_default_and_routes_heldout_sentences(hybrid):
    assert DEFAULT_ROUTER == "hybrid"
    assert hybrid.encoder.bf16 == (choose("encode").dtype == "bf16") and hybrid.embed_chars == 250
    result = hybrid.evaluate(HELDOUT)
    assert result["accuracy"] == 1.0 and result["confusion"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]


def test_hybrid_scores_are_the_product_of_its_two_routers(hybrid):
    texts = [*HELDOUT["football"], "The striker " + "and the goalkeeper " * 30]  # one input longer than embed_chars
    cos = hybrid.dense._score_logits([t[:250] for t in texts])
    nb = hybrid.sparse._score_logits(texts)
    expected = torch.softmax(torch.log_softmax(cos / 0.05, -1) + torch.log_softmax(nb / 0.1, -1), -1)
    probs, confidence = hybrid.scored(texts)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(confidence, cos.max(-1).values)  # the fallback looks at the embedding only
    # weight 0: exactly the embedding router's prototype probabilities
    dense_only = HybridRouter(lexical_weight=0).fit(TRAIN)
    plain = EmbeddingRouter(encoder=dense_only.encoder).fit({d: [t[:250] for t in v] for d, v in TRAIN.items()})
    torch.testing.assert_close(dense_only.score(texts), plain.score([t[:250] for t in texts]), rtol=1e-5, atol=1e-6)


def test_hybrid_add_domain_leaves_other_domains_byte_identical():
    router = HybridRouter().fit(TRAIN)
    before = _tensor_bytes(router.to_files())
    router.add_domain("music", EXTRA["music"], ref="music-lora:1")
    after = _tensor_bytes(router.to_files())
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["music/dense.embeddings", "music/dense.prototype",
                                                "music/sparse.buckets", "music/sparse.counts"]
    assert router.domains == router.dense.domains == router.sparse.domains == [*TRAIN, "music"]
    decision = router.route(["The violinist and the cellist rehearsed the sonata"])[0]
    assert decision.domain == "music" and decision.adapters[0].ref == "music-lora:1"
    assert router.evaluate(HELDOUT)["accuracy"] == 1.0


def test_hybrid_threshold_sends_out_of_domain_to_base_and_round_trips():
    router = HybridRouter().fit(TRAIN)
    cal = router.calibrate(HELDOUT, OOD_CALIBRATE)
    assert cal.threshold > 0 and cal.ood_fallback_rate == 1.0
    assert [d.domain for d in router.route(OOD_TEST)] == [None] * len(OOD_TEST)
    files = router.to_files()
    again = load_router(files)
    assert isinstance(again, HybridRouter) and again.threshold == router.threshold
    assert again.calibration == router.calibration and again.to_files() == files
    texts = [*HELDOUT["cooking"], *OOD_TEST]
    assert torch.equal(again.score(texts), router.score(texts))
    again.add_domain("music", EXTRA["music"])  # a loaded router grows like a fitted one
    assert again.route(["The pianist played a sonata at the concert"])[0].domain == "music"


@pytest.mark.parametrize("kwargs,message", [
    ({"embed_chars": 4}, "embed_chars 4 is invalid: use a whole number >= 16 (e.g. 250)"),
    ({"lexical_weight": -1}, "lexical_weight=-1 must be a number >= 0 (e.g. 1.0)"),
    ({"alpha": -0.1}, "alpha=-0.1 must be a positive number (e.g. 0.03)"),
])
def test_hybrid_settings_errors(kwargs, message):
    with pytest.raises(BadInputError) as e:
        HybridRouter(**kwargs)
    assert str(e.value) == message
    with pytest.raises(BadInputError) as e:
        HybridRouter().score(["hello"])
    assert str(e.value) == "the hybrid router has no domains yet: fit it or add_domain first"


def test_a_workspace_built_with_the_old_default_keeps_its_router(tmp_path):
    from plait.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", tracking_uri="none")
    assert ws.router_kind == "hybrid"  # fresh: the default
    old = EmbeddingRouter().fit(TRAIN)
    ws.registry.register_router("embedding", kind="embedding", files=old.to_files(), covers=[], metrics={})
    assert Workspace(tmp_path / "ws").router_kind == "embedding"  # it has only an embedding router
    new = HybridRouter().fit(TRAIN)
    ws.registry.register_router("hybrid", kind="hybrid", files=new.to_files(), covers=[], metrics={})
    assert Workspace(tmp_path / "ws").router_kind == "hybrid"
