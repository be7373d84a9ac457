"""Attention-mask alignment (AMA): record SD's cross-attention to the text's global token and pull
it towards the rendered object mask.

For each cross-attention layer i, A_i is the column of softmax(Q K^T / sqrt(d)) at the global
token (the end-of-text token for CLIP text), averaged over heads, as a (B, h_i, w_i) map over the
latent grid. The loss is L_AMA = (1/L) sum_i ||norm(A_i) - resize(mask)||, with
norm(A) = (A - min A) / (max A - min A + eps) per sample.

The recorder is filled by `XDreamerAttnProcessor` (cg_lora.py) during the UNet call; it computes
only the needed column(s) from the (Nq, L_text) score matrix, never anything larger than the
attention itself, and keeps autograd so the loss reaches CG-LoRA and the latents.
"""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from xdreamer.atomic import atomic_path

VARIANTS = ("paper", "code")
LAYER_CHOICES = ("all", "last")


class AMAError(ValueError):
    """A user-caused misuse of the AMA recorder or loss."""


class AttentionRecorder:
    """Collects one attention map per recorded cross-attention layer during a UNet call.

    variant: "paper" = post-softmax probabilities (the paper's A_i); "code" = pre-softmax scores
        Q K^T / sqrt(d) (the authors' code).
    layers: "all" = every cross-attention layer, in call order; "last" = only the last
        cross-attention at the highest resolution, which is what the authors' code ends up using.

    A UNet call holds N >= B rows whose last B are the conditional ones (N = 2B ordered
    [uncond; cond] for one call, N = B when score distillation runs the conditional half alone):
    only those B rows are recorded, B being the number of token indices given to `set_token_index`.
    """

    def __init__(self, variant: str = "paper", layers: str = "all"):
        if variant not in VARIANTS:
            raise AMAError(f"AMA variant must be one of {VARIANTS}, got {variant!r}")
        if layers not in LAYER_CHOICES:
            raise AMAError(f"AMA layers must be one of {LAYER_CHOICES}, got {layers!r}")
        self.variant = variant
        self.layers = layers
        self.token_index: torch.Tensor | None = None
        self._device_index: torch.Tensor | None = None
        self._maps: list[torch.Tensor] = []
        self._best_length = 0
        self._closed = False

    def set_token_index(self, token_index: torch.Tensor | list[int]) -> None:
        """token_index: (B,) or (B, K) long, the text token(s) of each conditional sample whose
        attention is recorded (the end-of-text index by default); K columns are averaged."""
        # Kept on the CPU: the bounds check in `record` then reads no device memory.
        index = torch.as_tensor(token_index, dtype=torch.long).cpu()
        if index.ndim == 1:
            index = index[:, None]
        if index.ndim != 2 or index.shape[0] == 0:
            raise AMAError(f"token_index must be (B,) or (B, K), got shape {tuple(index.shape)}")
        self.token_index = index
        self._device_index = None
        self.reset()

    def reset(self) -> None:
        """Forget the maps of the previous UNet call and keep the next call's."""
        self._maps = []
        self._best_length = 0
        self._closed = False

    @property
    def maps(self) -> list[torch.Tensor]:
        """The recorded maps, each (B, h_i, w_i), in UNet call order."""
        return list(self._maps)

    def take(self) -> list[torch.Tensor]:
        """Return the recorded maps; keep no others until `reset` or `set_token_index`.

        Under gradient checkpointing the backward pass runs the attention processors again, and
        with them `record`; what they record then is not kept (it would hold its graph until the
        next call). `wants` keeps answering as in the forward pass (the largest map size stays
        known), so the recomputation does the same work the forward did, as checkpointing needs."""
        maps = self.maps
        self._maps = []
        self._closed = True
        return maps

    def wants(self, query_length: int) -> bool:
        """Whether a layer with `query_length` image tokens would be kept (lets callers skip work)."""
        return self.layers == "all" or query_length >= self._best_length

    def record(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> None:
        """query: (N, heads, Nq, d), key: (N, heads, L, d) after the head split, as they enter
        scaled-dot-product attention; attention_mask: None or broadcastable to (N, heads, Nq, L),
        additive float or boolean (True = attend), as SDPA takes it."""
        if self.token_index is None:
            raise AMAError("AttentionRecorder.set_token_index must be called before the UNet call")
        batch = self.token_index.shape[0]
        n, _, length, dim = query.shape
        if n < batch:
            raise AMAError(f"UNet call batch {n} is smaller than the {batch} recorded samples")
        if not self.wants(length):
            return
        if int(self.token_index.max()) >= key.shape[2]:
            raise AMAError(f"token index {int(self.token_index.max())} is outside the {key.shape[2]} text tokens")
        if self._device_index is None or self._device_index.device != query.device:
            self._device_index = self.token_index.to(query.device)  # once per device, not per layer
        index = self._device_index
        # Scores in at least float32: fp16 logsumexp over 77 tokens loses the small columns.
        dtype = torch.promote_types(query.dtype, torch.float32)
        q = query[n - batch :].to(dtype)
        k = key[n - batch :].to(dtype)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim)  # (B, heads, Nq, L): what attention computes anyway
        if attention_mask is not None:
            mask = attention_mask[n - batch :] if attention_mask.shape[0] == n else attention_mask
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(dtype)
        columns = scores.gather(-1, index[:, None, None, :].expand(-1, scores.shape[1], length, -1))
        if self.variant == "paper":
            # softmax column = exp(score - logsumexp over all keys): no full softmax kept.
            columns = torch.exp(columns - torch.logsumexp(scores, dim=-1, keepdim=True))
        attention = columns.mean(dim=(1, 3))  # over heads and token columns -> (B, Nq)
        side = math.isqrt(length)
        if side * side != length:
            raise AMAError(f"cross-attention over {length} image tokens is not a square latent grid")
        attention = attention.view(batch, side, side)
        if self._closed:
            return
        if self.layers == "last":
            self._maps = [attention]
            self._best_length = length
        else:
            self._maps.append(attention)


