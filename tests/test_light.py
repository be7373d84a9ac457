"""Split-sum lighting: the GGX lookup table against an independent Monte Carlo integral, the
cubemap's lookups and convolutions against closed forms, and HDR loading."""

import math

import numpy as np
import pytest
import torch

from xdreamer.render import light as L


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def linear_environment(a=1.0, b=(0.5, 0.3, -0.2)):
    """Lat-long of L(d) = a + b·d (grey), a field whose cosine convolution is known exactly."""
    height = 64
    v = (torch.arange(height) + 0.5) / height
    u = (torch.arange(2 * height) + 0.5) / (2 * height)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    theta, phi = vv * math.pi, (uu - 0.5) * 2 * math.pi
    d = torch.stack([torch.sin(theta) * torch.sin(phi), torch.cos(theta), -torch.sin(theta) * torch.cos(phi)], -1)
    value = a + (d * torch.tensor(b)).sum(-1, keepdim=True)
    return value.expand(height, 2 * height, 3).contiguous()


def monte_carlo_split_sum(n_dot_v, roughness, samples=400_000, seed=0):
    """(scale, bias) by uniform hemisphere sampling of the full GGX BRDF, independent of the
    importance-sampling estimator under test."""
    rng = np.random.default_rng(seed)
    z = rng.random(samples)
    phi = 2 * math.pi * rng.random(samples)
    r = np.sqrt(1 - z**2)
    l = np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)
    v = np.array([math.sqrt(1 - n_dot_v**2), 0.0, n_dot_v])
    h = l + v
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    alpha2 = roughness**4
    n_dot_h, v_dot_h, n_dot_l = h[:, 2], h @ v, l[:, 2]
    d = alpha2 / (math.pi * (n_dot_h**2 * (alpha2 - 1) + 1) ** 2)
    g = L.smith_g_ggx(n_dot_v, n_dot_l, roughness)
    brdf_cos = d * g / (4 * n_dot_v)  # D G / (4 n·l n·v) times n·l
    fc = (1 - v_dot_h) ** 5
    pdf = 1 / (2 * math.pi)
    return np.array([((1 - fc) * brdf_cos).mean() / pdf, (fc * brdf_cos).mean() / pdf])


def test_lut_mirror_limit_is_scale_one_bias_zero():
    lut = L.ggx_lut()
    # Texel (roughness 0.5/128, n·v 1 - 0.5/128): a mirror seen head-on reflects everything, F = F0.
    scale, bias = lut[0, -1].tolist()
    assert abs(scale - 1) < 1e-3 and abs(bias) < 1e-3
    looked_up = L.lookup_lut(lut, torch.tensor([[1.0]]), torch.tensor([[0.0]]))[0]
    assert torch.allclose(looked_up, lut[0, -1])


@pytest.mark.parametrize("n_dot_v, roughness", [(0.5, 0.5), (0.9, 0.7), (0.3, 0.9)])
def test_lut_matches_independent_monte_carlo(n_dot_v, roughness):
    reference = monte_carlo_split_sum(n_dot_v, roughness)
    estimate = L.integrate_ggx_brdf(np.array([n_dot_v]), np.array([roughness]), samples=512)[0]
    assert np.abs(estimate - reference).max() < 0.01, (estimate, reference)
    table = L.lookup_lut(L.ggx_lut(), torch.tensor([[n_dot_v]]), torch.tensor([[roughness]]))[0].numpy()
    assert np.abs(table - reference).max() < 0.015, (table, reference)


def test_lut_is_smooth_and_bounded():
    lut = L.ggx_lut()
    assert lut.shape == (128, 128, 2)
    assert float((lut[..., 0] + lut[..., 1]).max()) <= 1.0 + 1e-4  # no energy gain for F0 = 1
    assert float(lut.min()) >= 0
    # Away from grazing view (n·v < 4/128, where the Fresnel bias genuinely jumps from 0 to ~1
    # as roughness goes to 0) neighbouring texels differ by a few percent at most: no sampling noise.
    away = lut[:, 4:]
    assert float((away[1:] - away[:-1]).abs().max()) < 0.04
    assert float((away[:, 1:] - away[:, :-1]).abs().max()) < 0.04


def test_lut_is_cached_and_deterministic():
    first = L.ggx_lut(32, 64)
    path = L.cache_dir("lut") / "ggx_split_sum_32_64.npy"
    assert path.is_file()
    assert torch.equal(first, torch.from_numpy(L.integrate_ggx_brdf(
        *(np.meshgrid((np.arange(32) + 0.5) / 32, (np.arange(32) + 0.5) / 32, indexing="ij")[k].ravel() for k in (1, 0)), 64
    ).reshape(32, 32, 2).astype(np.float32)))
    assert torch.equal(L.ggx_lut(32, 64), first)


def test_cube_face_mapping_round_trips():
    dirs = L.cube_directions(8)
    face, s, t = L.direction_to_cube(dirs.reshape(-1, 3))
    expected_face = torch.arange(6).repeat_interleave(64)
    centres = (torch.arange(8) + 0.5) / 8 * 2 - 1
    assert torch.equal(face, expected_face)
    assert torch.allclose(s.view(6, 8, 8), centres.view(1, 1, 8).expand(6, 8, 8), atol=1e-5)
    assert torch.allclose(t.view(6, 8, 8), centres.view(1, 8, 1).expand(6, 8, 8), atol=1e-5)


