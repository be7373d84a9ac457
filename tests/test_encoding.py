"""Hash encoding (tiny-cuda-nn's levels, dense vs hashed storage, trilinear interpolation,
gradients), its tcnn backend and checkpoint layout, frequency encoding and the MLP.

tinycudann cannot run here (no GPU): `tcnn_lookup` below transcribes tcnn's HashGrid
(include/tiny-cuda-nn/encodings/grid.h: the GridEncodingTemplated constructor and kernel_grid;
common_device.h: grid_scale, grid_resolution, pos_fract, grid_index, coherent_prime_hash) in
numpy with uint32 arithmetic, and a fake `tinycudann` module built on it stands in for the
package to exercise the backend plumbing."""

import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from xdreamer import encoding as encoding_module
from xdreamer.encoding import (
    HASH_PRIMES,
    MLP,
    EncodingError,
    FrequencyEncoding,
    HashEncoding,
    tcnn_encode,
    tcnn_params_to_table,
    table_to_tcnn_params,
)


def tcnn_levels(config: dict) -> tuple[list[np.float32], list[int], list[int]]:
    """GridEncodingTemplated's constructor: per-level scale, resolution and offset table (rows)."""
    log2_per_level_scale = np.log2(np.float32(config["per_level_scale"]))  # std::log2(float)
    scales, resolutions, offsets = [], [], [0]
    for level in range(config["n_levels"]):
        scale = np.exp2(np.float32(level) * log2_per_level_scale) * np.float32(config["base_resolution"]) - np.float32(1)
        resolution = int(np.ceil(scale)) + 1
        max_params = (2**32 - 1) // 2
        params_in_level = max_params if float(resolution) ** 3 > max_params else resolution**3
        params_in_level = (params_in_level + 7) // 8 * 8  # next_multiple(params_in_level, 8u)
        params_in_level = min(params_in_level, 1 << config["log2_hashmap_size"])
        scales.append(scale)
        resolutions.append(resolution)
        offsets.append(offsets[-1] + params_in_level)
    return scales, resolutions, offsets


