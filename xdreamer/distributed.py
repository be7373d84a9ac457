"""Data parallelism under `torchrun`: each rank renders its own views (its own azimuth sector, as
the authors' 4 GPUs did), gradients are averaged, and only rank 0 writes files.

Every rank draws the random numbers of the whole world batch from the same generator and keeps
its own slice, so the generators stay in step and rank 0's checkpoint resumes every rank."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def own(self, batch: torch.Tensor | object, per_rank: int):
        """This rank's slice of a world batch (anything sliceable along its first axis)."""
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (skips and stops stay in step)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([float(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_data_parallel(device_name: str) -> tuple[DataParallel, str]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns the group and the device name
    this rank should use (its own GPU under CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DataParallel(), device_name
    import torch.distributed as dist

    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    return DataParallel(dist.get_rank(), dist.get_world_size()), device_name
