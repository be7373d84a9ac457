"""PBR shading: white furnace, split-sum energy of a rough metal, normal mapping frames, the sRGB
curve, and render_pbr's compositing contract."""

import math

import pytest
import torch
import torch.nn.functional as F
import trimesh

from xdreamer.mesh import Mesh
from xdreamer.render.camera import orbit_cameras
from xdreamer.render.light import lookup_lut, uniform_environment
from xdreamer.render.shade import (
    fallback_tangents,
    linear_to_srgb,
    perturb_normal,
    render_pbr,
    render_textured,
    split_sum_shade,
    srgb_to_linear,
    vertex_tangents,
    world_to_tangent,
)

RADIUS = 0.8


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def white_light():
    return uniform_environment(1.0)


@pytest.fixture(scope="module")
def sphere():
    s = trimesh.creation.icosphere(4, radius=RADIUS)
    return Mesh.from_arrays(s.vertices, s.faces)


def constant_material(kd=1.0, roughness=0.5, metallic=0.0, occlusion=0.0):
    def material_fn(positions):
        n = positions.shape[0]
        full = lambda value, c: positions.new_full((n, c), value)  # noqa: E731
        return {
            "kd": full(kd, 3),
            "roughness": full(roughness, 1),
            "metallic": full(metallic, 1),
            "occlusion": full(occlusion, 1),
            "normal_perturbation": torch.cat([full(0.0, 2), full(1.0, 1)], -1),
        }

    return material_fn


def unit(n=2000, seed=0):
    return F.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_srgb_curve_round_trips_and_hits_reference_points():
    x = torch.linspace(0, 1, 1001)
    assert float((srgb_to_linear(linear_to_srgb(x)) - x).abs().max()) < 1e-5
    assert abs(float(linear_to_srgb(torch.tensor(0.5))) - 0.735357) < 1e-5
    assert abs(float(linear_to_srgb(torch.tensor(0.0031308))) - 0.0404500) < 1e-6  # the two pieces meet
    assert float(linear_to_srgb(torch.tensor(1.0))) == pytest.approx(1.0, abs=1e-6)


def test_white_furnace_diffuse_is_one(white_light):
    n, v = unit(), unit(seed=1)
    v = torch.where((n * v).sum(-1, keepdim=True) < 0, -v, v)
    ones = torch.ones(n.shape[0], 1)
    rgb = split_sum_shade(n, v, torch.ones_like(n), ones * 0.5, ones * 0, ones * 0, white_light, specular=False)
    assert float((rgb - 1).abs().max()) < 0.02
    # Occlusion scales everything, as in nvdiffrec.
    rgb = split_sum_shade(n, v, torch.ones_like(n), ones * 0.5, ones * 0, ones * 0.25, white_light, specular=False)
    assert float((rgb - 0.75).abs().max()) < 0.02


def pixel_n_dot_v(out, cameras):
    """n·v per covered pixel of a sphere at the origin: the surface point is RADIUS * normal."""
    normal = out["normal"]
    eye = cameras.position[:, None, None, :]
    view = F.normalize(eye - RADIUS * normal, dim=-1)
    return (normal * view).sum(-1, keepdim=True).clamp(1e-4, 1)


def test_white_furnace_render_is_diffuse_one_plus_dielectric_specular(sphere, white_light):
    cameras = orbit_cameras(2, elevation=20)
    out = render_pbr(sphere, cameras, 64, constant_material(kd=1.0, roughness=0.5), white_light, backend="torch")
    inside = out["mask"][..., 0] > 0.999
    terms = lookup_lut(white_light.lut, pixel_n_dot_v(out, cameras), torch.full_like(out["mask"], 0.5))
    specular = 0.04 * terms[..., 0:1] + terms[..., 1:2]
    diffuse = out["rgb_linear"] - specular
    assert int(inside.sum()) > 1000
    assert float((diffuse[inside] - 1).abs().max()) < 0.02


@pytest.mark.parametrize("roughness", [0.3, 0.7])
def test_rough_metal_loses_only_what_the_split_sum_table_predicts(sphere, white_light, roughness):
    cameras = orbit_cameras(2, elevation=-5)
    out = render_pbr(sphere, cameras, 64, constant_material(1.0, roughness, 1.0), white_light, backend="torch")
    inside = out["mask"][..., 0] > 0.999
    terms = lookup_lut(white_light.lut, pixel_n_dot_v(out, cameras), torch.full_like(out["mask"], roughness))
    predicted = (terms[..., 0:1] + terms[..., 1:2]).expand_as(out["rgb_linear"])
    reflected = out["rgb_linear"]
    assert float((reflected[inside] - predicted[inside]).abs().max()) < 0.02
    assert float(reflected[inside].max()) <= 1.0 + 1e-3  # a white furnace never gains energy
    # Single-scattering GGX loses energy that grows with roughness (no multiple-bounce term);
    # head-on it still keeps most of it.
    assert float(predicted[inside].max()) > (0.95 if roughness < 0.5 else 0.6)