def tcnn_lookup(x: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """kernel_grid with linear interpolation: rows (N, L, 8) into params viewed as (rows, F) and
    float32 weights (N, L, 8), corner idx taking the upper cell along dim d when bit d is set."""
    scales, resolutions, offsets = tcnn_levels(config)
    x = np.asarray(x, dtype=np.float32)
    n, n_levels = x.shape[0], config["n_levels"]
    primes = np.array([1, 2654435761, 805459861], dtype=np.uint32)  # coherent_prime_hash
    rows = np.zeros((n, n_levels, 8), dtype=np.int64)
    weights = np.zeros((n, n_levels, 8), dtype=np.float32)
    for level in range(n_levels):
        hashmap_size = offsets[level + 1] - offsets[level]
        resolution = resolutions[level]
        # pos_fract: fmaf(scale, input, 0.5f); the float32 product is exact in float64
        pos = (np.float64(scales[level]) * x.astype(np.float64) + 0.5).astype(np.float32)
        tmp = np.floor(pos)
        pos_grid = tmp.astype(np.int64).astype(np.uint32)
        pos = pos - tmp
        for idx in range(8):
            weight = np.ones(n, dtype=np.float32)
            local = pos_grid.copy()
            for dim in range(3):
                if idx & (1 << dim) == 0:
                    weight = weight * (np.float32(1) - pos[:, dim])
                else:
                    weight = weight * pos[:, dim]
                    local[:, dim] = pos_grid[:, dim] + np.uint32(1)
            # grid_index
            index = np.zeros(n, dtype=np.uint32)
            stride = 1
            if resolution <= 0x659:
                for dim in range(3):
                    index = index + local[:, dim] * np.uint32(stride)
                    stride *= resolution
            else:
                stride = 0xFFFFFFFF
            if hashmap_size < stride:
                index = np.zeros(n, dtype=np.uint32)
                for dim in range(3):
                    index ^= local[:, dim] * primes[dim]
            rows[:, level, idx] = offsets[level] + (index % np.uint32(hashmap_size)).astype(np.int64)
            weights[:, level, idx] = weight
    return rows, weights


def tcnn_reference(params: np.ndarray, x: np.ndarray, config: dict) -> np.ndarray:
    """tcnn's output (N, L * F) for flat float32 params, accumulated corner by corner as kernel_grid does."""
    features = config["n_features_per_level"]
    rows, weights = tcnn_lookup(x, config)
    grid = np.asarray(params, dtype=np.float32).reshape(-1, features)
    out = np.zeros((x.shape[0], config["n_levels"], features), dtype=np.float32)
    for idx in range(8):
        out = out + weights[:, :, idx, None] * grid[rows[:, :, idx]]
    return out.reshape(x.shape[0], -1)


def _small_encoding(**kwargs):
    # growth 2 from base 2: tcnn scales 1, 3, 7, 15 (exact in float32), resolutions 2, 4, 8, 16
    settings = dict(
        n_levels=4, features_per_level=2, log2_table_size=8, base_resolution=2, finest_resolution=16
    )
    settings.update(kwargs)
    return HashEncoding(backend="torch", **settings)


def test_levels_follow_tcnn_hashgrid():
    encoding = HashEncoding(backend="torch")
    growth = math.exp((math.log(4096) - math.log(16)) / 15)
    assert encoding.per_level_scale == pytest.approx(growth)
    scales, resolutions, offsets = tcnn_levels(encoding.tcnn_config())
    assert encoding.scales.tolist() == [float(s) for s in scales]
    assert encoding.resolutions.tolist() == resolutions
    assert resolutions == [16, 24, 34, 49, 71, 102, 148, 213, 308, 446, 646, 934, 1352, 1956, 2831, 4096]
    assert encoding.scales[0].item() == 15.0 and encoding.scales[-1].item() == pytest.approx(4095.0, abs=2e-3)
    # dense while res^3 (rounded up to a multiple of 8) fits in 2^19 rows: up to 71^3; 102^3 is hashed
    assert encoding.n_dense_levels == 5
    sizes = [16**3, 24**3, 34**3, 117656, 357912] + [2**19] * 11  # 49^3 = 117649 -> 117656
    assert encoding.sizes.tolist() == sizes == [b - a for a, b in zip(offsets, offsets[1:])]
    assert encoding.table.shape == (sum(sizes), 2) == (6_299_960, 2)
    assert encoding.offsets.tolist() == offsets[:-1]
    assert encoding.table.abs().max().item() <= 1e-4
    assert encoding(torch.rand(5, 3)).shape == (5, 32)


def _row_of(encoding, level, corner):
    """The table row of integer lattice corner (i, j, k) at `level`, written out independently."""
    i, j, k = corner
    res, size = int(encoding.resolutions[level]), int(encoding.sizes[level])
    if level < encoding.n_dense_levels:
        local = (i + res * j + res**2 * k) % size
    else:
        # Instant NGP's hash in uint32 arithmetic
        h = (i * HASH_PRIMES[0]) ^ ((j * HASH_PRIMES[1]) % 2**32) ^ ((k * HASH_PRIMES[2]) % 2**32)
        local = h % encoding.table_size
    return int(encoding.offsets[level]) + local


def test_lattice_corners_return_the_stored_feature():
    encoding = _small_encoding().double()
    assert encoding.scales.tolist() == [1.0, 3.0, 7.0, 15.0] and encoding.resolutions.tolist() == [2, 4, 8, 16]
    assert encoding.n_dense_levels == 2  # 2^3 and 4^3 rows fit in 256; 8^3 and 16^3 are hashed
    assert encoding.sizes.tolist() == [8, 64, 256, 256]
    with torch.no_grad():
        encoding.table.copy_(torch.randn(encoding.table.shape, generator=torch.Generator().manual_seed(0)))
    generator = torch.Generator().manual_seed(1)
    for level, scale in enumerate(encoding.scales.tolist()):
        # lattice point i sits at x = (i - 0.5) / scale: the +0.5 shift of tcnn
        corners = torch.randint(1, int(scale) + 1, (50, 3), generator=generator)
        out = encoding((corners.double() - 0.5) / scale).reshape(50, encoding.n_levels, 2)[:, level]
        rows = torch.tensor([_row_of(encoding, level, tuple(c.tolist())) for c in corners])
        assert torch.allclose(out, encoding.table[rows], atol=1e-9)


def test_trilinear_interpolation_inside_a_cell():
    encoding = _small_encoding(n_levels=1, base_resolution=5, finest_resolution=5)
    assert encoding.scales.tolist() == [4.0] and encoding.n_dense_levels == 1
    with torch.no_grad():
        encoding.table.copy_(torch.randn(encoding.table.shape, generator=torch.Generator().manual_seed(2)))
    frac = torch.tensor([0.25, 0.625, 0.875])
    cell = (1, 2, 3)
    x = ((torch.tensor(cell) + frac - 0.5) / 4)[None]
    expected = torch.zeros(2)
    for c in range(8):
        bits = [(c >> d) & 1 for d in range(3)]
        weight = math.prod(f if b else 1 - f for f, b in zip(frac.tolist(), bits))
        corner = tuple(cell[d] + bits[d] for d in range(3))
        expected += weight * encoding.table[_row_of(encoding, 0, corner)].detach()
    assert torch.allclose(encoding(x)[0], expected, atol=1e-6)


def test_dense_levels_wrap_the_last_corner_as_tcnn_does():
    # At x = 1 the +0.5 shift puts the upper corner at lattice index res, one past the lattice:
    # tcnn's index x + res y + res^2 z wraps modulo the level size, and so must ours.
    encoding = _small_encoding(n_levels=1, base_resolution=4, finest_resolution=4).double()
    assert encoding.scales.tolist() == [3.0] and encoding.sizes.tolist() == [64]
    with torch.no_grad():
        encoding.table.copy_(torch.randn(encoding.table.shape, generator=torch.Generator().manual_seed(8)))
    out = encoding(torch.ones(1, 3, dtype=torch.float64))[0]
    # pos = 3.5 on every axis: the 8 corners {3, 4}^3 with weight 1/8 each
    rows = [_row_of(encoding, 0, (3 + (c & 1), 3 + (c >> 1 & 1), 3 + (c >> 2 & 1))) for c in range(8)]
    assert (3 + 4 * 4 + 16 * 4) % 64 == 19 and 19 in rows
    assert torch.allclose(out, encoding.table[rows].mean(0), atol=1e-12)


def test_hashed_levels_match_instant_ngp_hash_for_large_coordinates():
    encoding = _small_encoding(n_levels=2, base_resolution=1024, finest_resolution=4096, log2_table_size=19).double()
    assert encoding.n_dense_levels == 0 and encoding.resolutions.tolist() == [1024, 4096]
    with torch.no_grad():
        encoding.table.copy_(torch.arange(encoding.table.numel(), dtype=torch.float64).reshape(-1, 2))
    corner = (4094, 4095, 2047)  # products far beyond 2^32: the uint32 wrap-around must match
    out = encoding((torch.tensor([corner], dtype=torch.float64) - 0.5) / 4095)[0, 2:]
    assert torch.allclose(out, encoding.table[_row_of(encoding, 1, corner)].detach(), atol=1e-6)
    assert (corner[1] * HASH_PRIMES[1]) > 2**32


@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # the paper's: 16 levels, 2 features, 2^19 rows, 16 -> 4096
        dict(n_levels=6, features_per_level=4, log2_table_size=12, base_resolution=3, finest_resolution=300),
        dict(n_levels=3, features_per_level=1, log2_table_size=14, base_resolution=1700, finest_resolution=2000),
    ],
)
def test_torch_encoding_equals_tcnn_lookup_on_tcnn_params(settings):
    encoding = HashEncoding(backend="torch", **settings)
    config = encoding.tcnn_config()
    assert tcnn_levels(config)[2][-1] * encoding.features_per_level == encoding.table.numel()
    with torch.no_grad():
        encoding.table.normal_(generator=torch.Generator().manual_seed(9))
    params = table_to_tcnn_params(encoding.table.detach())
    assert params.shape == (encoding.table.numel(),)
    generator = torch.Generator().manual_seed(10)
    x = torch.cat([torch.rand(3000, 3, generator=generator), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]])])
    expected = tcnn_reference(params.numpy(), x.numpy(), config)
    with torch.no_grad():
        out = encoding(x)
    assert out.shape == expected.shape
    assert np.abs(out.numpy() - expected).max() < 1e-6


