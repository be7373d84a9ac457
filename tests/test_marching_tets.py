"""Marching tetrahedra and the DMTet geometry: surface accuracy, watertightness, orientation,
gradients against finite differences."""

import math

import pytest
import torch

from xdreamer.geometry.dmtet import TET_EDGES, DMTetGeometry, GeometryError, marching_tetrahedra
from xdreamer.geometry.tets import tetrahedral_grid
from xdreamer.mesh import Mesh


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _directed_edges(faces):
    return torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])


def _assert_closed_and_consistent(faces, n_vertices):
    """Every directed edge appears once and its reverse once: closed, manifold, consistently wound."""
    edges = _directed_edges(faces)
    keys = edges[:, 0] * n_vertices + edges[:, 1]
    reverse = edges[:, 1] * n_vertices + edges[:, 0]
    assert torch.unique(keys).numel() == keys.numel()
    assert torch.equal(torch.sort(keys).values, torch.sort(reverse).values)


def test_sphere_area_and_volume_at_grid_64():
    vertices, tets = tetrahedral_grid(64)
    radius = 0.35
    sdf = vertices.norm(dim=-1) - radius
    verts, faces = marching_tetrahedra(vertices, tets, sdf)
    mesh = Mesh(verts, faces)
    area, volume = mesh.area().item(), mesh.volume().item()
    assert area == pytest.approx(4 * math.pi * radius**2, rel=0.02)
    # positive signed volume means the faces point outward
    assert volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)
    assert torch.allclose(verts.norm(dim=-1), torch.tensor(radius), atol=1.0 / 64)
    _assert_closed_and_consistent(faces, verts.shape[0])
    assert verts.shape[0] == torch.unique(verts, dim=0).shape[0]  # shared, not duplicated


def test_every_case_faces_outward_on_random_tets():
    generator = torch.Generator().manual_seed(0)
    for case in range(16):
        for _ in range(20):
            tet_vertices = torch.randn(4, 3, generator=generator, dtype=torch.float64)
            if torch.linalg.det(tet_vertices[1:] - tet_vertices[0]) < 0:
                tet_vertices = tet_vertices[[0, 2, 1, 3]]
            magnitude = torch.rand(4, generator=generator, dtype=torch.float64) + 0.1
            inside = torch.tensor([case >> i & 1 for i in range(4)], dtype=torch.bool)
            sdf = torch.where(inside, -magnitude, magnitude)
            verts, faces = marching_tetrahedra(tet_vertices, torch.tensor([[0, 1, 2, 3]]), sdf)
            n_inside = int(inside.sum())
            assert faces.shape[0] == {0: 0, 1: 1, 2: 2, 3: 1, 4: 0}[n_inside]
            assert verts.shape[0] == n_inside * (4 - n_inside)
            if faces.shape[0] == 0:
                continue
            # each output vertex is the zero of the SDF's linear interpolant on its edge
            # and the normal points from the inside vertices towards the outside ones
            direction = tet_vertices[~inside].mean(0) - tet_vertices[inside].mean(0)
            v0, v1, v2 = (verts[faces[:, i]] for i in range(3))
            normals = torch.linalg.cross(v1 - v0, v2 - v0)
            assert (normals @ direction > 0).all()


def test_crossing_points_are_linear_zeros():
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    sdf = torch.tensor([-1.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    verts, faces = marching_tetrahedra(vertices, torch.tensor([[0, 1, 2, 3]]), sdf)
    expected = torch.tensor([[0.25, 0, 0], [0, 0.5, 0], [0, 0, 2 / 3]], dtype=torch.float64)
    assert torch.allclose(torch.sort(verts, dim=0).values, torch.sort(expected, dim=0).values)
    assert faces.shape == (1, 3)


@pytest.mark.parametrize("offset", [1.0, -1.0])
def test_empty_level_set(offset):
    vertices, tets = tetrahedral_grid(4)
    sdf = torch.full((vertices.shape[0],), offset, requires_grad=True)
    verts, faces = marching_tetrahedra(vertices, tets, sdf)
    assert verts.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int64
    Mesh(verts, faces).area().backward()  # an empty mesh must not break a training step
    assert torch.equal(sdf.grad, torch.zeros_like(sdf))


def test_gradients_match_finite_differences():
    vertices, tets = tetrahedral_grid(3)
    vertices = vertices.double()
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(vertices.shape[0], generator=generator, dtype=torch.float64)
    sdf = vertices.norm(dim=-1) - 0.3 + 0.05 * noise
    # keep every value away from 0 so the finite-difference steps never change the topology
    sdf = torch.where(sdf.abs() < 0.02, sdf.sign() * 0.02, sdf)
    vertices = vertices + 0.02 * torch.randn(vertices.shape, generator=generator, dtype=torch.float64)
    assert marching_tetrahedra(vertices, tets, sdf)[1].shape[0] > 10

    def surface(v, s):
        return marching_tetrahedra(v, tets, s)[0]

    assert torch.autograd.gradcheck(
        surface, (vertices.requires_grad_(), sdf.requires_grad_()), eps=1e-6, atol=1e-6
    )


def test_dmtet_geometry_extracts_the_network_surface():
    torch.manual_seed(0)
    geometry = DMTetGeometry(grid_resolution=8, grid_scale=2.0, encoding="frequency")
    sdf, offset = geometry.sdf_and_offset()
    assert sdf.shape == (9**3,) and offset.shape == (9**3, 3)
    assert torch.equal(offset, torch.zeros_like(offset))  # DMTet starts from the undeformed grid
    # sdf_at takes world points; the grid vertices in world units must give the same values
    assert torch.allclose(geometry.sdf_at(geometry.grid_vertices * 2.0), sdf, atol=1e-6)
    with torch.no_grad():
        geometry.mlp.output_layer.bias[0] += 0.1 - sdf.min()  # everything outside
    assert geometry().faces.shape[0] == 0


def test_dmtet_geometry_offsets_move_vertices_and_get_gradients():
    torch.manual_seed(0)
    geometry = DMTetGeometry(grid_resolution=8, grid_scale=2.0, encoding="frequency")
    points = geometry.grid_vertices * 2.0
    offset = torch.full((points.shape[0], 3), 0.5)
    # the authors' bound: tanh(offset) / grid_resolution world units (half a cell at scale 2)
    moved = geometry.deformed_vertices(offset)
    assert torch.allclose(moved - points, torch.full_like(points, math.tanh(0.5) / 8), atol=1e-6)

    with torch.no_grad():
        sdf, _ = geometry.sdf_and_offset()
        geometry.mlp.output_layer.bias[0] -= sdf.median()  # make sure the level set crosses the grid
    mesh = geometry()
    assert mesh.faces.shape[0] > 0
    mesh.vertices.square().sum().backward()
    grad = geometry.mlp.output_layer.weight.grad
    assert grad[0].abs().sum() > 0  # through the SDF
    assert grad[1:].abs().sum() > 0  # through the offsets, although they start at zero


def test_dmtet_geometry_rejects_bad_settings():
    with pytest.raises(GeometryError, match="encoding"):
        DMTetGeometry(grid_resolution=4, encoding="voxels")
    with pytest.raises(GeometryError, match="grid_scale"):
        DMTetGeometry(grid_resolution=4, grid_scale=0)


def test_tet_edges_cover_all_pairs():
    assert sorted(TET_EDGES) == [(a, b) for a in range(4) for b in range(a + 1, 4)]