@pytest.fixture(scope="module")
def linear_light():
    return L.EnvironmentLight.from_latlong(linear_environment(), scale=1.0, resolution=32)


def random_directions(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)


def test_cubemap_lookup_is_seamless(linear_light):
    # Directions on and next to cube edges and corners, where faces meet.
    d = random_directions()
    d = torch.nn.functional.normalize(torch.where(d.abs() > 0.3, d.sign() * d.abs().max(-1, keepdim=True).values, d), dim=-1)
    exact = 1.0 + (d * torch.tensor([0.5, 0.3, -0.2])).sum(-1)
    looked_up = L.sample_cube(linear_light.base, d)[:, 0]
    assert float((looked_up - exact).abs().max()) < 0.02  # 32^2 faces from a 64x128 lat-long
    # Straddling the +x/+z edge (x = z): the two faces' lookups agree, no seam.
    y = torch.linspace(-0.9, 0.9, 50)
    left = torch.stack([torch.ones_like(y), y, torch.full_like(y, 1 - 1e-4)], -1)
    right = torch.stack([torch.full_like(y, 1 - 1e-4), y, torch.ones_like(y)], -1)
    assert torch.equal(L.direction_to_cube(left)[0], torch.zeros(50, dtype=torch.long))
    assert torch.equal(L.direction_to_cube(right)[0], torch.full((50,), 4))
    jump = L.sample_cube(linear_light.base, left) - L.sample_cube(linear_light.base, right)
    assert float(jump.abs().max()) < 1e-3


def test_irradiance_of_linear_field_is_closed_form(linear_light):
    # (1/pi) ∫ (a + b·l) max(n·l, 0) dl = a + (2/3) b·n
    n = random_directions()
    exact = 1.0 + (2 / 3) * (n * torch.tensor([0.5, 0.3, -0.2])).sum(-1)
    assert float((linear_light.diffuse(n)[:, 0] - exact).abs().max()) < 0.02


def test_specular_levels_blur_towards_the_irradiance(linear_light):
    # A linear field convolved by a symmetric lobe stays linear with a smaller slope; the
    # slope shrinks monotonically with roughness and the mirror level keeps it.
    axis = torch.nn.functional.normalize(torch.tensor([[0.5, 0.3, -0.2]]), dim=-1)
    slopes = []
    for r in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        rough = torch.full((2, 1), r)
        up, down = linear_light.specular(torch.cat([axis, -axis]), rough)[:, 0]
        slopes.append(float(up - down) / 2)
    b_norm = math.sqrt(0.5**2 + 0.3**2 + 0.2**2)
    assert abs(slopes[0] - b_norm) < 0.01
    assert all(a > b for a, b in zip(slopes, slopes[1:]))
    assert slopes[-1] > (2 / 3) * b_norm * 0.8


def test_uniform_environment_is_constant():
    light = L.uniform_environment(1.0)
    d = random_directions(1000)
    rough = torch.rand(1000, 1, generator=torch.Generator().manual_seed(1))
    assert float((light.diffuse(d) - 1).abs().max()) < 1e-4
    assert float((light.specular(d, rough) - 1).abs().max()) < 1e-4


def test_default_environment_has_sky_ground_and_sun():
    sky = L.default_environment_map(64)
    assert sky.shape == (64, 128, 3) and float(sky.min()) > 0
    row, col = divmod(int(sky.sum(-1).argmax()), 128)
    theta, phi = (row + 0.5) / 64 * math.pi, ((col + 0.5) / 128 - 0.5) * 2 * math.pi
    d = torch.tensor([math.sin(theta) * math.sin(phi), math.cos(theta), -math.sin(theta) * math.cos(phi)])
    sun = torch.nn.functional.normalize(torch.tensor([0.5, 0.75, 0.45]), dim=0)
    assert float(d @ sun) > math.cos(math.radians(5))
    assert float(sky[:32].mean()) > float(sky[32:].mean())  # the sky is brighter than the ground


def test_load_environment_reads_hdr_and_reports_bad_files(tmp_path):
    import cv2

    image = np.zeros((16, 32, 3), np.float32)
    image[..., 0], image[..., 2] = 4.0, 0.25  # red bright, blue dim (RGB)
    path = tmp_path / "env.hdr"
    assert cv2.imwrite(str(path), image[..., ::-1].copy())
    loaded = L.read_hdr_image(path)
    assert loaded.shape == (16, 32, 3)
    assert torch.allclose(loaded[0, 0], torch.tensor([4.0, 0.0, 0.25]), rtol=0.02)
    light = L.load_environment(path, scale=2.0, resolution=32)
    assert torch.allclose(light.diffuse(torch.tensor([[0.0, 1.0, 0.0]])), torch.tensor([[8.0, 0.0, 0.5]]), rtol=0.03)

    with pytest.raises(L.EnvironmentMapError, match="not found"):
        L.load_environment(tmp_path / "missing.hdr")
    garbage = tmp_path / "garbage.exr"
    garbage.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        L.load_environment(garbage)
    with pytest.raises(ValueError, match="must be"):
        L.EnvironmentLight.from_latlong(torch.ones(8, 16))