NORMALIZE = ("sample", "batch")


def normalize_map(attention: torch.Tensor, eps: float = 1e-6, per: str = "sample") -> torch.Tensor:
    """(B, h, w) -> (B, h, w) min-max normalized to [0, 1]: (A - min) / (max - min + eps), the
    extremes taken per sample ("sample", the paper's per-map normalization) or over the whole
    batch ("batch", what the authors' code does)."""
    if per not in NORMALIZE:
        raise AMAError(f"AMA normalization must be one of {NORMALIZE}, got {per!r}")
    flat = attention.flatten(1) if per == "sample" else attention.reshape(1, -1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    return (attention - low) / (high - low + eps)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """mask (B, H, W, 1) -> (B, h, w), bilinear, antialiased when shrinking."""
    image = mask.permute(0, 3, 1, 2)
    if tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    return image[:, 0]


def ama_loss(
    maps: list[torch.Tensor], mask: torch.Tensor, norm: str = "l1", normalize: str = "sample", eps: float = 1e-6
) -> torch.Tensor:
    """Attention-mask alignment loss, unweighted (the caller multiplies by lambda, 0.1 by default).

    maps: list of (B, h_i, w_i) attention maps; mask: (B, H, W, 1) object coverage in [0, 1]. The
    mask is not detached: the loss also reaches the geometry through the rendered silhouette, as
    in the authors' code. norm "l1": mean |norm(A_i) - mask_i| (the authors'); "mse": mean squared
    difference. `normalize`: see `normalize_map`. Averaged over the maps. Returns a scalar."""
    if norm not in ("l1", "mse"):
        raise AMAError(f"AMA norm must be 'l1' or 'mse', got {norm!r}")
    if not maps:
        raise AMAError("ama_loss needs at least one attention map (was the recorder installed?)")
    if mask.ndim != 4 or mask.shape[-1] != 1:
        raise AMAError(f"mask must be (B, H, W, 1), got shape {tuple(mask.shape)}")
    total = 0.0
    for attention in maps:
        if attention.shape[0] != mask.shape[0]:
            raise AMAError(f"attention map batch {attention.shape[0]} != mask batch {mask.shape[0]}")
        target = resize_mask(mask.to(attention.device, attention.dtype), tuple(attention.shape[-2:]))
        difference = normalize_map(attention, eps, normalize) - target
        total = total + (difference.abs().mean() if norm == "l1" else difference.square().mean())
    return total / len(maps)


@torch.no_grad()
def map_mask_iou(attention: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, h, w) attention, (B, H, W, 1) mask -> (B,) IoU of {normalized attention > threshold}
    with {mask resized to the map > threshold}; 1 where both are empty."""
    attention = attention.detach().float()
    target = resize_mask(mask.detach().to(attention.device, attention.dtype), tuple(attention.shape[-2:])) > threshold
    predicted = normalize_map(attention) > threshold
    intersection = (predicted & target).flatten(1).sum(1).float()
    union = (predicted | target).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def attention_mask_iou(maps: list[torch.Tensor], mask: torch.Tensor, threshold: float = 0.5) -> dict[int, float]:
    """How well SD's attention sits on the object, the quantity AMA exists to raise: `map_mask_iou`
    averaged over the views and the maps of each resolution. Returns {side: IoU}, largest side
    first (e.g. {16: 0.41, 8: 0.55})."""
    by_side: dict[int, list[float]] = {}
    for attention in maps:
        by_side.setdefault(int(attention.shape[-1]), []).extend(map_mask_iou(attention, mask, threshold).tolist())
    return {side: sum(values) / len(values) for side, values in sorted(by_side.items(), reverse=True)}


def _heat(values: np.ndarray) -> np.ndarray:
    """(...,) in [0, 1] -> (..., 3) colours along black - purple - orange - yellow (inferno-like)."""
    stops = np.array([0.0, 0.33, 0.66, 1.0])
    colours = np.array([[0.0, 0.0, 0.02], [0.47, 0.11, 0.43], [0.93, 0.41, 0.15], [0.99, 1.0, 0.64]])
    return np.stack([np.interp(values, stops, colours[:, c]) for c in range(3)], axis=-1)


def save_attention_visualization(
    path: str | Path, render: torch.Tensor, mask: torch.Tensor, maps: list[torch.Tensor]
) -> Path:
    """Write the paper's attention figure as one PNG grid: a row per view, columns
    render | mask | each layer's normalized attention map, upsampled to the render's size, each
    map labelled with its `map_mask_iou` (the alignment AMA raises).

    render: (B, H, W, 3) in [0, 1]; mask: (B, H, W, 1) in [0, 1]; maps: list of (B, h_i, w_i)."""
    from PIL import Image, ImageDraw

    render = render.detach().float().clamp(0, 1).cpu()
    batch, height, width, _ = render.shape
    columns = [render, mask.detach().float().clamp(0, 1).cpu().expand(-1, -1, -1, 3)]
    ious = []
    for attention in maps:
        if attention.shape[0] != batch:
            raise AMAError("render, mask and maps must share the batch size")
        normalized = normalize_map(attention.detach().float().cpu())[:, None]
        upsampled = F.interpolate(normalized, size=(height, width), mode="bilinear", align_corners=False)
        columns.append(torch.from_numpy(_heat(upsampled[:, 0].clamp(0, 1).numpy())).float())
        ious.append(map_mask_iou(attention.cpu(), mask.cpu()).tolist())
    grid = torch.cat([torch.cat(list(row), dim=1) for row in zip(*columns)], dim=0)
    image = Image.fromarray((grid.numpy() * 255.0 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for column, values in enumerate(ious, start=2):
        for row, iou in enumerate(values):
            draw.text((column * width + 3, row * height + 2), f"IoU {iou:.2f}", fill=(255, 255, 255))
    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.asarray(image), extension=".png")
    return path
