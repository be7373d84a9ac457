"""Neural fields shared by the geometry (SDF + offset) and the appearance (material) networks.

`HashEncoding` is the multiresolution hash encoding of Instant NGP (Mueller et al. 2022) in plain
PyTorch, with tinycudann as an optional CUDA backend; `FrequencyEncoding` is the sin/cos
positional encoding for small runs; `MLP` is the small ReLU network on top.

The PyTorch hash encoding computes exactly what tiny-cuda-nn's "HashGrid" computes
(include/tiny-cuda-nn/encodings/grid.h and common_device.h): the same level scales, the same
dense/hashed split and table sizes, the same +0.5 lattice shift, hash and row layout. So its
`table` *is* tcnn's flat `params` (row-major), the two backends give the same field from one
checkpoint, and a run trained on a GPU with tcnn resumes or exports on a CPU, and back.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

HASH_PRIMES = (1, 2654435761, 805459861)  # tcnn's "CoherentPrime" hash (Instant NGP's), x y z
BACKENDS = ("auto", "torch", "tcnn")
# tcnn hashes every 3-D level finer than this without looking at its size: res^3 overflows uint32.
_MAX_DENSE_RESOLUTION = 1625
_CHUNK_POINTS = 1 << 17  # points per chunk: bounds the (chunk, levels, 8) index tensors


class EncodingError(ValueError):
    """An encoding configuration that cannot be built or run."""


@dataclass(frozen=True)
class HashGridLayout:
    """The levels of a 3-D hash grid as tiny-cuda-nn lays them out.

    scales: x in [0, 1] sits at lattice coordinate x * scale + 0.5 (float32 values, as tcnn's
        exp2f(level * log2(per_level_scale)) * base_resolution - 1);
    resolutions: lattice points per axis, ceil(scale) + 1;
    sizes: table rows, res^3 rounded up to a multiple of 8, at most 2^log2_table_size;
    n_dense: the first n_dense levels hold every lattice point (index x + res y + res^2 z, wrapped
        modulo the level size as tcnn does); the others are hashed modulo 2^log2_table_size."""

    scales: tuple[float, ...]
    resolutions: tuple[int, ...]
    sizes: tuple[int, ...]
    n_dense: int

    @property
    def offsets(self) -> tuple[int, ...]:
        """First table row of each level."""
        return tuple(int(o) for o in np.cumsum((0,) + self.sizes[:-1]))


def hash_grid_layout(
    n_levels: int, log2_table_size: int, base_resolution: int, per_level_scale: float
) -> HashGridLayout:
    """tcnn's GridEncodingTemplated constructor, level by level (float32 arithmetic as in tcnn)."""
    log2_scale = np.log2(np.float32(per_level_scale))
    scales, resolutions, sizes = [], [], []
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1)
        resolution = math.ceil(float(scale)) + 1
        size = min(-(-(resolution**3) // 8) * 8, 1 << log2_table_size)
        scales.append(float(scale))
        resolutions.append(resolution)
        sizes.append(size)
    dense = [r <= _MAX_DENSE_RESOLUTION and r**3 <= s for r, s in zip(resolutions, sizes)]
    # resolutions grow with the level, so the dense levels are a prefix
    return HashGridLayout(tuple(scales), tuple(resolutions), tuple(sizes), sum(dense))


def table_to_tcnn_params(table: torch.Tensor) -> torch.Tensor:
    """Our table (rows, F) -> tcnn's flat HashGrid `params` (rows * F,): level after level, each
    level's rows in order, a row's F features contiguous. A view when `table` is contiguous."""
    if table.dim() != 2:
        raise EncodingError(f"hash table must be (rows, features), got shape {tuple(table.shape)}")
    return table.reshape(-1)


def tcnn_params_to_table(params: torch.Tensor, features_per_level: int) -> torch.Tensor:
    """tcnn's flat HashGrid `params` (rows * F,) -> our table (rows, F); inverse of
    `table_to_tcnn_params` (tcnn's half-precision params come back in their own dtype)."""
    if params.dim() != 1 or params.numel() % features_per_level:
        raise EncodingError(
            f"tcnn params must be flat with a multiple of {features_per_level} values, got shape {tuple(params.shape)}"
        )
    return params.reshape(-1, features_per_level)


def _combine(ax: torch.Tensor, ay: torch.Tensor, az: torch.Tensor, op) -> torch.Tensor:
    """Per-axis values (N, L, 2) -> per-corner values (N, L, 8), corner c = 4 z + 2 y + x bits."""
    return op(op(ax[:, :, None, None, :], ay[:, :, None, :, None]), az[:, :, :, None, None]).flatten(2)


def _level_indices_and_weights(
    x: torch.Tensor, grid: tuple[torch.Tensor, ...], n_dense: int, table_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table rows and trilinear weights of the 8 cell corners at every level.

    x: (N, 3) in [0, 1]; grid: the layout's (scales, resolutions, sizes, offsets) as (L,) tensors.
    Corner c has offset bit d of c along axis d. Returns rows (N, L, 8) int32 into the flat
    table, weights (N, L, 8) and the per-axis factors (N, L, 3, 2) whose products are the weights
    (factors[..., d, 1] = frac_d, factors[..., d, 0] = 1 - frac_d)."""
    scales, resolutions, sizes, offsets = grid
    # tcnn computes fmaf(scale, x, 0.5f): the float32 product is exact in float64, so one rounding
    # back to float32 gives the same lattice position (up to a rare double-rounding tie).
    pos = (x.double()[:, None, :] * scales.double()[None, :, None] + 0.5).to(x.dtype)  # (N, L, 3)
    cell = pos.floor()
    frac = pos - cell
    factors = torch.stack([1 - frac, frac], dim=-1)  # (N, L, 3, 2)
    # Index math runs per axis on (N, L, 2) tensors and is combined once per corner: the
    # (N, L, 8) tensors dominate the cost on CPU, so they are touched as few times as possible.
    lo = cell.long()
    coord = torch.stack([lo, lo + 1], dim=-1)  # (N, L, 3, 2)
    parts = []
    if n_dense > 0:
        c = coord[:, :n_dense]
        side = resolutions[:n_dense][None, :, None]
        local = _combine(c[:, :, 0], c[:, :, 1] * side, c[:, :, 2] * side * side, torch.add)
        # the +0.5 shift puts the last corner one past the lattice: tcnn wraps it around the level
        local = torch.remainder(local, sizes[:n_dense][None, :, None])
        parts.append((local + offsets[:n_dense, None]).int())
    if n_dense < resolutions.shape[0]:
        c = coord[:, n_dense:]
        # Hashed levels hold 2^k rows. Masking each int64 product keeps exactly the low bits of
        # tcnn's uint32 hash (XOR commutes with the mask), and lets the per-corner XOR run in int32.
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
    def forward(ctx, x, table, scales, resolutions, sizes, offsets, n_dense, table_size):
        grid = (scales, resolutions, sizes, offsets)
        n_levels = resolutions.shape[0]
        features = table.shape[1]
        out = x.new_empty(x.shape[0], n_levels, features, dtype=table.dtype)
        for start in range(0, x.shape[0], _CHUNK_POINTS):
            xs = x[start : start + _CHUNK_POINTS]
            rows, weights, _ = _level_indices_and_weights(xs, grid, n_dense, table_size)
            # embedding_bag fuses gather, weighting and the sum over the 8 corners (~6x faster on
            # CPU than materializing the (n, L, 8, F) corner features)
            out[start : start + xs.shape[0]] = nn.functional.embedding_bag(
                rows.reshape(-1, 8), table, per_sample_weights=weights.reshape(-1, 8).to(table.dtype), mode="sum"
            ).reshape(xs.shape[0], n_levels, features)
        ctx.save_for_backward(x, table, *grid)
        ctx.n_dense, ctx.table_size = n_dense, table_size
        return out.reshape(x.shape[0], n_levels * features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, table, *grid = ctx.saved_tensors
        scales = grid[0]
        n_levels, features = scales.shape[0], table.shape[1]
        grad_out = grad_out.reshape(x.shape[0], n_levels, features)
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        for start in range(0, x.shape[0], _CHUNK_POINTS):
            stop = start + min(_CHUNK_POINTS, x.shape[0] - start)
            rows, weights, factors = _level_indices_and_weights(x[start:stop], tuple(grid), ctx.n_dense, ctx.table_size)
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
                grad_x[start:stop] = (dfrac * scales.to(x.dtype)[None, :, None]).sum(dim=1)
        return grad_x, grad_table, None, None, None, None, None, None


class HashEncoding(nn.Module):
    """Multiresolution hash encoding: x (N, 3) in [0, 1] -> (N, n_levels * features_per_level).

    The levels are tiny-cuda-nn's HashGrid (`hash_grid_layout`): per-level scale growth b with
    base_resolution * b^(n_levels - 1) = finest_resolution (Fantasia3D's setting), levels whose
    lattice fits in 2^log2_table_size rows stored densely, finer ones hashed with Instant NGP's
    primes; features are trilinearly interpolated from the 8 cell corners. `table`
    (sum of level sizes, F) is the only weight, whatever the backend: it equals tcnn's flat
    params reshaped, so checkpoints move between backends unchanged.

    backend: "torch" (pure PyTorch, any device, differentiable wrt table and x), "tcnn"
    (tinycudann, CUDA inputs only, an EncodingError otherwise) or "auto". The backend is chosen
    at every call from the input's device, not the machine: "auto" runs tcnn on CUDA inputs when
    tinycudann is installed and works on that device (tried once per device), else PyTorch, so
    the same module runs on a CPU run of a machine that has tcnn. tcnn computes in half
    precision from float32 master weights, so the backends agree to about 1e-3 relative."""

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
        if backend not in BACKENDS:
            raise EncodingError(f"hash encoding backend must be auto, torch or tcnn, got {backend!r}")
        self.n_levels = n_levels
        self.features_per_level = features_per_level
        self.log2_table_size = log2_table_size
        self.base_resolution = base_resolution
        self.table_size = 1 << log2_table_size
        self.output_dim = n_levels * features_per_level
        self.per_level_scale = math.exp((math.log(finest_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        self.backend = backend
        self.layout = hash_grid_layout(n_levels, log2_table_size, base_resolution, self.per_level_scale)
        self.n_dense_levels = self.layout.n_dense
        if sum(self.layout.sizes) >= 2**31:
            raise EncodingError("hash encoding table too large: levels x table size must stay below 2^31")
        self.register_buffer("scales", torch.tensor(self.layout.scales, dtype=torch.float64), persistent=False)
        self.register_buffer("resolutions", torch.tensor(self.layout.resolutions), persistent=False)
        self.register_buffer("sizes", torch.tensor(self.layout.sizes), persistent=False)
        self.register_buffer("offsets", torch.tensor(self.layout.offsets), persistent=False)
        # Instant NGP's (and tcnn's) small uniform init keeps the early output near zero but not symmetric.
        self.table = nn.Parameter(torch.empty(sum(self.layout.sizes), features_per_level).uniform_(-1e-4, 1e-4))
        # device -> tcnn module running this encoding there, or why tcnn cannot (a plain dict, so
        # tcnn's modules never enter parameters() or the state dict)
        self._tcnn: dict[torch.device, nn.Module | str] = {}
        if backend == "tcnn":
            reason = _tinycudann_missing()
            if reason:
                raise EncodingError(f"hash encoding backend 'tcnn' is unavailable: {reason}")

    def tcnn_config(self) -> dict:
        """The tinycudann encoding config computing this encoding."""
        return {
            "otype": "HashGrid",
            "type": "Hash",
            "n_levels": self.n_levels,
            "n_features_per_level": self.features_per_level,
            "log2_hashmap_size": self.log2_table_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
            "interpolation": "Linear",
            "hash": "CoherentPrime",
        }

    def backend_for(self, device: str | torch.device) -> str:
        """The backend ("torch" or "tcnn") that encodes inputs on `device`."""
        device = torch.device(device)
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cuda"):
            return "torch"
        if device.type != "cuda":
            raise EncodingError(f"hash encoding backend 'tcnn' needs CUDA inputs, got device {device}")
        module = self.tcnn_module(device)
        if isinstance(module, str):
            if self.backend == "tcnn":
                raise EncodingError(f"hash encoding backend 'tcnn' is unavailable on {device}: {module}")
            if module != _NOT_INSTALLED:
                _warn_once(f"tinycudann cannot run on {device.type}: {module}; using the PyTorch hash encoding")
            return "torch"
        return "tcnn"

    def tcnn_module(self, device: torch.device) -> nn.Module | str:
        """This encoding's tcnn module on `device` (made on first use), or why there is none."""
        if device not in self._tcnn:
            self._tcnn[device] = _make_tcnn_encoding(self.tcnn_config(), device)
        return self._tcnn[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) in [0, 1] (clamped) -> (N, n_levels * features_per_level) in the table's dtype."""
        x = x.clamp(0, 1)
        if self.backend_for(x.device) == "tcnn":
            return tcnn_encode(self._tcnn[x.device], x, self.table)
        return _HashGridFunction.apply(
            x.to(self.table.dtype), self.table, self.scales, self.resolutions, self.sizes, self.offsets,
            self.n_dense_levels, self.table_size,
        )


def tcnn_encode(module: nn.Module, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Run a tinycudann encoding module on x (N, 3) with `table` (rows, F) as its params.

    Returns (N, n_levels * F) in the table's dtype; gradients flow to `table` (and x)."""
    params = table_to_tcnn_params(table)
    return torch.func.functional_call(module, {"params": params}, (x,)).to(table.dtype)


_NOT_INSTALLED = "tinycudann is not installed"


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@functools.cache
def _tinycudann_missing() -> str:
    """Why tinycudann cannot be imported in this process ("" when it can); tried once."""
    try:
        import tinycudann  # noqa: F401
    except ModuleNotFoundError as error:
        return _NOT_INSTALLED if error.name == "tinycudann" else _one_line(error)
    except Exception as error:  # tinycudann raises EnvironmentError when CUDA or its kernels are missing
        return _one_line(error)
    return ""


def _make_tcnn_encoding(config: dict, device: torch.device) -> nn.Module | str:
    """A tinycudann Encoding on `device` that has run once, or the one-line reason it cannot be made."""
    reason = _tinycudann_missing()
    if reason:
        return reason
    import tinycudann

    try:
        guard = torch.cuda.device(device) if torch.cuda.is_available() else contextlib.nullcontext()
        with guard:
            module = tinycudann.Encoding(3, config)
            module(torch.rand(8, 3, device=device))  # its kernels can still be missing for this GPU
    except Exception as error:
        return _one_line(error)
    # the HashEncoding's table is the only copy of the weights: tcnn's own are never read
    module.params = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
    return module


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


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