def test_perturb_normal_frames():
    n = unit(500)
    t = fallback_tangents(n)
    assert float((n * t).sum(-1).abs().max()) < 1e-5
    assert float((t.norm(dim=-1) - 1).abs().max()) < 1e-5
    # Straight up: still a valid tangent.
    up = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    assert torch.allclose(fallback_tangents(up).norm(dim=-1), torch.ones(2))

    identity = perturb_normal(n, t, torch.tensor([0.0, 0.0, 0.5]).expand_as(n))
    assert torch.allclose(identity, n, atol=1e-6)
    tilted = perturb_normal(n, t, torch.tensor([1.0, 0.0, 1.0]).expand_as(n))
    assert torch.allclose((tilted * n).sum(-1), torch.full((500,), math.cos(math.pi / 4)), atol=1e-5)
    assert torch.allclose((tilted * t).sum(-1), torch.full((500,), math.sin(math.pi / 4)), atol=1e-5)
    flipped = perturb_normal(n, t, torch.tensor([0.0, 1.0, 1.0]).expand_as(n), -torch.ones(500, 1))
    straight = perturb_normal(n, t, torch.tensor([0.0, 1.0, 1.0]).expand_as(n))
    assert torch.allclose((flipped * torch.cross(n, t, dim=-1)).sum(-1), -(straight * torch.cross(n, t, dim=-1)).sum(-1), atol=1e-6)

    p = F.normalize(torch.rand(500, 3) * torch.tensor([2.0, 2.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0]), dim=-1)
    hand = torch.where(torch.rand(500, 1) < 0.5, -1.0, 1.0)
    back = world_to_tangent(perturb_normal(n, t, p, hand), n, t, hand)
    assert float((back - p).abs().max()) < 1e-5


def quad(mirror: bool) -> Mesh:
    """A unit square in the xy plane facing +z with glTF uvs u = x, v = 1 - y (or u = 1 - x)."""
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    u = 1 - vertices[:, 0] if mirror else vertices[:, 0]
    return Mesh(vertices, faces, torch.stack([u, 1 - vertices[:, 1]], -1))


def test_vertex_tangents_follow_uv_directions():
    t = vertex_tangents(quad(mirror=False))
    assert torch.allclose(t, torch.tensor([1.0, 0, 0, 1]).expand(4, 4), atol=1e-6)
    # Mirrored u: tangent flips and the handedness keeps the bitangent pointing up the image (+y).
    t = vertex_tangents(quad(mirror=True))
    assert torch.allclose(t, torch.tensor([-1.0, 0, 0, -1]).expand(4, 4), atol=1e-6)
    n = torch.tensor([0.0, 0.0, 1.0])
    bitangent = torch.cross(n.expand(4, 3), t[:, :3], dim=-1) * t[:, 3:]
    assert torch.allclose(bitangent, torch.tensor([0.0, 1.0, 0.0]).expand(4, 3), atol=1e-6)


def test_split_sum_gradients_match_finite_differences(white_light):
    from xdreamer.render.light import default_environment

    light = default_environment(resolution=32)
    n = F.normalize(torch.tensor([[0.3, 0.8, 0.4]]), dim=-1)
    v = F.normalize(torch.tensor([[0.1, 0.5, 0.9]]), dim=-1)
    kd = torch.tensor([[0.6, 0.4, 0.2]], requires_grad=True)
    # Roughness 0.5 sits mid-way between LUT texels and prefiltered levels: the lookups are
    # piecewise linear, so finite differences must not straddle a kink.
    rough = torch.tensor([[0.5]], requires_grad=True)
    metal = torch.tensor([[0.3]], requires_grad=True)

    def f(kd, rough, metal):
        return split_sum_shade(n, v, kd, rough, metal, torch.zeros(1, 1), light).sum()

    f(kd, rough, metal).backward()
    eps = 1e-4
    for tensor, grad in ((kd, kd.grad), (rough, rough.grad), (metal, metal.grad)):
        for i in range(tensor.shape[1]):
            plus, minus = tensor.detach().clone(), tensor.detach().clone()
            plus[0, i] += eps
            minus[0, i] -= eps
            args = {id(kd): kd.detach(), id(rough): rough.detach(), id(metal): metal.detach()}
            args_p, args_m = dict(args), dict(args)
            args_p[id(tensor)], args_m[id(tensor)] = plus, minus
            fd = (f(*args_p.values()) - f(*args_m.values())) / (2 * eps)
            assert abs(float(fd) - float(grad[0, i])) < 1e-3, (float(fd), float(grad[0, i]))


def test_render_pbr_composites_over_background_and_queries_covered_pixels_only(sphere, white_light):
    calls = []
    material = constant_material(kd=0.5)

    def counting(positions):
        calls.append(positions.shape[0])
        assert float((positions.norm(dim=-1) - RADIUS).abs().max()) < 0.01  # points on the sphere
        return material(positions)

    cameras = orbit_cameras(2)
    out = render_pbr(sphere, cameras, (48, 64), counting, white_light, background=(0.0, 0.25, 1.0), backend="torch")
    assert out["rgb"].shape == (2, 48, 64, 3) and out["mask"].shape == (2, 48, 64, 1)
    assert calls == [int((out["kd"][..., 0] > 0).sum())]
    # Coverage matches the sphere's projected disc: half-angle asin(R / 3) of a 40° field of view.
    half = math.tan(math.asin(RADIUS / 3)) / math.tan(math.radians(20))
    disc = math.pi * (half * 48 / 2) ** 2 / (48 * 64)  # fraction of a 48 x 64 image, square pixels
    assert abs(float(out["mask"][0].mean()) - disc) / disc < 0.02
    background = out["mask"][..., 0] == 0
    assert torch.allclose(out["rgb"][background], torch.tensor([0.0, 0.25, 1.0]).expand(int(background.sum()), 3))
    with pytest.raises(ValueError, match="uvs"):
        render_textured(sphere, cameras, 32, {}, white_light, backend="torch")
