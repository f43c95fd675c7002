"""Tiny real models for unit tests: a 2-layer Llama with a small trained BPE tokenizer, and
PEFT LoRA adapters on it. Everything is seeded, built in-process in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=320, max_position_embeddings=256)
CORPUS = ["the quick brown fox jumps over the lazy dog", "adapters keep old domains intact",
          "legal contracts bind the parties", "patients take the medicine twice a day"] * 30


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_base(out: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama + tokenizer to `out` (safetensors) and return `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    return Path(out)


def make_peft_lora(base_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A PEFT LoRA folder on the tiny base with non-zero B (so it changes outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(out)
    return Path(out)
