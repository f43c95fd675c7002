"""Merge several LoRA adapters into one with peft's `add_weighted_adapter`.

The forgetting audit's `merged` baseline (`plait.audit`) uses this: "merge every domain's LoRA
into one adapter" is what a user would otherwise do to serve many domains with one model.
With ΔW_j = s_j B_j A_j the weight delta of LoRA j (s_j = alpha / r, or alpha / sqrt(r) with
rsLoRA) and w_j its weight, the three methods are

    cat     ΔW = sum_j w_j ΔW_j exactly: the A's (scaled by w_j s_j) and B's are concatenated,
            so the merged rank is the sum of the ranks; any ranks and target modules mix.
    ties    TIES-Merging (Yadav et al. 2023, arXiv:2306.01708) of the full deltas ΔW_j: keep each
            delta's top `density` share of entries by magnitude, elect a sign per entry by total
            mass, average the entries that agree; then an SVD back to the largest input rank
            (peft's `ties_svd`, so differing ranks and target modules mix). The slow one: a
            top-k and an SVD per weight matrix (minutes for SmolLM2 on a 2-core CPU).
    linear  peft's `linear`: A = sum_j sqrt(w_j s_j) A_j, B = sum_j sqrt(w_j s_j) B_j. Cheap but an
            approximation (the product has cross terms B_i A_j); needs one rank for all adapters.

The merged adapter is saved in the plain PEFT layout with lora_alpha = r (scaling 1), ready for
the registry and the composition engine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from registry.errors import BadInputError

MERGE_METHODS = ("cat", "ties", "linear")
#: the share of each delta's entries TIES keeps (the paper's default k = 20%)
TIES_DENSITY = 0.2
#: the combination_type passed to peft for each method
_PEFT_COMBINATION = {"cat": "cat", "ties": "ties_svd", "linear": "linear"}
_MERGED = "merged"


def merge_weights(method: str, n: int) -> list[float]:
    """The default weight of each of `n` adapters: 1/n for cat and linear (the mean of the
    deltas), 1.0 for ties (its disjoint mean already averages the agreeing entries)."""
    check_method(method)
    return [1.0] * n if method == "ties" else [1.0 / n] * n


def check_method(method: str) -> None:
    """Raises BadInputError for an unknown merge method."""
    if method not in MERGE_METHODS:
        raise BadInputError(f"unknown merge method {method!r}: use one of {', '.join(MERGE_METHODS)}")


def _check_mergeable(folders: Sequence[Path]) -> None:
    """Refuse folders of a kind peft's weighted merge does not handle (the kind's MERGEABLE)."""
    from training.methods import detect_folder, get_kind, mergeable_kinds

    for folder in folders:
        kind = detect_folder(folder)
        if not get_kind(kind).mergeable:
            raise BadInputError(f"{folder} holds a {kind} adapter, which cannot be merged; merge adapters of the "
                                f"kinds {', '.join(mergeable_kinds())}")


def merge_loras(model, folders: Sequence[str | Path], weights: Sequence[float], out: str | Path, *,
                method: str = "cat", density: float = TIES_DENSITY) -> Path:
    """Merge the PEFT LoRA folders into one LoRA written to `out`.

    Args:
        model: the base causal LM the adapters were trained on, full precision. It is wrapped
            by peft in place: pass a copy you do not need afterwards.
        folders: adapter folders (adapter_config.json + adapter_model.safetensors), at least one.
        weights: one weight per folder (see `merge_weights` for the defaults).
        out: where the merged adapter's two files go.
        method: cat, ties or linear (see the module docstring).
        density: the share of entries TIES keeps.

    Returns:
        `out`.

    Raises:
        BadInputError: unknown method, no folders, a weight count that differs, or adapters
            the method cannot merge (linear with differing ranks).
    """
    from peft import PeftModel

    check_method(method)
    folders = [Path(f) for f in folders]
    if not folders:
        raise BadInputError("nothing to merge: give at least one LoRA adapter folder")
    if len(weights) != len(folders):
        raise BadInputError(f"got {len(weights)} weights for {len(folders)} adapters; give one weight each")
    _check_mergeable(folders)
    if method == "linear":
        ranks = {f: json.loads((f / "adapter_config.json").read_text()).get("r") for f in folders}
        if len(set(ranks.values())) > 1:
            raise BadInputError(f"merge method linear needs adapters of one rank, got ranks "
                                f"{sorted(set(ranks.values()))}; use merge method cat or ties")
    names = [f"a{i}" for i in range(len(folders))]
    pm = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        pm.load_adapter(str(folder), adapter_name=name)
    try:
        pm.add_weighted_adapter(names, [float(w) for w in weights], _MERGED,
                                combination_type=_PEFT_COMBINATION[method],
                                density=density if method == "ties" else None, svd_full_matrices=False)
    except ValueError as e:  # peft's own refusals (target module types, ranks) are bad input here
        raise BadInputError(f"peft cannot merge these adapters with {method}: {e}") from None
    # peft copies the first adapter's config and sets lora_alpha = r: the merged factors already
    # hold every scaling, so the merged adapter must apply scaling 1, also if the first used rsLoRA
    pm.peft_config[_MERGED].use_rslora = False
    pm.peft_config[_MERGED].inference_mode = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp, safe_serialization=True, selected_adapters=[_MERGED])
        saved = Path(tmp) / _MERGED  # a non-default adapter is saved in a sub-folder of its name
        shutil.copyfile(saved / "adapter_model.safetensors", out / "adapter_model.safetensors")
        config = json.loads((saved / "adapter_config.json").read_text())
        if isinstance(config.get("target_modules"), list):  # a set in peft: sorted for stable bytes
            config["target_modules"] = sorted(config["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out
