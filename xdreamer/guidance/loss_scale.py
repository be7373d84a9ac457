"""Dynamic loss scaling for the backward pass through the half-precision UNet and VAE.

With AMA on, the loss reaches the frozen float16 UNet at its attention maps: about
λ / (L h w) = 0.1 / (16 · 4096) ≈ 1.5e-6 per element of a 64x64 map, below float16's smallest
normal number (6.1e-5). Cast to float16 inside the UNet's backward, such gradients lose their
precision or flush to zero. Multiplying the loss by a scale S before the backward pass lifts them
into float16's range; the float32 parameter gradients are divided by S before clipping and
stepping. S is a power of two, so scaling and unscaling are exact wherever nothing overflows.

The rule is torch.amp.GradScaler's: a step whose gradients hold an inf or NaN is skipped and S is
multiplied by `backoff_factor`; after `growth_interval` good steps in a row S is multiplied by
`growth_factor`. It is a small class of its own because a step here has several optimizers and a
clip inside `ClippedOptimizer.step()`, which GradScaler's per-optimizer bookkeeping does not fit.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class LossScaleError(ValueError):
    """A loss-scaler setting or state that cannot be used."""


class DynamicLossScaler:
    """Scale the loss, unscale the gradients, lower the scale on overflow, raise it after a run of
    good steps. With `enabled` False (float32 models) the scale is 1 and nothing changes, but
    `unscale_` still reports non-finite gradients.

    min_scale: the scale never goes below it; an overflow at min_scale (1 = no scaling at all) is
    a gradient that is non-finite on its own, not a scale that is too large (see `step.py`)."""

    def __init__(
        self,
        enabled: bool = True,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ):
        if not (init_scale >= min_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise LossScaleError(
                "loss scaling needs init_scale >= min_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 "
                "and growth_interval >= 1"
            )
        self.enabled = enabled
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._scale = float(init_scale) if enabled else 1.0
        self._good_steps = 0

    @property
    def scale_value(self) -> float:
        """The current loss scale S (1.0 when disabled)."""
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * S, to call backward() on."""
        return loss * self._scale if self.enabled else loss

    def unscale_(self, params) -> torch.Tensor:
        """Divide every gradient of `params` by S in place; returns a 0-dim bool tensor on the
        gradients' device: True when any gradient holds an inf or NaN."""
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            if p.grad is not None:
                by_device[p.grad.device].append(p.grad)
        if not by_device:
            return torch.zeros((), dtype=torch.bool)
        found = []
        for device, grads in by_device.items():
            found_inf = torch.zeros(1, device=device)
            inv_scale = torch.full((1,), 1.0 / self._scale, device=device)
            # GradScaler's fused kernel: multiplies by inv_scale and flags inf/NaN in one pass.
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
            found.append(found_inf)
        first = found[0].device
        return torch.cat([f.to(first) for f in found]).amax() > 0

    def update(self, found_inf: bool) -> None:
        """Lower the scale after an overflow, raise it after `growth_interval` good steps."""
        if not self.enabled:
            return
        if found_inf:
            self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self._scale *= self.growth_factor
            self._good_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        """Plain Python numbers, for JSON or safetensors metadata as well as torch checkpoints."""
        return {"scale": self._scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict) -> None:
        scale, good_steps = float(state["scale"]), int(state["good_steps"])
        if not scale > 0 or good_steps < 0:
            raise LossScaleError(f"loss-scaler state has scale {scale} and good_steps {good_steps}")
        self._scale = scale if self.enabled else 1.0
        self._good_steps = good_steps
