"""Silhouette carving: the pixel rays agree with the rasterizer, the carved pixels are the black
ones well inside the silhouette, the loss has its closed-form value, and carving alone turns a
DMTet disc into a ring (genus 0 -> 1)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import trimesh

from xdreamer.geometry.carving import (
    CarvedRays,
    background_pixels,
    carved_rays,
    enclosed_background,
    ray_carve_loss,
)
from xdreamer.geometry.cleanup import mesh_pieces
from xdreamer.geometry.dmtet import DMTetGeometry
from xdreamer.geometry.init import MeshSDF, fit_geometry_to_sdf
from xdreamer.mesh import Mesh
from xdreamer.render.camera import CameraSampling, sample_cameras, spherical_cameras
from xdreamer.render.passes import render_geometry


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _ray_hits_sphere(origins, directions, centre, radius):
    oc = origins[:, None, None, :] - centre
    b = (oc * directions).sum(-1)
    return b * b - (oc * oc).sum(-1) + radius**2 > 0


def test_pixel_rays_hit_what_the_rasterizer_covers():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.45)
    centre = torch.tensor([0.3, 0.1, -0.2])
    sphere.apply_translation(centre.numpy())
    cameras = sample_cameras(4, torch.Generator().manual_seed(0), CameraSampling(jitter=0.1))
    mask = render_geometry(Mesh.from_arrays(sphere.vertices, sphere.faces), cameras, 48, backend="torch")["mask"][..., 0]
    origins, directions = cameras.pixel_rays(48)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(4, 48, 48), atol=1e-6)
    hit = _ray_hits_sphere(origins, directions, centre, 0.45)
    assert int((mask > 0.99).sum()) > 500
    assert bool(hit[mask > 0.99].all())
    # Background rays miss, except on the rim: the antialiaser blends a silhouette edge across the
    # pixel pairs of one direction only (as nvdiffrast), so a pixel centre just inside the sphere,
    # between two teeth of the polygon's zigzag outline, can read 0 beside a covered pixel (2 here).
    background = mask < 0.01
    rim = F.max_pool2d((~background).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    assert not bool(hit[background & ~rim].any())
    assert int((hit & background).sum()) <= 0.01 * int((rim & background).sum())


def test_background_pixels_are_black_and_inside_the_eroded_silhouette():
    mask = torch.zeros(1, 32, 32, 1)
    mask[:, 8:24, 8:24] = 1.0
    denoised = torch.full((1, 32, 32, 3), 0.6)
    denoised[:, 14:18, 14:18] = 0.02  # the hole the guidance asks for
    denoised[:, 8, 12] = 0.0  # black, but on the silhouette's rim: the silhouette gradient's job
    denoised[:, 20, 20] = 0.15  # dark, not black
    denoised[:, 2, 2] = 0.0  # background in both
    denoised[:, 11, 19] = 0.0  # a one-pixel speck, narrower than a hole
    carve = background_pixels(denoised, mask, threshold=0.1, erosion=1, min_hole=1)
    expected = torch.zeros(1, 32, 32, dtype=torch.bool)
    expected[:, 14:18, 14:18] = True
    assert torch.equal(carve, expected)
    assert int(background_pixels(denoised, mask, threshold=0.1, erosion=1, min_hole=0).sum()) == 17  # + the speck
    assert int(background_pixels(denoised, mask, threshold=0.1, erosion=0, min_hole=0).sum()) == 18  # + the rim
    assert int(background_pixels(denoised, mask, threshold=0.1, erosion=1, min_hole=2).sum()) == 0  # 4 < 5 pixels
    # Background that eats into the silhouette from outside is a smaller object, not a hole.
    notched = denoised.clone()
    notched[:, 14:18, 0:18] = 0.02  # the hole, joined to the image's border
    assert int(background_pixels(notched, mask, threshold=0.1, erosion=1, min_hole=1).sum()) == 0


def test_enclosed_background_is_what_no_background_path_joins_to_the_border():
    ring = torch.zeros(1, 9, 9, dtype=torch.bool)
    ring[:, 2:7, 2:7] = True
    ring[:, 3:6, 3:6] = False
    background = ~ring  # the outside, and the ring's 3x3 hole
    hole = torch.zeros(1, 9, 9, dtype=torch.bool)
    hole[:, 3:6, 3:6] = True
    assert torch.equal(enclosed_background(background), hole)
    broken = background.clone()
    broken[:, 4, 2] = True  # a gap in the ring (diagonal steps do not count; this one is 4-connected)
    assert not bool(enclosed_background(broken).any())


def test_carving_loss_has_its_closed_form_value():
    radius, half = 0.5, 1.0

    def sphere_sdf(points):
        return points.norm(dim=-1) - radius

    origins = torch.tensor([[0.0, 0.0, 3.0]])
    directions = torch.tensor([0.0, 0.0, -1.0]).expand(1, 1, 1, 3)
    carve = torch.ones(1, 1, 1, dtype=torch.bool)
    loss = ray_carve_loss(sphere_sdf, *carved_rays(origins, directions, carve), half, samples=4000)
    # mean over the ray's stretch [-1, 1] of relu(r - |z|) = r^2 / (2 h)
    assert float(loss) == pytest.approx(radius**2 / (2 * half), rel=1e-4)
    nothing = ray_carve_loss(sphere_sdf, *carved_rays(origins, directions, ~carve), half)
    assert float(nothing) == 0.0


@pytest.fixture(scope="module")
def dmtet_disc():
    """A DMTet geometry fitted to a disc (radius 0.7, thickness 0.3, axis +y) and the disc's SDF."""
    torch.manual_seed(0)
    geometry = DMTetGeometry(grid_resolution=32, grid_scale=2.1, encoding="frequency")
    disc = trimesh.creation.cylinder(radius=0.7, height=0.3, sections=64)
    disc.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, [1, 0, 0]))
    target = MeshSDF(Mesh.from_arrays(disc.vertices, disc.faces))

    def on_surface(n, generator):
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        return torch.as_tensor(trimesh.sample.sample_surface(disc, n, seed=seed)[0], dtype=torch.float32)

    fit_geometry_to_sdf(geometry, target, on_surface, torch.Generator().manual_seed(0), steps=300, lr=1e-2)
    return geometry, target


