"""Shared fixtures: a tiny seeded Llama-style base saved as a real model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=320, max_position_embeddings=256)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) that fits the tiny vocab of 320."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_tiny_base(folder: Path, seed: int = 0) -> Path:
    """Save a seeded tiny Llama (hidden 64: a multiple of bitsandbytes' 4-bit block size) with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    cfg = LlamaConfig(**TINY, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A folder holding the tiny base (config.json, model.safetensors, tokenizer)."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(autouse=True)
def _plait_cache(tmp_path_factory, monkeypatch):
    # fingerprints and converted bases of the tests go to a private cache
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path_factory.getbasetemp() / "plait-cache"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
