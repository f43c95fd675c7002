"""Process settings for plait's long bookkeeping passes."""

from __future__ import annotations

import contextlib
import gc

#: gen-0 allocations between collections during a pass (Python's default is 700)
GC_GEN0 = 100_000


@contextlib.contextmanager
def fewer_gc_passes():
    """Collect garbage less often inside the block, as a full audit or router update builds tens
    of thousands of short-lived rows (registry rows, figures, decisions) in a process that holds
    a model: with the default thresholds the cyclic collector rescans that heap again and again
    (about 15% of an add-domain pass at 1,000 domains, bench/scale.py). Nothing here creates
    reference cycles worth collecting early; the previous thresholds come back on exit."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], GC_GEN0), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
