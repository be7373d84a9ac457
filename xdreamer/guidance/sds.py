"""Score distillation sampling (SDS, DreamFusion) through a frozen diffusion model.

For model input x (latents, or images for a pixel-space model), a timestep t and noise ε:
x_t = √ᾱ_t x + √(1-ᾱ_t) ε, ε̂_cfg = ε̂_u + s (ε̂_c - ε̂_u) (classifier-free guidance), and the
SDS gradient on x is w(t) (ε̂_cfg - ε) with the UNet Jacobian dropped.

Batch order: the UNet evaluates 2B samples, **unconditional first**: rows [0, B) carry `uncond`,
rows [B, 2B) carry `cond`, both on the same noisy input. Standard SDS does it in one call. When
the UNet keeps its graph (`unet_grad`, for AMA), it takes two calls: rows [0, B) without autograd,
then rows [B, 2B) with it, so that only the conditional half, the one AMA reads, keeps its
activations for the backward pass (half the UNet's saved memory). Attention processors that
depend on the sample (CG-LoRA's per-sample condition, AMA's attention recording) learn which rows
a call holds from `before_unet(rows)`, called just before each UNet call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xdreamer.guidance.loader import GuidanceModel

WEIGHTINGS = ("sds", "fantasia3d", "uniform")


class GuidanceConfigError(ValueError):
    """An invalid SDS setting (one-line message)."""


@dataclass
class TimestepSchedule:
    """t ~ U[min_ratio, max_ratio] x T, switching to `later` = (min, max) from step `later_step`
    on (e.g. the appearance stage's [0.1, 0.98] then [0.1, 0.5])."""

    min_ratio: float = 0.02
    max_ratio: float = 0.5
    later: tuple[float, float] | None = None
    later_step: int = 0

    def __post_init__(self):
        for lo, hi in [(self.min_ratio, self.max_ratio)] + ([tuple(self.later)] if self.later else []):
            if not 0.0 <= lo <= hi <= 1.0:
                raise GuidanceConfigError(f"timestep range [{lo}, {hi}] must satisfy 0 <= min <= max <= 1")

    def ratios(self, step: int) -> tuple[float, float]:
        if self.later is not None and step >= self.later_step:
            return float(self.later[0]), float(self.later[1])
        return self.min_ratio, self.max_ratio

    def sample(
        self, batch: int, generator: torch.Generator, num_train_timesteps: int = 1000, step: int = 0
    ) -> torch.Tensor:
        """(batch,) int64 timesteps at optimization step `step`, uniform over the integers of
        [min, max] x T (within [0, T-1]), on the generator's device."""
        lo, hi = self.ratios(step)
        low = min(int(round(lo * num_train_timesteps)), num_train_timesteps - 1)
        high = min(int(round(hi * num_train_timesteps)), num_train_timesteps - 1)
        return torch.randint(low, high + 1, (batch,), generator=generator, device=generator.device)


def sds_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """(B,) w(t): "sds" 1 - ᾱ (DreamFusion), "fantasia3d" √ᾱ (1 - ᾱ), "uniform" 1."""
    alpha = alphas_cumprod[t]
    if weighting == "sds":
        return 1.0 - alpha
    if weighting == "fantasia3d":
        return alpha.sqrt() * (1.0 - alpha)
    if weighting == "uniform":
        return torch.ones_like(alpha)
    raise GuidanceConfigError(f"unknown SDS weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def to_unet_dtype(x: torch.Tensor, model: GuidanceModel) -> torch.Tensor:
    """x on the model's device in its dtype (float16 on CUDA); autograd casts gradients back."""
    return x.to(model.device, model.dtype)


@dataclass
class SDSOutput:
    """loss: scalar whose gradient on the input x is grad / B; grad: (B, C, h, w) float32 per-view
    SDS gradient; noise_pred_cfg: (B, C, h, w) float32 guided noise prediction, and
    noise_uncond / noise_cond the two it extrapolates from (detached; noise_uncond is None when
    the step did not evaluate it, see `score_distillation`); skipped: the gradient was
    not finite and was zeroed (the caller counts these steps)."""

    loss: torch.Tensor
    grad: torch.Tensor
    noise_pred_cfg: torch.Tensor
    skipped: bool
    noise_uncond: torch.Tensor | None
    noise_cond: torch.Tensor


def predict_noise(
    model: GuidanceModel,
    noisy: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    unet_kwargs: dict | None = None,
) -> torch.Tensor:
    """ε̂ (N, C, h, w) float32 for noisy input (N, C, h, w), timesteps (N,), context (N, L, D).

    v-prediction models are converted to ε; a learned-variance output (2C channels, as in
    DeepFloyd IF) keeps its first C channels."""
    channels = noisy.shape[1]
    out = model.unet(
        to_unet_dtype(noisy, model), t.to(model.device), encoder_hidden_states=to_unet_dtype(context, model), **(unet_kwargs or {})
    ).sample.float()
    if out.shape[1] == 2 * channels:
        out = out[:, :channels]
    if model.prediction_type == "v_prediction":
        alpha = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        out = alpha.sqrt() * out + (1.0 - alpha).sqrt() * noisy.float()
    return out


def score_distillation(
    model: GuidanceModel,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    guidance_scale: float,
    weighting: str = "sds",
    grad_clip: float | None = None,
    grad_clip_mode: str = "value",
    unet_grad: bool = False,
    unet_kwargs: dict | None = None,
    before_unet: Callable[[slice], None] | None = None,
    keep_uncond: bool = False,
) -> SDSOutput:
    """One SDS step on model input `latents` (B, C, h, w) with text conditioning cond / uncond
    (B, L, D), timesteps t (B,) int64 and noise (B, C, h, w).

    grad = w(t) (ε̂_cfg - ε), clipped if `grad_clip` is set: "value" clamps each element to
    [-clip, clip], "norm" rescales each view's gradient to an L2 norm of at most clip.
    loss = 0.5 Σ ||grad||² / B in value, and d loss / d latents = grad / B exactly (the mean of
    the views' gradients). The SDS target is always detached. With `unet_grad` False the UNet
    runs without autograd (standard SDS); with True the conditional half keeps its graph from
    `latents` through the attention layers, so losses read off the attention (AMA) reach the
    render and adapters; the unconditional half never does (see the module docstring).
    `unet_kwargs` go to each UNet call (e.g. cross_attention_kwargs); `before_unet(rows)` is
    called before each UNet call with the rows of the [uncond; cond] batch of 2B that the call
    evaluates: slice(0, 2B) for one call, or slice(0, B) then slice(B, 2B). At guidance scale 1
    ε̂_cfg is ε̂_c: unless `keep_uncond`, the unconditional half is then not evaluated (only
    slice(B, 2B) is) and the output's noise_uncond is None."""
    batch = latents.shape[0]
    t = t.to(model.device)
    alpha = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = latents.float() if unet_grad else latents.detach().float()
    noisy = alpha.sqrt() * x + (1.0 - alpha).sqrt() * noise.float()

    def unet(rows: slice, noisy_rows: torch.Tensor, t_rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if before_unet is not None:
            before_unet(rows)
        return predict_noise(model, noisy_rows, t_rows, context, unet_kwargs)

    conditional_only = guidance_scale == 1.0 and not keep_uncond
    track = unet_grad and torch.is_grad_enabled()
    # Both predictions leave this block without a graph (the SDS target is detached).
    noise_uncond = None
    if track or conditional_only:
        if not conditional_only:
            with torch.no_grad():
                noise_uncond = unet(slice(0, batch), noisy.detach(), t, uncond)
        with torch.set_grad_enabled(track):
            noise_cond = unet(slice(batch, 2 * batch), noisy, t, cond).detach()
    else:
        with torch.no_grad():
            both = unet(slice(0, 2 * batch), torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([uncond, cond]))
        noise_uncond, noise_cond = both.chunk(2)
    if noise_uncond is None:
        noise_pred_cfg = noise_cond
    else:
        noise_pred_cfg = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
    weight = sds_weight(model.alphas_cumprod, t, weighting).view(-1, 1, 1, 1)
    grad = weight * (noise_pred_cfg - noise.float())
    if grad_clip is not None:
        if grad_clip_mode == "value":
            grad = grad.clamp(-grad_clip, grad_clip)
        elif grad_clip_mode == "norm":
            norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            grad = grad * (grad_clip / norm.clamp_min(grad_clip))
        else:
            raise GuidanceConfigError(f"unknown grad_clip_mode {grad_clip_mode!r}; expected 'value' or 'norm'")
    if not torch.isfinite(grad).all():
        # A zero loss that still reaches the latents keeps the caller's backward pass uniform.
        zero = latents.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
        return SDSOutput(zero, torch.zeros_like(grad), noise_pred_cfg, True, noise_uncond, noise_cond)
    grad = grad.to(latents.dtype)
    # A linear surrogate gives exactly grad / B as gradient; its value is replaced by the usual
    # 0.5 ||x - (x - grad)||² / B so the logged loss stays meaningful.
    surrogate = (latents * grad).sum() / batch
    loss = surrogate - surrogate.detach() + 0.5 * grad.float().square().sum() / batch
    return SDSOutput(loss, grad, noise_pred_cfg, False, noise_uncond, noise_cond)


def normal_mask_latents(normal: torch.Tensor, mask: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Fantasia3D's early geometry phase: the normal map and mask used directly as the latent.

    normal: (B, H, W, 3) in [-1, 1]; mask: (B, H, W, 1) in [0, 1] -> (B, 4, size, size),
    bilinear with antialiasing when downsampling; differentiable in both inputs."""
    x = torch.cat([normal, mask], dim=-1).permute(0, 3, 1, 2)
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