def _optimized(geometry: DMTetGeometry, target, carve_weight: float) -> list:
    """80 steps of a term that holds the SDF outside the central column (radius 0.35) to the
    disc's — a stand-in for the guidance keeping the ring — plus carve_weight x the carving loss
    of overhead rays that "see" a hole of radius 0.3 around the axis. Returns the mesh's pieces."""
    geometry = copy.deepcopy(geometry)
    points = (torch.rand(6000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * torch.tensor([0.9, 0.4, 0.9])
    keep = points[points[:, [0, 2]].norm(dim=-1) > 0.35]
    keep_sdf = target(keep)
    cameras = spherical_cameras(
        torch.full((4,), 80.0), torch.tensor([0.0, 90.0, 180.0, 270.0]), torch.full((4,), 3.0), torch.full((4,), 0.6)
    )
    origins, directions = cameras.pixel_rays(32)
    crossing = origins[:, None, None, :] + directions * (origins[:, None, None, 1:2] / -directions[..., 1:2])
    carve = crossing[..., [0, 2]].norm(dim=-1) < 0.3  # where each ray crosses the plane y = 0
    optimizer = torch.optim.Adam(geometry.parameters(), lr=3e-3)
    for _ in range(80):
        optimizer.zero_grad()
        loss = (geometry.sdf_at(keep) - keep_sdf).square().mean()
        loss = loss + carve_weight * ray_carve_loss(geometry.sdf_at, *carved_rays(origins, directions, carve), 1.05)
        loss.backward()
        optimizer.step()
    return mesh_pieces(geometry().detach())


def test_carving_opens_a_hole_through_a_dmtet_disc(dmtet_disc):
    geometry, target = dmtet_disc
    before = mesh_pieces(geometry().detach())
    assert len(before) == 1 and before[0].genus == 0
    held = _optimized(geometry, target, carve_weight=0.0)
    assert len(held) == 1 and held[0].genus == 0  # without carving the disc stays a disc
    carved = _optimized(geometry, target, carve_weight=1.0)
    assert len(carved) == 1 and carved[0].genus == 1


def test_carved_rays_are_remembered_for_memory_steps_once_confirmed(tmp_path):
    from xdreamer.rundir import read_checkpoint, write_checkpoint

    origins = torch.tensor([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    directions = torch.tensor([[[[0.0, 0.0, -1.0], [0.0, 0.1, -1.0]]], [[[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.1]]]])
    carve = torch.tensor([[[True, False]], [[True, True]]])  # (2 views, 1 row, 2 columns)
    o, d = carved_rays(origins, directions, carve)
    assert torch.equal(o, origins[[0, 1, 1]]) and torch.equal(d, directions[[0, 1, 1], 0, [0, 0, 1]])
    none = (o[:0], d[:0])
    memory = CarvedRays(3)
    assert memory.add(0, o, d)[0].shape[0] == 3
    assert memory.add(1, none[0], none[1])[0].shape[0] == 0  # seen on one step only: not remembered yet
    assert memory.add(2, o[:1], d[:1])[0].shape[0] == 4  # seen twice: steps 0 and 2
    assert memory.add(3, *none)[0].shape[0] == 0  # step 0's rays are 3 steps old; step 2's alone are not carved again
    assert memory.add(4, o[:1], d[:1])[0].shape[0] == 2  # steps 2 and 4
    once = CarvedRays(1)
    once.add(0, o, d)
    assert torch.equal(once.add(1, o[1:], d[1:])[1], d[1:])  # memory 1: this step's rays only
    # The memory travels in the run's checkpoint (a resumed run carves what it would have).
    memory.add(6, o, d)
    memory.add(7, o[:1], d[:1])
    write_checkpoint(tmp_path / "c.safetensors", {"carved": memory.state_dict()})
    restored = CarvedRays(3)
    restored.load_state_dict(read_checkpoint(tmp_path / "c.safetensors")["carved"])
    assert torch.equal(restored.steps, torch.tensor([6, 6, 6, 7]))
    assert torch.equal(restored.add(8, *none)[1], memory.add(8, *none)[1])
    thrice = CarvedRays(10, confirm=3)
    assert [thrice.add(step, o[:1], d[:1])[0].shape[0] for step in (0, 4, 8, 12)] == [1, 1, 3, 3]
    with pytest.raises(ValueError, match="at least 1 step"):
        CarvedRays(0)
    with pytest.raises(ValueError, match="seen on at least 1 step"):
        CarvedRays(5, confirm=0)


def test_a_carving_memory_keeps_a_hole_the_guidance_shows_now_and_then(dmtet_disc):
    """The disc, a term holding its centre in too (weakly: SDS filling back what carving opens),
    and the hole's rays carved on one step in 20 (the toy run's denoised image shows a hole on
    18-20 of 150 steps): carving only when it is shown leaves a disc, a memory of 40 steps opens
    the ring; a hole shown once is not remembered."""
    geometry, target = dmtet_disc
    points = (torch.rand(6000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * torch.tensor([0.9, 0.4, 0.9])
    centre = points[:, [0, 2]].norm(dim=-1) < 0.35
    inner, outer = points[centre], points[~centre]
    inner_sdf, outer_sdf = target(inner), target(outer)
    cameras = spherical_cameras(
        torch.full((4,), 80.0), torch.tensor([0.0, 90.0, 180.0, 270.0]), torch.full((4,), 3.0), torch.full((4,), 0.6)
    )
    origins, directions = cameras.pixel_rays(32)
    crossing = origins[:, None, None, :] + directions * (origins[:, None, None, 1:2] / -directions[..., 1:2])
    hole = crossing[..., [0, 2]].norm(dim=-1) < 0.3

    def genus(memory: int, shown_every: int) -> int:
        disc = copy.deepcopy(geometry)
        carved = CarvedRays(memory)
        optimizer = torch.optim.Adam(disc.parameters(), lr=3e-3)
        for step in range(80):
            optimizer.zero_grad()
            loss = (disc.sdf_at(outer) - outer_sdf).square().mean() + 0.02 * (disc.sdf_at(inner) - inner_sdf).square().mean()
            shown = hole if step % shown_every == 0 else torch.zeros_like(hole)
            loss = loss + 3.0 * ray_carve_loss(disc.sdf_at, *carved.add(step, *carved_rays(origins, directions, shown)), 1.05)
            loss.backward()
            optimizer.step()
        pieces = mesh_pieces(disc().detach())
        assert len(pieces) == 1
        return pieces[0].genus

    assert genus(memory=1, shown_every=20) == 0
    assert genus(memory=40, shown_every=20) == 1
    assert genus(memory=40, shown_every=1000) == 0  # shown on step 0 only


def test_decode_images_inverts_encode_images_for_a_pixel_model():
    from xdreamer.guidance.loader import load_guidance_model

    model = load_guidance_model("toy", "cpu")
    images = torch.rand(2, model.image_size, model.image_size, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model.decode_images(model.encode_images(images)), images, atol=1e-6)


def test_denoised_is_the_clean_input_the_noise_prediction_implies():
    from xdreamer.pipeline.guide import GuideOutput

    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    uncond, cond = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    alphas = torch.tensor([0.9, 0.2])
    out = GuideOutput({}, False, None, None, x, noise, uncond, cond, alphas)
    a = alphas.view(-1, 1, 1, 1)
    noisy = a.sqrt() * x + (1 - a).sqrt() * noise
    for scale in (1.0, 4.0, 20.0):
        prediction = uncond + scale * (cond - uncond)
        torch.testing.assert_close(out.denoised(scale), (noisy - (1 - a).sqrt() * prediction) / a.sqrt())
    exact = GuideOutput({}, False, None, None, x, noise, noise, noise, alphas)  # ε̂ = ε
    torch.testing.assert_close(exact.denoised(7.5), x)
    # A step run at guidance 1 without keep_uncond has no ε̂_u to extrapolate from.
    with pytest.raises(ValueError, match="keep_uncond"):
        GuideOutput({}, False, None, None, x, noise, None, cond, alphas).denoised(4.0)