def test_tcnn_params_round_trip_is_exact():
    encoding = _small_encoding(n_levels=5, features_per_level=4, finest_resolution=40)
    with torch.no_grad():
        encoding.table.normal_(generator=torch.Generator().manual_seed(11))
    params = table_to_tcnn_params(encoding.table.detach())
    # tcnn's layout: params[(level offset + row) * F + feature]
    level, row, feature = 3, 17, 2
    assert params[(int(encoding.offsets[level]) + row) * 4 + feature] == encoding.table[encoding.offsets[level] + row, feature]
    back = tcnn_params_to_table(params.clone(), 4)
    assert torch.equal(back, encoding.table.detach())
    assert torch.equal(table_to_tcnn_params(back), params)
    with pytest.raises(EncodingError, match="multiple of 4"):
        tcnn_params_to_table(params[:-1], 4)
    with pytest.raises(EncodingError, match="rows, features"):
        table_to_tcnn_params(params)


class _FakeTcnnEncoding(torch.nn.Module):
    """tinycudann.Encoding's interface (params, forward) computing `tcnn_lookup` on the CPU."""

    made = 0

    def __init__(self, n_input_dims, config, seed=1337, dtype=None):
        super().__init__()
        assert n_input_dims == 3 and config["otype"] == "HashGrid" and config["hash"] == "CoherentPrime"
        _FakeTcnnEncoding.made += 1
        self.config = config
        n_rows = tcnn_levels(config)[2][-1]
        self.params = torch.nn.Parameter(torch.zeros(n_rows * config["n_features_per_level"]))

    def forward(self, x):
        rows, weights = tcnn_lookup(x.detach().cpu().numpy(), self.config)
        grid = self.params.reshape(-1, self.config["n_features_per_level"])
        out = (torch.from_numpy(weights)[..., None] * grid[torch.from_numpy(rows)]).sum(2)
        return out.reshape(x.shape[0], -1).half()


