"""Rehearsal: a warm-started adapter keeps what its source learned (`plait train --replay`).

A warm start (`training.warmstart`) gives a new adapter what an earlier one learned, but
training on the new domain alone then wears that away: the new version is better on its own
domain and worse on the ones its source served. Mixed into its training batches, a share of
the stored training rows of the domains its source *covers* keeps it good on them too, so the
router may re-point those domains to it when it serves them better (backward transfer; see
`plait.continual.repoint_domains`). This is experience replay (Chaudhry et al. 2019, "On Tiny
Episodic Memories in Continual Learning"), applied to a new adapter only: nothing stored
changes, and the rows replayed are the ones each domain stored for training (never an eval or
validation row: those were split off before the domain's training rows were stored).

What a version covers is recorded on it (`config["covers"]`): its own domain, everything its
warm-start source covered and, under `--init auto`, everything covered by the other candidates
that beat the base on the new domain's sample (they are related to it too, only less than the
source), so warm starts through related domains grow one adapter that can serve them all even
when the chain of sources branches. A fresh adapter (no related version beat the base on the new
domain's rows) covers its own domain only and replays nothing: the earlier domains are not
related enough to start from, so there is nothing of theirs to keep.

The share is of the training *examples*, so the step count, the batch size and the compute stay
those of the run: with `share` 0.25 and 64 new examples, 21 replayed examples join them and
every batch holds about one replayed example in four. The replayed examples are spread evenly
over the covered domains (round robin over seeded shuffles), so a long chain replays each
earlier domain less, and the total stays bounded by the share.
"""

from __future__ import annotations

import random
from typing import Any

from registry.errors import BadInputError, NotFoundError

#: the default share of replayed examples in a warm-started run's training examples
REPLAY_SHARE = 0.25
#: the most domains one run replays (the newest of its source's chain); a chain longer than
#: this keeps its recent domains and lets the oldest go, so one run's reads stay bounded
MAX_REPLAY_DOMAINS = 64


def check_share(share: float) -> float:
    """The replay share, checked: a number in [0, 1)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise BadInputError(f"replay share {share!r} is invalid: use a number >= 0 and below 1 (0 = no replay)")
    return float(share)


def covered_domains(info) -> list[str]:
    """The domains version `info` was trained to serve: its own, then its chain's (newest first)."""
    stored = (info.config or {}).get("covers")
    return list(stored) if stored else [info.domain]


def covers_after(source, domain: str, related: list | tuple = ()) -> list[str]:
    """What a new version of `domain` warm-started from `source` (None: fresh) covers.

    Args:
        related: the other versions `--init auto` found related (each beat the base on the new
            domain's sample, as `source` did), best first: their domains join after the source's.
    """
    if source is None:
        return [domain]
    out = [domain]
    for info in (source, *related):
        out += [d for d in covered_domains(info) if d not in out]
    return out


def replay_rows(registry, covers: list[str], n_new: int, share: float, seed: int
                ) -> list[tuple[str, dict[str, Any]]]:
    """The stored training rows replayed beside `n_new` new examples.

    Args:
        covers: `covers_after(...)`: the new domain first, then the domains to replay.
        n_new: the new domain's training examples.
        share: the replayed examples' share of all training examples.
        seed: the run's seed (the same run replays the same rows, so `--resume` sees the same data).

    Returns:
        (domain, row) pairs in replay order: `replay_count(n_new, share)` of them, round robin over
        the covered domains that stored training rows (a domain with few rows comes round again).
    """
    want = replay_count(n_new, share)
    pools: list[tuple[str, list[dict[str, Any]]]] = []
    for d in covers[1:MAX_REPLAY_DOMAINS + 1]:
        try:
            rows = registry.get_domain_rows(d, "train")
        except NotFoundError:  # a domain trained before its rows were stored: nothing to replay
            continue
        if rows:
            rows = list(rows)
            random.Random(f"{seed}:{d}").shuffle(rows)
            pools.append((d, rows))
    picked: list[tuple[str, dict[str, Any]]] = []
    counts = {d: 0 for d, _ in pools}
    while pools and len(picked) < want:
        for d, rows in pools:  # round robin: each covered domain gives its share in turn
            if len(picked) == want:
                break
            picked.append((d, rows[counts[d] % len(rows)]))
            counts[d] += 1
    return picked


def replay_count(n_new: int, share: float) -> int:
    """How many replayed examples join `n_new` new ones so that they are `share` of all."""
    return round(share / (1 - share) * n_new) if share else 0
