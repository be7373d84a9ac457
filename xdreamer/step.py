"""The backward half of one optimization step: decide whether to skip, backpropagate the scaled
loss, average the gradients over the ranks, unscale them and check them.

Every rank takes the same collectives in the same order whatever it sees (a collective that one
rank skips leaves the others waiting, or pairs it with the wrong tensor): first one flag
all-reduce that decides a skip for a non-finite loss, then, only if no rank skips, one gradient
all-reduce. After it every rank holds the same gradients, so the overflow check needs no
further collective to agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xdreamer.distributed import DataParallel
from xdreamer.guidance.loss_scale import DynamicLossScaler

NON_FINITE_LOSS = "non-finite loss"
NON_FINITE_GRADIENT = "non-finite gradient"
OVERFLOW = "loss-scale overflow"


@dataclass(frozen=True)
class StepOutcome:
    """apply: the gradients are averaged, unscaled and finite: step the optimizers (which may clip).

    Otherwise `reason` says why not:
    - NON_FINITE_LOSS: a loss (or the SDS gradient, `skip`) was inf/NaN on some rank; no backward ran.
    - NON_FINITE_GRADIENT: inf/NaN gradients without loss scaling, or at the smallest scale.
    - OVERFLOW: the loss scale was too large for float16 and has been lowered. Normal under
      dynamic loss scaling (a few times at the start, then about once per growth interval):
      not a sign of a run going bad."""

    apply: bool
    reason: str | None = None
    scale: float = 1.0  # the loss scale this step's backward used

    @property
    def nan_skip(self) -> bool:
        """A skip that counts towards restoring the last good checkpoint."""
        return self.reason in (NON_FINITE_LOSS, NON_FINITE_GRADIENT)


def backward_step(
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    dp: DataParallel,
    scaler: DynamicLossScaler,
    skip: bool = False,
) -> StepOutcome:
    """Backpropagate `loss` (a scalar) into `params` (every trained parameter, zero-gradded by
    the caller) and leave them averaged over the ranks and unscaled, ready for clipping and
    stepping, or report why this step must be skipped.

    skip: this rank already knows the step is bad (e.g. `SDSOutput.skipped`)."""
    scale = scaler.scale_value
    bad_loss = skip or ~torch.isfinite(loss.detach()).all()
    if dp.any(bad_loss):
        return StepOutcome(False, NON_FINITE_LOSS, scale)
    scaler.scale(loss).backward()
    dp.average_gradients(params)
    found_inf = bool(scaler.unscale_(params).item())
    scaler.update(found_inf)
    if found_inf:
        reason = OVERFLOW if scaler.enabled and scale > scaler.min_scale else NON_FINITE_GRADIENT
        return StepOutcome(False, reason, scale)
    return StepOutcome(True, None, scale)