@pytest.fixture
def fake_tcnn(monkeypatch):
    """Install a fake `tinycudann`; the encoding module's per-process probes start afresh."""
    module = types.ModuleType("tinycudann")
    module.Encoding = _FakeTcnnEncoding
    monkeypatch.setitem(sys.modules, "tinycudann", module)
    _FakeTcnnEncoding.made = 0
    encoding_module._tinycudann_missing.cache_clear()
    encoding_module._warn_once.cache_clear()
    yield module
    encoding_module._tinycudann_missing.cache_clear()
    encoding_module._warn_once.cache_clear()


def test_cpu_inputs_use_torch_even_when_tcnn_is_installed(fake_tcnn):
    # `--device cpu` on a CUDA machine with tcnn: the run's device decides, not the machine.
    encoding = HashEncoding(n_levels=4, log2_table_size=10, base_resolution=4, finest_resolution=64)
    assert encoding.backend == "auto" and encoding.backend_for("cpu") == "torch"
    x = torch.rand(100, 3, generator=torch.Generator().manual_seed(12))
    encoding(x).sum().backward()
    assert _FakeTcnnEncoding.made == 0 and encoding.table.grad.abs().sum() > 0
    explicit = HashEncoding(n_levels=4, log2_table_size=10, base_resolution=4, finest_resolution=64, backend="tcnn")
    with pytest.raises(EncodingError, match="needs CUDA inputs, got device cpu"):
        explicit(x)


def test_tcnn_module_runs_on_our_table_and_checkpoints_cross_backends(fake_tcnn):
    settings = dict(n_levels=5, features_per_level=2, log2_table_size=11, base_resolution=4, finest_resolution=96)
    saved = HashEncoding(**settings)
    with torch.no_grad():
        saved.table.normal_(generator=torch.Generator().manual_seed(13))
    module = saved.tcnn_module(torch.device("cpu"))  # the CPU stands in for a GPU here
    assert isinstance(module, _FakeTcnnEncoding) and _FakeTcnnEncoding.made == 1
    assert saved.tcnn_module(torch.device("cpu")) is module  # made once per device
    assert [name for name, _ in saved.named_parameters()] == ["table"]
    assert list(saved.state_dict()) == ["table"]

    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(14))
    via_tcnn = tcnn_encode(module, x, saved.table)
    assert via_tcnn.dtype == torch.float32
    via_tcnn.square().sum().backward()
    tcnn_grad = saved.table.grad.clone()

    # the checkpoint written by the "tcnn" run loads into a torch run: same field, same gradients
    loaded = HashEncoding(**settings, backend="torch")
    loaded.load_state_dict(saved.state_dict())
    via_torch = loaded(x)
    via_torch.square().sum().backward()
    assert (via_torch - via_tcnn).abs().max() < 2e-3  # the fake, like tcnn, returns float16
    assert torch.allclose(loaded.table.grad, tcnn_grad, rtol=2e-3, atol=2e-3)


