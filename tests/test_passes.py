"""Geometry passes against ray casting (trimesh) on a non-convex mesh, and their vertex gradients."""

import math

import numpy as np
import pytest
import torch
import trimesh

from xdreamer.mesh import Mesh
from xdreamer.render.camera import orbit_cameras, spherical_cameras
from xdreamer.render.passes import render_geometry
from xdreamer.render.raster import interpolate


@pytest.fixture(scope="module")
def torus() -> trimesh.Trimesh:
    # Tilted so the hole and the inner side (the non-convex parts) face the cameras.
    mesh = trimesh.creation.torus(major_radius=0.8, minor_radius=0.3, major_sections=48, minor_sections=24)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(math.radians(60), [1, 0, 0]))
    mesh.apply_translation([0.1, -0.05, 0.0])
    return mesh


def ray_cast(mesh: trimesh.Trimesh, cameras, height: int, width: int):
    """Per camera: (hit (H, W) bool, view-axis depth (H, W), face index (H, W)) through pixel centres."""
    results = []
    for index in range(len(cameras)):
        c2w = cameras.c2w[index].double().numpy()
        tan = math.tan(float(cameras.fov_y[index]) / 2)
        shift = cameras.shift[index].double().numpy()
        x = ((np.arange(width) + 0.5) / width * 2 - 1 - shift[0]) * tan * width / height
        y = (1 - (np.arange(height) + 0.5) / height * 2 - shift[1]) * tan
        xx, yy = np.meshgrid(x, y)
        directions_cam = np.stack([xx, yy, -np.ones_like(xx)], -1).reshape(-1, 3)
        directions = directions_cam @ c2w[:3, :3].T
        origins = np.broadcast_to(c2w[:3, 3], directions.shape)
        locations, ray_index, face_index = mesh.ray.intersects_location(origins, directions, multiple_hits=False)
        hit = np.zeros(height * width, dtype=bool)
        depth = np.zeros(height * width)
        faces = np.full(height * width, -1)
        hit[ray_index] = True
        depth[ray_index] = (locations - c2w[:3, 3]) @ -c2w[:3, 2]  # along the view axis (camera -z)
        faces[ray_index] = face_index
        results.append((hit.reshape(height, width), depth.reshape(height, width), faces.reshape(height, width)))
    return results


def test_mask_depth_and_normals_match_ray_casting_on_a_torus(torus):
    mesh = Mesh.from_arrays(torus.vertices, torus.faces)
    cameras = orbit_cameras(3, elevation=25.0, radius=3.0, fov_deg=45.0, start_azimuth=10.0)
    out = render_geometry(mesh, cameras, 64, backend="torch")
    assert out["normal"].shape == (3, 64, 64, 3) and out["mask"].shape == (3, 64, 64, 1)
    assert out["depth"].shape == (3, 64, 64)
    for index, (hit, depth, faces) in enumerate(ray_cast(torus, cameras, 64, 64)):
        covered = (out["rast"][index, ..., 3] > 0).numpy()
        mask = (out["mask"][index, ..., 0] > 0.5).numpy()
        iou = (covered & hit).sum() / (covered | hit).sum()
        iou_mask = (mask & hit).sum() / (mask | hit).sum()
        assert iou >= 0.99, iou
        assert iou_mask >= 0.97, iou_mask
        assert hit.sum() > 600 and (~hit).sum() > 600  # the torus and its hole are both in view
        both = covered & hit
        rendered = out["depth"][index].numpy()
        relative = np.abs(rendered[both] - depth[both]) / depth[both]
        assert np.median(relative) < 0.005, np.median(relative)
        assert (rendered[~covered] == 0).all() and (rendered[covered] > 1.0).all()
        # Smooth normals agree with the flat normal of the face the ray hit.
        normal = out["normal"][index].numpy()[both & (out["mask"][index, ..., 0] == 1).numpy()]
        flat = torus.face_normals[faces[both & (out["mask"][index, ..., 0] == 1).numpy()]]
        cosine = (normal * flat).sum(-1) / np.linalg.norm(normal, axis=-1)
        assert np.median(cosine) > 0.98
        length = np.linalg.norm(normal, axis=-1)  # unit, except blends across self-occlusion edges
        assert abs(np.median(length) - 1) < 1e-5 and length.max() < 1 + 1e-5
        assert (out["normal"][index][out["mask"][index, ..., 0] == 0] == 0).all()  # background stays 0
        print(f"view {index}: IoU {iou:.4f}, antialiased-mask IoU {iou_mask:.4f}, median depth error {np.median(relative):.2e}, median normal cosine {np.median(cosine):.4f}")


