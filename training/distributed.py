"""Data-parallel training: one global batch split across processes, gradients averaged per token.

A launcher (`accelerate launch --multi_gpu`, `torchrun`) starts N copies of `plait train` and
sets WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `data_parallel()` reads them
and joins a torch.distributed process group (gloo: the trainer runs on CPU). Then:

    every rank builds the same global batch of step k (a function of (seed, k) alone)
    -> keeps its contiguous shard of it -> forward + backward of its *summed* token loss
    -> one all-reduce (sum) of [every adapter gradient, loss sum, labelled tokens, tokens]
    -> every gradient divided by the global labelled-token count -> identical optimizer steps

The single-process trainer minimises the mean loss over the labelled tokens of the whole
batch, sum_r(loss_sum_r) / sum_r(n_r); dividing each shard by its own token count and
averaging the shards would weight short shards too much. Summing first and dividing by the
global count gives the single-process gradient up to float reduction order.

Only the adapter trains, so a manual all-reduce of its few tensors (one flat buffer, one
collective per step) is all DDP would do here, without wrapping the model. Rank 0's initial
adapter is broadcast so every rank starts from the same weights, whatever its RNG did.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

from registry.errors import BadInputError

#: how long a rank waits in a collective (rank 0 evaluates and registers while the others wait)
TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run."""

    rank: int
    """0 .. world_size - 1; rank 0 evaluates, checkpoints, registers and prints"""
    world_size: int
    """number of processes sharing each global batch"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a global batch that does not split evenly across the processes.

        Raises:
            BadInputError: naming the batch size and the nearest multiple that works.
        """
        if batch_size % self.world_size:
            fit = max(self.world_size, round(batch_size / self.world_size) * self.world_size)
            raise BadInputError(f"batch size {batch_size} does not split across {self.world_size} processes: "
                                f"use a multiple of {self.world_size} (e.g. a batch size of {fit})")

    def shard(self, batch: list) -> list:
        """This rank's contiguous share of a global batch (may be empty for a short last batch)."""
        per = -(-len(batch) // self.world_size)
        return batch[self.rank * per:(self.rank + 1) * per]

    def broadcast(self, params: list) -> None:
        """Copy rank 0's values of `params` to every rank (in place)."""
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)

    def reduce(self, params: list, loss_sum: float, n_labelled: int, n_tokens: int) -> tuple[float, int, int]:
        """Sum every rank's gradients and counts; leave each gradient divided by the global labelled-token count.

        Args:
            params: the trainable tensors, in the same order on every rank; their `.grad` is the
                gradient of this rank's summed token loss (None on a rank with an empty shard).
            loss_sum: this rank's summed token loss; n_labelled / n_tokens: its counts.

        Returns:
            (global mean token loss, global labelled tokens, global tokens)
        """
        import torch
        import torch.distributed as dist

        flat = torch.cat([(p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                          .reshape(-1) for p in params]
                         + [torch.tensor([loss_sum, n_labelled, n_tokens], dtype=torch.float32)])
        # the counts ride in the same float32 buffer: exact up to 2**24 tokens a step
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        loss_total, labelled, tokens = (float(x) for x in flat[-3:])
        scale = 1.0 / max(labelled, 1.0)
        offset = 0
        for p in params:
            g = flat[offset:offset + p.numel()].view_as(p).mul_(scale)
            p.grad = g.to(p.dtype) if p.dtype != torch.float32 else g
            offset += p.numel()
        return loss_total * scale, int(labelled), int(tokens)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel() -> DataParallel | None:
    """This process's data-parallel context when a launcher started several, else None.

    Joins the process group on first use (gloo, from the launcher's MASTER_ADDR/MASTER_PORT),
    or uses one the caller already set up.

    Raises:
        BadInputError: WORLD_SIZE > 1 without the RANK a launcher sets.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise BadInputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start data-parallel runs "
                            f"with `accelerate launch` or `torchrun`") from None
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise BadInputError(f"WORLD_SIZE={world} but RANK or MASTER_ADDR is not set; start data-parallel runs "
                                f"with `accelerate launch` or `torchrun`, or unset WORLD_SIZE")
        dist.init_process_group("gloo", timeout=TIMEOUT)
        atexit.register(_shutdown)
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size())

