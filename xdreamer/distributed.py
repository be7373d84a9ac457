"""Data parallelism under `torchrun`: each rank renders its own views (its own azimuth sector, as
the authors' 4 GPUs did), gradients are averaged, and only rank 0 writes files.

Every rank draws the random numbers of the whole world batch from the same generator and keeps
its own slice, so the generators stay in step and rank 0's checkpoint resumes every rank.

Collectives run on the process group's device (the rank's GPU under NCCL, the CPU under gloo),
and each method issues the same collectives on every rank whatever its tensors hold, so that a
rank that sees something unusual (a NaN, a missing gradient) never leaves the others waiting in
a different collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DataParallel:
    """rank / world of the torchrun group; device: where its collectives run (cuda:LOCAL_RANK
    under NCCL, which only takes CUDA tensors; cpu under gloo)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def own(self, batch: torch.Tensor | object, per_rank: int):
        """This rank's slice of a world batch (anything sliceable along its first axis)."""
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of `params` over the ranks: one all-reduce of one flat float32
        buffer, whatever the gradients hold, so every rank takes the same collective.

        A missing gradient counts as zero; a parameter keeps no gradient (None) only if it has
        none on every rank, so the optimizers treat it alike everywhere."""
        if self.world == 1:
            return
        import torch.distributed as dist

        params = list(params)
        pieces = [
            p.grad.detach().reshape(-1).to(self.device, torch.float32)
            if p.grad is not None
            else torch.zeros(p.numel(), device=self.device)
            for p in params
        ]
        present = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        flat = torch.cat(pieces + [present])
        dist.all_reduce(flat)
        counts = flat[-len(params) :].tolist()
        start = 0
        for p, count in zip(params, counts):
            values = flat[start : start + p.numel()]
            start += p.numel()
            if count == 0:
                p.grad = None
                continue
            average = (values / self.world).view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = average
            else:
                p.grad.copy_(average)

    def any(self, flag: bool | torch.Tensor) -> bool:
        """True on every rank if `flag` is true on any rank (skips and stops stay in step).

        flag: a bool or a tensor (any device); a tensor is reduced without first being read
        back, so a rank's check costs one host synchronization, after the collective."""
        if self.world == 1:
            return bool(flag)
        import torch.distributed as dist

        value = torch.as_tensor(flag).to(self.device, torch.float32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def init_data_parallel(device_name: str) -> tuple[DataParallel, str]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns the group and the device name
    this rank should use (its own GPU under CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DataParallel(), device_name
    import torch.distributed as dist

    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    group_device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DataParallel(dist.get_rank(), dist.get_world_size(), group_device), device_name
