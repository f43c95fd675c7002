"""Continual-learning metrics over the matrix R[i][j]: after adding domain i, performance on domain j.

Definitions follow Avalanche (`avalanche/evaluation/metrics/forgetting_bwt.py` and
`forward_transfer.py`; Lomonaco et al. 2021, arXiv:2104.00405), which in turn follow
Lopez-Paz & Ranzato 2017 (GEM, arXiv:1706.08840) for BWT/FWT and Chaudhry et al. 2018
(arXiv:1801.10112) for forgetting. With T domains and the last stage L = T-1:

    ACC            = mean_j R[L][j]                           average final performance
    forgetting_j   = R[j][j] - R[L][j]          (j < L)       Avalanche: first value minus last
    BWT            = mean_{j<L} (R[L][j] - R[j][j]) = -mean forgetting
    FWT            = mean_{j>=1} (R[j-1][j] - b_j)            b_j: the base model on domain j

plait measures losses as well as accuracies. So that one reading holds for both, every figure
here is *signed by goodness*: for a lower-is-better metric (a loss) the differences are
negated, so positive forgetting always means worse, positive BWT/FWT always means better.

A system that exists only after the last stage (joint multi-task training on every domain at
once, the field's upper bound) has a last row and nothing before it: `final_stage_metrics`
gives its ACC and leaves BWT, FWT and forgetting undefined (None, empty), rather than a 0 that
would read as "forgets nothing".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from registry.errors import BadInputError


@dataclass
class ContinualMetrics:
    """ACC, BWT, FWT and per-domain forgetting of one system over T stages."""

    acc: float
    bwt: float | None
    fwt: float | None
    forgetting: dict[str, float]
    max_forgetting: float | None
    """None for a one-stage system (`final_stage_metrics`): nothing earlier to forget"""
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(R: list[list[float | None]], i: int, j: int) -> float:
    v = R[i][j] if j < len(R[i]) else None
    if v is None or (isinstance(v, float) and math.isnan(v)):
        raise BadInputError(f"the matrix has no value at R[{i}][{j}]; every stage must be measured on every "
                            f"domain it had seen")
    return float(v)


def continual_metrics(R: list[list[float | None]], domains: list[str], *, higher_is_better: bool,
                      base: list[float] | None = None) -> ContinualMetrics:
    """Compute ACC, BWT, FWT and forgetting from R (rows: stages, columns: domains).

    Args:
        R: R[i][j] = performance on domain j after adding domain i. Entries above the diagonal
            are needed only for FWT (R[j-1][j]) and may be None otherwise.
        domains: the T domain names in the order they were added.
        higher_is_better: True for accuracies, False for losses.
        base: b_j, the base model's performance on each domain (for FWT); None skips FWT.

    Returns:
        the metrics, signed so that positive forgetting is worse and positive BWT/FWT better.
    """
    T = len(domains)
    if T == 0 or len(R) != T:
        raise BadInputError(f"the matrix has {len(R)} rows for {T} domains; it needs one row per domain")
    sign = 1.0 if higher_is_better else -1.0
    L = T - 1
    acc = sum(_value(R, L, j) for j in range(T)) / T
    # (+ 0.0 turns the -0.0 of an unchanged loss into 0.0)
    forgetting = {domains[j]: sign * (_value(R, j, j) - _value(R, L, j)) + 0.0 for j in range(L)}
    bwt = 0.0 - sum(forgetting.values()) / L if L else None  # 0.0 - x: no "-0.0" for no forgetting
    fwt = None
    if base is not None and T > 1:
        if len(base) != T:
            raise BadInputError(f"base has {len(base)} values for {T} domains")
        fwt = sum(sign * (_value(R, j - 1, j) - float(base[j])) for j in range(1, T)) / (T - 1)
    return ContinualMetrics(acc=acc, bwt=bwt, fwt=fwt, forgetting=forgetting,
                            max_forgetting=max(forgetting.values(), default=0.0), higher_is_better=higher_is_better)


def final_stage_metrics(row: list[float | None], domains: list[str], *, higher_is_better: bool) -> ContinualMetrics:
    """ACC of a system measured after the last stage only (e.g. joint training on every domain).

    Args:
        row: its performance on each of the T domains, in order.
        domains: the T domain names.
        higher_is_better: True for accuracies, False for losses.

    Returns:
        the metrics with `acc` = mean of `row`; `bwt`, `fwt` and `max_forgetting` None and
        `forgetting` empty, since they compare stages this system never had.
    """
    if not domains or len(row) != len(domains):
        raise BadInputError(f"the row has {len(row)} values for {len(domains)} domains; it needs one per domain")
    acc = sum(_value([row], 0, j) for j in range(len(domains))) / len(domains)
    return ContinualMetrics(acc=acc, bwt=None, fwt=None, forgetting={}, max_forgetting=None,
                            higher_is_better=higher_is_better)
