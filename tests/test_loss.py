"""The fused output-projection + cross-entropy (training.loss) against the plain path:
equal loss sums, token counts and gradients for every adapter kind, in fp32 and bf16, with
prompt and padding positions ignored; models it cannot fuse keep the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.data import IGNORE_INDEX
from training.loss import CHUNK_ELEMENTS, fused_token_loss_sum, split_causal_lm
from training.methods import get_kind
from training.trainer import token_loss_sum

KIND_CASES = [("lora", {}), ("qlora", {}), ("bottleneck", {"placement": "houlsby", "reduction_factor": 4})]


def batch() -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # padding
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[2, :7] = IGNORE_INDEX  # a prompt: no loss on its tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_loss_sum(model, b, dtype=None):
    """The reference: the whole batch's logits, then cross-entropy over the shifted labels."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    labels = F.pad(b["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def adapted(tiny_base, kind, options):
    method = get_kind(kind)
    settings = method.make_config(**options)
    base = method.load_base(tiny_base, settings)
    torch.manual_seed(0)
    model = method.attach(base.model, settings)
    with torch.no_grad():  # a non-trivial adapter, so its gradients are not those of a zero delta
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.train()
    method.prepare_for_training(model)
    return model


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,options", KIND_CASES, ids=[k for k, _ in KIND_CASES])
def test_fused_loss_and_gradients_equal_the_plain_path(tiny_base, kind, options):
    model = adapted(tiny_base, kind, options)
    parts = split_causal_lm(model)
    assert parts is not None
    b = batch()
    ref, n_ref = plain_loss_sum(model, b)
    got, n = fused_token_loss_sum(*parts, b["input_ids"], b["attention_mask"], b["labels"])
    assert n == n_ref == 3 * 19 - 6 - 6  # last positions, 6 padding labels, the 6 prompt positions that follow a prompt token
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    g_ref, g_got = grads_of(model, ref), grads_of(model, got)
    assert g_ref.keys() == g_got.keys() and g_ref
    for name in g_ref:
        assert g_got[name].abs().sum() > 0, name
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_under_bf16_autocast_matches_the_plain_path(tiny_base):
    model = adapted(tiny_base, "lora", {})
    b = batch()
    ref, _ = plain_loss_sum(model, b, "bf16")
    got, _ = token_loss_sum(model, b, "bf16", "cpu")
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=0)
    g_ref, g_got = grads_of(model, ref), grads_of(model, got)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=0.05, atol=2e-4, msg=name)


def test_many_chunks_give_the_one_chunk_result(tiny_base, monkeypatch):
    model = adapted(tiny_base, "lora", {})
    b = batch()
    parts = split_causal_lm(model)
    one, _ = fused_token_loss_sum(*parts, b["input_ids"], b["attention_mask"], b["labels"])
    g_one = grads_of(model, one)
    monkeypatch.setattr("training.loss.CHUNK_ELEMENTS", 16 * 320)  # chunks of 16 rows over the 320-token vocab
    assert CHUNK_ELEMENTS > 16 * 320
    many, _ = fused_token_loss_sum(*parts, b["input_ids"], b["attention_mask"], b["labels"])
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-5)
    for name, g in grads_of(model, many).items():
        torch.testing.assert_close(g, g_one[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_labelled_token_gives_zero_loss_and_zero_gradients(tiny_base):
    model = adapted(tiny_base, "lora", {})
    b = batch()
    b["labels"] = torch.full_like(b["labels"], IGNORE_INDEX)
    loss, n = token_loss_sum(model, b, "fp32", "cpu")
    assert n == 0 and float(loss.detach()) == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads_of(model, loss).values())


def test_a_trainable_or_adapted_head_keeps_the_plain_path(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with_head = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_base),
                               LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert split_causal_lm(with_head) is None  # lm_head is a LoRA layer, not a plain Linear
    b = batch()
    torch.testing.assert_close(token_loss_sum(with_head, b, "fp32", "cpu")[0], plain_loss_sum(with_head, b)[0])
    bare = LlamaForCausalLM.from_pretrained(tiny_base).requires_grad_(False)
    assert split_causal_lm(bare) is not None
    bare.lm_head.weight.requires_grad_(True)
    assert split_causal_lm(bare) is None
    bare.lm_head.weight.requires_grad_(False)
    bare.config.model_type = "gemma2"  # softcapped logits: never fused
    assert split_causal_lm(bare) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_nll_is_each_positions_log_probability_of_the_next_token(dtype):
    """The engine's and the perplexity router's per-token loss: -log softmax(logits[b, t])[ids[b, t + 1]],
    computed in float32 whatever the logits' dtype, one column fewer than positions."""
    from training.evaluation import next_token_nll

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 9, 50, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    nll = next_token_nll(logits, ids)
    assert nll.shape == (3, 8) and nll.dtype == torch.float32
    logp = torch.log_softmax(logits.float(), dim=-1)
    want = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(nll, want, atol=1e-5, rtol=0)
    assert nll[1, 4] > 0 and not torch.equal(nll[0], nll[1])