def test_auto_falls_back_once_with_a_warning_when_tcnn_cannot_run(fake_tcnn):
    def broken(*args, **kwargs):
        raise RuntimeError("Could not find compatible tinycudann extension for compute capability 90.\nmore")

    fake_tcnn.Encoding = broken
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = HashEncoding(n_levels=2, log2_table_size=8), HashEncoding(n_levels=2, log2_table_size=8)
        assert first.backend_for(cuda) == "torch" and second.backend_for(cuda) == "torch"
        assert first.backend_for(cuda) == "torch"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "compute capability 90" in messages[0] and "PyTorch hash encoding" in messages[0]
    explicit = HashEncoding(n_levels=2, log2_table_size=8, backend="tcnn")
    with pytest.raises(EncodingError) as info:
        explicit.backend_for(cuda)
    assert "\n" not in str(info.value) and "compute capability 90" in str(info.value)


def test_missing_tcnn_is_silent_in_auto_and_an_error_when_asked_for(monkeypatch):
    monkeypatch.setitem(sys.modules, "tinycudann", None)  # import raises ModuleNotFoundError
    encoding_module._tinycudann_missing.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert HashEncoding(n_levels=2, log2_table_size=8).backend_for(torch.device("cuda", 0)) == "torch"
        with pytest.raises(EncodingError, match="tinycudann is not installed"):
            HashEncoding(n_levels=2, log2_table_size=8, backend="tcnn")
    finally:
        encoding_module._tinycudann_missing.cache_clear()


def test_gradients_match_finite_differences_in_float64():
    encoding = _small_encoding(log2_table_size=6).double()  # 8 + 64 dense rows, 2 x 64 hashed
    assert encoding.n_dense_levels == 2 and encoding.sizes.tolist() == [8, 64, 64, 64]
    with torch.no_grad():
        encoding.table.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.rand(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = x.clamp(0.01, 0.99).requires_grad_()

    def encode(points, table):
        return torch.func.functional_call(encoding, {"table": table}, (points,))

    table = encoding.table.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(encode, (x, table), eps=1e-7, atol=1e-6)


def test_table_gradient_is_the_interpolation_weights():
    encoding = _small_encoding()
    x = torch.rand(200, 3, generator=torch.Generator().manual_seed(5))
    encoding(x).sum().backward()
    # the weights of each point sum to 1 per level and feature
    assert encoding.table.grad.sum().item() == pytest.approx(200 * 4 * 2, rel=1e-5)
    assert (encoding.table.grad >= 0).all()


def test_large_batches_are_chunked_consistently():
    encoding = _small_encoding()
    with torch.no_grad():
        encoding.table.normal_(generator=torch.Generator().manual_seed(6))
    x = torch.rand(140_000, 3, generator=torch.Generator().manual_seed(7))
    full = encoding(x)  # more points than one internal chunk
    assert torch.allclose(full[-5:], encoding(x[-5:]), atol=1e-6)


def test_bad_hash_settings():
    with pytest.raises(EncodingError, match="backend"):
        HashEncoding(backend="cuda")
    with pytest.raises(EncodingError, match="resolution"):
        HashEncoding(base_resolution=64, finest_resolution=16)
    assert issubclass(EncodingError, ValueError)


def test_frequency_encoding_values():
    encoding = FrequencyEncoding(n_frequencies=3)
    x = torch.tensor([[0.1, 0.2, 0.3]])
    out = encoding(x)
    assert out.shape == (1, 3 * 7) and encoding.output_dim == 21
    assert torch.equal(out[0, :3], x[0])
    angles = torch.stack([x[0] * math.pi * 2**k for k in range(3)], dim=-1).flatten()
    assert torch.allclose(out[0, 3:12], torch.sin(angles))
    assert torch.allclose(out[0, 12:], torch.cos(angles))
    assert FrequencyEncoding(2, include_input=False).output_dim == 12


def test_mlp_shape_and_layers():
    mlp = MLP(32, 4, hidden=32, n_hidden_layers=2)
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 32), (32, 32), (32, 4)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in mlp.modules()) == 2
    assert mlp(torch.zeros(7, 32)).shape == (7, 4)
    assert mlp.output_layer is linears[-1]
