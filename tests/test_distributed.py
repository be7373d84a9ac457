"""Data parallelism: collectives on the process group's device, and the same collectives on every
rank when one rank alone sees a non-finite loss or a missing gradient (two gloo ranks)."""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from xdreamer.distributed import DataParallel, init_data_parallel
from xdreamer.guidance.loss_scale import DynamicLossScaler
from xdreamer.step import NON_FINITE_LOSS, OVERFLOW, backward_step

STEPS = 8
NAN_STEP, OVERFLOW_STEP, LONE_GRADIENT_STEP = 2, 4, 5


def test_every_collective_runs_on_the_gradients_device(monkeypatch):
    """NCCL takes only CUDA tensors: a collective handed a tensor on another device than the
    gradients' fails there. Here the gradients and the group live on 'meta', which no tensor
    reaches by accident (the CPU would hide a tensor created without a device)."""
    devices = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: devices.append(tensor.device))
    # Meta tensors hold no values: reading one back gives 0 (no rank saw a problem, every
    # gradient present), as the real collectives would return on healthy ranks.
    item, tolist = torch.Tensor.item, torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda self: 0.0 if self.is_meta else item(self))
    monkeypatch.setattr(
        torch.Tensor, "tolist", lambda self: torch.ones(self.shape).tolist() if self.is_meta else tolist(self)
    )
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to("meta")
    loss = model(torch.randn(16, 4, device="meta")).square().mean()
    dp = DataParallel(rank=0, world=2, device=torch.device("meta"))
    outcome = backward_step(loss, list(model.parameters()), dp, DynamicLossScaler())
    assert outcome.apply
    grad_devices = {p.grad.device for p in model.parameters()}
    assert grad_devices == {torch.device("meta")}
    assert len(devices) == 2  # the skip decision, then the gradients
    assert set(devices) == grad_devices
    assert dp.any(torch.tensor(True)) is False and devices[-1] == torch.device("meta")


@pytest.mark.parametrize("device_name, backend, expected", [("cuda", "nccl", "cuda:1"), ("cpu", "gloo", "cpu")])
def test_the_group_device_follows_the_backend(monkeypatch, device_name, backend, expected):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    started = []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(dist, "init_process_group", lambda name, **kwargs: started.append(name))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: started[0])
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    dp, name = init_data_parallel(device_name)
    assert started == [backend]
    assert (dp.rank, dp.world, name) == (1, 2, expected)
    assert dp.device == torch.device(expected)


def _model() -> tuple[nn.Module, nn.Parameter]:
    torch.manual_seed(0)  # the same initial weights on every rank, as after a checkpoint load
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), nn.Parameter(torch.zeros(3))


def _rank_loss(model: nn.Module, lone: nn.Parameter, rank: int, step: int, generator: torch.Generator) -> torch.Tensor:
    """Rank `rank`'s loss at `step`: its own data; rank 1 alone sees a NaN at NAN_STEP; rank 0
    alone overflows the loss scale at OVERFLOW_STEP (finite loss, gradient 3e38 x scale); rank 1
    alone reaches `lone` at LONE_GRADIENT_STEP."""
    x = torch.randn(16, 4, generator=generator)
    loss = (model(x)[:, 0] - x.sum(dim=1).sin()).square().mean()
    if step == NAN_STEP and rank == 1:
        loss = loss * float("nan")
    if step == OVERFLOW_STEP and rank == 0:
        loss = loss + model[2].bias.sum() * 3e38
    if step == LONE_GRADIENT_STEP and rank == 1:
        loss = loss + (lone * torch.arange(3.0)).sum()
    return loss


def _train(dp: DataParallel, loss_fn) -> tuple[list[str | None], dict, dict]:
    model, lone = _model()
    params = list(model.parameters()) + [lone]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scaler = DynamicLossScaler(init_scale=2.0**8, growth_interval=3)
    reasons = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        outcome = backward_step(loss_fn(model, lone, step), params, dp, scaler)
        reasons.append(outcome.reason)
        if outcome.apply:
            optimizer.step()
    state = {name: value.clone() for name, value in model.state_dict().items()} | {"lone": lone.detach().clone()}
    return reasons, state, scaler.state_dict()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    generator = torch.Generator().manual_seed(100 + rank)
    try:
        result = _train(DataParallel(rank, world), lambda m, lone, step: _rank_loss(m, lone, rank, step, generator))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's finalization, where gloo's worker
    # threads can still be torn down after Python and abort the process now and then
    # ("terminate called without an active exception", pytorch/pytorch#179291).
    os._exit(0)


def test_two_gloo_ranks_stay_identical_when_one_alone_sees_a_nan(tmp_path):
    context = mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish: mismatched collectives hang")
    (reasons0, state0, scaler0), (reasons1, state1, scaler1) = (
        torch.load(tmp_path / f"rank{r}.pt") for r in range(2)
    )
    expected = [None] * STEPS
    expected[NAN_STEP], expected[OVERFLOW_STEP] = NON_FINITE_LOSS, OVERFLOW
    assert reasons0 == reasons1 == expected
    assert scaler0 == scaler1
    # 2^8; steps 0, 1, 3 good (the NaN step leaves the scale alone): 2^9; overflow: 2^8;
    # steps 5, 6, 7 good: 2^9
    assert scaler0 == {"scale": 2.0**9, "good_steps": 0}
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
    # The lone parameter moved on both ranks by the average of its gradient (rank 0 had none).
    assert state0["lone"][0] == 0 and state0["lone"][2] < 0

    # One process on the mean loss of the two ranks takes the same steps: the average is right.
    generators = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    reference = _train(
        DataParallel(),
        lambda m, lone, step: 0.5 * sum(_rank_loss(m, lone, r, step, generators[r]) for r in range(2)),
    )
    assert reference[0] == expected and reference[2] == scaler0
    for name in state0:
        torch.testing.assert_close(state0[name], reference[1][name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(state0["0.weight"], _model()[0].state_dict()["0.weight"])
