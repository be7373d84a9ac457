"""Neural fields shared by the geometry (SDF + offset) and the appearance (material) networks.

`HashEncoding` is the multiresolution hash encoding of Instant NGP (Mueller et al. 2022) in plain
PyTorch, with tinycudann as an optional CUDA backend; `FrequencyEncoding` is the sin/cos
positional encoding for small runs; `MLP` is the small ReLU network on top.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HASH_PRIMES = (1, 2654435761, 805459861)
_CHUNK_POINTS = 1 << 17  # points per chunk: bounds the (chunk, levels, 8) index tensors


class EncodingError(ValueError):
    """An encoding configuration that cannot be built."""


def _combine(ax: torch.Tensor, ay: torch.Tensor, az: torch.Tensor, op) -> torch.Tensor:
    """Per-axis values (N, L, 2) -> per-corner values (N, L, 8), corner c = 4 z + 2 y + x bits."""
    return op(op(ax[:, :, None, None, :], ay[:, :, None, :, None]), az[:, :, :, None, None]).flatten(2)


def _level_indices_and_weights(
    x: torch.Tensor, resolutions: torch.Tensor, offsets: torch.Tensor, n_dense: int, table_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table rows and trilinear weights of the 8 cell corners at every level.

    x: (N, 3) in [0, 1]; the first n_dense levels are dense, the rest hashed. Corner c has offset
    bit d of c along axis d. Returns rows (N, L, 8) int32 into the flat table, weights (N, L, 8)
    and the per-axis factors (N, L, 3, 2) whose products are the weights
    (factors[..., d, 1] = frac_d, factors[..., d, 0] = 1 - frac_d)."""
    res = resolutions.to(x.dtype)
    scaled = x[:, None, :] * res[None, :, None]  # (N, L, 3)
    # clamp the cell so x = 1 lands in the last cell with frac = 1 instead of outside the grid
    cell = torch.minimum(scaled.floor().clamp(min=0), (res - 1)[None, :, None])
    frac = scaled - cell
    factors = torch.stack([1 - frac, frac], dim=-1)  # (N, L, 3, 2)
    # Index math runs per axis on (N, L, 2) tensors and is combined once per corner: the
    # (N, L, 8) tensors dominate the cost on CPU, so they are touched as few times as possible.
    lo = cell.long()
    coord = torch.stack([lo, lo + 1], dim=-1)  # (N, L, 3, 2)
    parts = []
    if n_dense > 0:
        c = coord[:, :n_dense]
        side = (resolutions[:n_dense] + 1)[None, :, None]
        ax = (c[:, :, 0] + offsets[:n_dense, None]).int()
        parts.append(_combine(ax, (c[:, :, 1] * side).int(), (c[:, :, 2] * side * side).int(), torch.add))
    if n_dense < resolutions.shape[0]:
        c = coord[:, n_dense:]
        # Masking each int64 product to the table size keeps exactly the low bits of Instant
        # NGP's uint32 hash (XOR commutes with the mask), and lets the per-corner XOR run in int32.
        mask = table_size - 1
        hx, hy, hz = ((c[:, :, d] * HASH_PRIMES[d]) & mask for d in range(3))
        hashed = _combine(hx.int(), hy.int(), hz.int(), torch.bitwise_xor)
        parts.append(hashed + offsets[n_dense:, None].int())
    rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    weights = _combine(factors[:, :, 0], factors[:, :, 1], factors[:, :, 2], torch.mul)
    return rows, weights, factors


class _HashGridFunction(torch.autograd.Function):
    """Hash-grid lookup that saves only the inputs and recomputes indices in backward.

    Saving the (N, L, 8) index tensors would cost ~1 KB per point; recomputing them is cheap."""

    @staticmethod
    def forward(ctx, x, table, resolutions, offsets, n_dense, table_size):
        n_levels = resolutions.shape[0]
        features = table.shape[1]
        out = x.new_empty(x.shape[0], n_levels, features, dtype=table.dtype)
        for start in range(0, x.shape[0], _CHUNK_POINTS):
            xs = x[start : start + _CHUNK_POINTS]
            rows, weights, _ = _level_indices_and_weights(xs, resolutions, offsets, n_dense, table_size)
            # embedding_bag fuses gather, weighting and the sum over the 8 corners (~6x faster on
            # CPU than materializing the (n, L, 8, F) corner features)
            out[start : start + xs.shape[0]] = nn.functional.embedding_bag(
                rows.reshape(-1, 8), table, per_sample_weights=weights.reshape(-1, 8).to(table.dtype), mode="sum"
            ).reshape(xs.shape[0], n_levels, features)
        ctx.save_for_backward(x, table, resolutions, offsets)
        ctx.n_dense, ctx.table_size = n_dense, table_size
        return out.reshape(x.shape[0], n_levels * features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, table, resolutions, offsets = ctx.saved_tensors
        n_levels, features = resolutions.shape[0], table.shape[1]
        grad_out = grad_out.reshape(x.shape[0], n_levels, features)
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        for start in range(0, x.shape[0], _CHUNK_POINTS):
            stop = start + min(_CHUNK_POINTS, x.shape[0] - start)
            rows, weights, factors = _level_indices_and_weights(
                x[start:stop], resolutions, offsets, ctx.n_dense, ctx.table_size
            )
            g = grad_out[start:stop]  # (n, L, F)
            if grad_table is not None:
                contrib = weights.to(table.dtype)[..., None] * g[:, :, None, :]  # (n, L, 8, F)
                grad_table.index_add_(0, rows.reshape(-1).long(), contrib.reshape(-1, features))
            if grad_x is not None:
                dout_dw = (table[rows] * g[:, :, None, :]).sum(dim=-1)  # (n, L, 8)
                # d factor / d frac is -1 for the lower corner and +1 for the upper one
                slope = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device).expand_as(factors[:, :, 0])
                fx, fy, fz = factors[:, :, 0], factors[:, :, 1], factors[:, :, 2]
                dw_dfrac = torch.stack(
                    [
                        _combine(slope, fy, fz, torch.mul),
                        _combine(fx, slope, fz, torch.mul),
                        _combine(fx, fy, slope, torch.mul),
                    ],
                    dim=-1,
                )  # (n, L, 8, 3)
                dfrac = (dout_dw[..., None] * dw_dfrac).sum(dim=2)  # (n, L, 3)
                grad_x[start:stop] = (dfrac * resolutions.to(x.dtype)[None, :, None]).sum(dim=1)
        return grad_x, grad_table, None, None, None, None