def test_shifted_non_square_cameras_reproject_through_their_intrinsics(torus):
    mesh = Mesh.from_arrays(torus.vertices, torus.faces)
    cameras = spherical_cameras(
        torch.tensor([20.0]), torch.tensor([-35.0]), torch.tensor([3.2]), torch.deg2rad(torch.tensor([38.0])),
        shift=torch.tensor([[0.08, -0.05]]),
    )
    height, width = 40, 56
    out = render_geometry(mesh, cameras, (height, width), backend="torch")
    ((hit, _, _),) = ray_cast(torus, cameras, height, width)
    covered = (out["rast"][0, ..., 3] > 0).numpy()
    assert (covered & hit).sum() / (covered | hit).sum() >= 0.99
    # The surface point seen at each pixel, projected with the OpenCV intrinsics, lands on that
    # pixel's centre: intrinsics, camera-to-world and the rasterizer's pixel grid agree.
    points = interpolate(mesh.vertices, out["rast"], mesh.faces, backend="torch")[0].double().numpy()[covered]
    fl_x, fl_y, cx, cy = cameras.intrinsics(width, height)[0].double().numpy()
    w2c = np.linalg.inv(cameras.c2w[0].double().numpy())
    camera = points @ w2c[:3, :3].T + w2c[:3, 3]
    u = fl_x * camera[:, 0] / -camera[:, 2] + cx
    v = fl_y * -camera[:, 1] / -camera[:, 2] + cy
    row, column = np.nonzero(covered)
    assert np.abs(u - (column + 0.5)).max() < 1e-2 and np.abs(v - (row + 0.5)).max() < 1e-2
    assert np.allclose(-camera[:, 2], out["depth"][0].numpy()[covered], rtol=1e-4)


def test_mask_area_gradient_matches_finite_differences_when_scaling_a_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    base = torch.tensor(sphere.vertices, dtype=torch.float64)
    faces = torch.tensor(sphere.faces)
    cameras = orbit_cameras(2, elevation=10.0)
    size, radius, distance, fov = 48, 0.6, 3.0, math.radians(40.0)

    def area(scale):
        mesh = Mesh(vertices=base * scale, faces=faces)
        return render_geometry(mesh, cameras, size, backend="torch")["mask"].sum()

    def disc(scale):  # exact silhouette area of a sphere in perspective, pixels, both views
        ndc = math.tan(math.asin(radius * scale / distance)) / math.tan(fov / 2)
        return 2 * math.pi * (ndc * size / 2) ** 2

    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    value = area(scale)
    (grad,) = torch.autograd.grad(value, scale)
    one = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    eps = 1e-4
    local = (area(one(1 + eps)) - area(one(1 - eps))) / (2 * eps)
    assert float(grad) == pytest.approx(float(local), rel=1e-4)
    # The antialiased mask tracks the true area (the polygon is a little smaller than the sphere) ...
    assert float(value.detach()) == pytest.approx(disc(1.0), rel=0.03)
    secant = (area(one(1.05)) - area(one(0.95))) / 0.1
    exact = (disc(1.0 + 1e-6) - disc(1.0 - 1e-6)) / 2e-6
    assert float(secant) == pytest.approx(exact, rel=0.1)
    # ... and so does its local slope: each silhouette edge is blended across the pixel pairs of
    # one direction only, as in nvdiffrast (across both, the slope was up to 2x the area's).
    assert float(grad) == pytest.approx(exact, rel=0.01)
    print(f"mask {float(value.detach()):.1f} px vs disc {disc(1.0):.1f}; d/dscale autograd {float(grad):.1f}, "
          f"local FD {float(local):.1f}, secant {float(secant):.1f}, exact {exact:.1f}")


def test_silhouette_weight_scales_the_silhouette_gradient_and_nothing_else():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    base = torch.tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.tensor(sphere.faces)
    cameras = orbit_cameras(2, elevation=10.0)
    light = torch.tensor([0.3, 0.8, 0.5])
    outputs, mask_grads, shading_grads = {}, {}, {}
    for weight in (1.0, 2.5):
        vertices = base.clone().requires_grad_(True)
        out = render_geometry(Mesh(vertices, faces), cameras, 48, backend="torch", silhouette_weight=weight)
        outputs[weight] = out
        (mask_grads[weight],) = torch.autograd.grad(out["mask"].sum(), vertices, retain_graph=True)
        # the shading part (normals inside the silhouette) reaches the vertices through the normals
        inside = (out["mask"][..., 0] == 1).float()[..., None]
        (shading_grads[weight],) = torch.autograd.grad((out["normal"] * light * inside).sum(), vertices)
    for key in ("normal", "mask", "depth", "rast"):
        assert torch.equal(outputs[1.0][key], outputs[2.5][key]), key
    assert float(mask_grads[1.0].abs().sum()) > 1.0
    assert torch.allclose(mask_grads[2.5], 2.5 * mask_grads[1.0], rtol=1e-5, atol=1e-4)
    assert float(shading_grads[1.0].abs().sum()) > 0.1
    assert torch.allclose(shading_grads[2.5], shading_grads[1.0], rtol=1e-5, atol=1e-4)
