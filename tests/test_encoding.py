"""Hash encoding (levels, dense vs hashed storage, trilinear interpolation, gradients),
frequency encoding and the MLP."""

import math

import pytest
import torch

from xdreamer.encoding import HASH_PRIMES, MLP, EncodingError, FrequencyEncoding, HashEncoding


def _small_encoding(**kwargs):
    # power-of-two resolutions 2, 4, 8, 16 keep lattice points exact in float32
    settings = dict(
        n_levels=4, features_per_level=2, log2_table_size=8, base_resolution=2, finest_resolution=16
    )
    settings.update(kwargs)
    return HashEncoding(backend="torch", **settings)


def test_level_resolutions_and_storage():
    encoding = HashEncoding(backend="torch")
    growth = math.exp((math.log(4096) - math.log(16)) / 15)
    assert encoding.per_level_scale == pytest.approx(growth)
    expected = [math.floor(16 * growth**level + 1e-6) for level in range(16)]
    assert encoding.resolutions.tolist() == expected
    assert expected[0] == 16 and expected[-1] == 4096
    # dense while (res + 1)^3 fits in 2^19 rows: 16, 23, 33, 48, 70 (71^3 = 357911); 101 is hashed
    assert encoding.n_dense_levels == 5
    sizes = [(r + 1) ** 3 for r in expected[:5]] + [2**19] * 11
    assert encoding.table.shape == (sum(sizes), 2)
    assert encoding.offsets.tolist() == [sum(sizes[:i]) for i in range(16)]
    assert encoding.table.abs().max().item() <= 1e-4
    assert encoding(torch.rand(5, 3)).shape == (5, 32)


def _row_of(encoding, level, corner):
    """The table row of integer lattice corner (i, j, k) at `level`, written out independently."""
    i, j, k = corner
    res = int(encoding.resolutions[level])
    if level < encoding.n_dense_levels:
        local = i + (res + 1) * j + (res + 1) ** 2 * k
    else:
        # Instant NGP's hash in uint32 arithmetic
        h = (i * HASH_PRIMES[0]) ^ ((j * HASH_PRIMES[1]) % 2**32) ^ ((k * HASH_PRIMES[2]) % 2**32)
        local = h % encoding.table_size
    return int(encoding.offsets[level]) + local


def test_lattice_corners_return_the_stored_feature():
    encoding = _small_encoding()
    assert encoding.resolutions.tolist() == [2, 4, 8, 16]
    assert encoding.n_dense_levels == 2  # 3^3 and 5^3 rows fit in 256; 9^3 and 17^3 are hashed
    with torch.no_grad():
        encoding.table.copy_(torch.randn(encoding.table.shape, generator=torch.Generator().manual_seed(0)))
    generator = torch.Generator().manual_seed(1)
    for level, res in enumerate(encoding.resolutions.tolist()):
        corners = torch.randint(0, res + 1, (50, 3), generator=generator)
        out = encoding(corners.float() / res).reshape(50, encoding.n_levels, 2)[:, level]
        rows = torch.tensor([_row_of(encoding, level, tuple(c.tolist())) for c in corners])
        assert torch.allclose(out, encoding.table[rows], atol=1e-6)


def test_trilinear_interpolation_inside_a_cell():
    encoding = _small_encoding(n_levels=1, base_resolution=4, finest_resolution=4)
    with torch.no_grad():
        encoding.table.copy_(torch.randn(encoding.table.shape, generator=torch.Generator().manual_seed(2)))
    frac = torch.tensor([0.25, 0.6, 0.9])
    cell = (1, 2, 3)
    x = ((torch.tensor(cell) + frac) / 4)[None]
    expected = torch.zeros(2)
    for c in range(8):
        bits = [(c >> d) & 1 for d in range(3)]
        weight = math.prod(f if b else 1 - f for f, b in zip(frac.tolist(), bits))
        corner = tuple(cell[d] + bits[d] for d in range(3))
        expected += weight * encoding.table[_row_of(encoding, 0, corner)].detach()
    assert torch.allclose(encoding(x)[0], expected, atol=1e-6)


def test_hashed_levels_match_instant_ngp_hash_for_large_coordinates():
    encoding = _small_encoding(n_levels=2, base_resolution=1024, finest_resolution=4096, log2_table_size=19)
    assert encoding.n_dense_levels == 0 and encoding.resolutions.tolist() == [1024, 4096]
    with torch.no_grad():
        encoding.table.copy_(torch.arange(encoding.table.numel(), dtype=torch.float32).reshape(-1, 2))
    corner = (4095, 4096, 2047)  # products far beyond 2^32: the uint32 wrap-around must match
    out = encoding(torch.tensor([corner], dtype=torch.float32) / 4096)[0, 2:]
    assert torch.equal(out, encoding.table[_row_of(encoding, 1, corner)].detach())
    assert (corner[1] * HASH_PRIMES[1]) > 2**32


def test_gradients_match_finite_differences_in_float64():
    encoding = _small_encoding(log2_table_size=6).double()  # 27 dense + 3 x 64 hashed rows
    assert encoding.n_dense_levels == 1
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
