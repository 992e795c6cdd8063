"""One view of multi-process runs for search, evaluation and distillation.

stepsmith never starts processes itself: ``accelerate launch`` (or ``torchrun``) does, and every
command joins the process group the same way (:func:`init_distributed`). A single process is a
world of size 1, where every collective is the identity, so code is written once for both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch


def init_distributed() -> None:
    """Join the process group when launched with WORLD_SIZE > 1 (accelerate's PartialState; gloo on CPU).

    A no-op for a single process or when the group is already initialised.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


@dataclass
class Dist:
    """This process's rank in a world of ``world`` processes, with the few collectives stepsmith needs."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """Contiguous slice of ``n`` items for this process (rank 0 gets the first ones)."""
        per = math.ceil(n / self.world)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order (empty shards skipped)."""
        if self.world == 1:
            return t
        objs: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(objs, t.cpu())
        return torch.cat([o for o in objs if o.numel()] or [t.cpu()])

    def sum(self, v: float) -> float:
        if self.world == 1:
            return v
        objs: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(objs, float(v))
        return float(sum(objs))

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; the input is untouched)."""
        if self.world == 1:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def current_dist() -> Dist:
    """The torch.distributed layout; joins the process group first under a multi-process launcher."""
    init_distributed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Dist()


__all__ = ["Dist", "current_dist", "init_distributed"]