class HashEncoding(nn.Module):
    """Multiresolution hash encoding: x (N, 3) in [0, 1] -> (N, n_levels * features_per_level).

    Level l has resolution floor(base * b^l) with b chosen so the last level is `finest_resolution`.
    A level whose (res + 1)^3 lattice fits in the table is stored densely, finer levels are hashed
    with Instant NGP's primes; features are trilinearly interpolated from the 8 cell corners.
    backend: "torch" (pure PyTorch, differentiable wrt table and x), "tcnn" (tinycudann, CUDA
    inputs only) or "auto" (tcnn when importable and CUDA is available, else torch)."""

    def __init__(
        self,
        n_levels: int = 16,
        features_per_level: int = 2,
        log2_table_size: int = 19,
        base_resolution: int = 16,
        finest_resolution: int = 4096,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if n_levels < 1 or features_per_level < 1 or not 1 <= log2_table_size <= 30:
            raise EncodingError("hash encoding needs n_levels >= 1, features >= 1, log2_table_size in [1, 30]")
        if base_resolution < 1 or finest_resolution < base_resolution:
            raise EncodingError("hash encoding needs 1 <= base_resolution <= finest_resolution")
        if backend not in ("auto", "torch", "tcnn"):
            raise EncodingError(f"hash encoding backend must be auto, torch or tcnn, got {backend!r}")
        self.n_levels = n_levels
        self.features_per_level = features_per_level
        self.table_size = 1 << log2_table_size
        self.output_dim = n_levels * features_per_level
        growth = math.exp((math.log(finest_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        self.per_level_scale = growth
        self.backend = _resolve_backend(backend)

        if self.backend == "tcnn":
            import tinycudann as tcnn

            self.tcnn_encoding = tcnn.Encoding(
                3,
                {
                    "otype": "HashGrid",
                    "n_levels": n_levels,
                    "n_features_per_level": features_per_level,
                    "log2_hashmap_size": log2_table_size,
                    "base_resolution": base_resolution,
                    "per_level_scale": growth,
                },
            )
            return

        # round to guard against exp/log landing a hair below an integer
        resolutions = [int(math.floor(base_resolution * growth**level + 1e-6)) for level in range(n_levels)]
        sizes = [min((r + 1) ** 3, self.table_size) for r in resolutions]
        # resolutions grow, so the dense levels are a prefix
        self.n_dense_levels = sum((r + 1) ** 3 <= self.table_size for r in resolutions)
        if sum(sizes) >= 2**31:
            raise EncodingError("hash encoding table too large: levels x table size must stay below 2^31")
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        # Instant NGP's small uniform init keeps the early output near zero but not symmetric.
        self.table = nn.Parameter(torch.empty(sum(sizes), features_per_level).uniform_(-1e-4, 1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) in [0, 1] -> (N, n_levels * features_per_level) in the table's dtype."""
        if self.backend == "tcnn":
            if not x.is_cuda:
                raise EncodingError("the tcnn hash encoding backend needs CUDA inputs")
            return self.tcnn_encoding(x.clamp(0, 1)).float()
        return _HashGridFunction.apply(
            x.clamp(0, 1).to(self.table.dtype), self.table,
            self.resolutions,
            self.offsets,
            self.n_dense_levels,
            self.table_size,
        )


def _resolve_backend(backend: str) -> str:
    if backend == "torch":
        return "torch"
    try:
        import tinycudann  # noqa: F401

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if backend == "tcnn" and not available:
        raise EncodingError("hash encoding backend 'tcnn' needs tinycudann and a CUDA device")
    return "tcnn" if available else "torch"


class FrequencyEncoding(nn.Module):
    """Positional encoding x (N, D) -> (N, D * (include_input + 2 * n_frequencies)):
    [x, sin(2^k pi x), cos(2^k pi x) for k < n_frequencies]."""

    def __init__(self, n_frequencies: int = 6, include_input: bool = True, input_dim: int = 3) -> None:
        super().__init__()
        if n_frequencies < 0:
            raise EncodingError(f"n_frequencies must be >= 0, got {n_frequencies}")
        self.include_input = include_input
        self.output_dim = input_dim * (int(include_input) + 2 * n_frequencies)
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(n_frequencies), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[..., None] * self.frequencies.to(x.dtype)).flatten(-2)  # (N, D * n_frequencies)
        parts = [x] if self.include_input else []
        return torch.cat(parts + [torch.sin(angles), torch.cos(angles)], dim=-1)


class MLP(nn.Module):
    """in_dim -> [hidden, activation] x n_hidden_layers -> out_dim (no output activation)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 32,
        n_hidden_layers: int = 2,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        return self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
