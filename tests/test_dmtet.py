"""DMTet's vertex offset bound: the authors' default, its size in world units and cells, and which
bounds can invert tetrahedra of the Kuhn grid."""

import itertools

import pytest
import torch

from xdreamer.geometry.dmtet import DMTetGeometry, GeometryError
from xdreamer.geometry.tets import _kuhn_cube_tets


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _geometry(**kwargs) -> DMTetGeometry:
    torch.manual_seed(0)
    return DMTetGeometry(grid_resolution=16, grid_scale=2.1, encoding="frequency", **kwargs)


def _corner_offsets(n: int, seed: int) -> torch.Tensor:
    """Raw offsets that saturate tanh: every vertex at a random corner of its box."""
    signs = torch.randint(0, 2, (n, 3), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs.double() * 50.0


def _signed_volumes(vertices: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    corners = vertices[tets]  # (T, 4, 3)
    return torch.linalg.det(corners[:, 1:] - corners[:, :1])


def test_default_bound_is_the_authors_one_over_resolution_world_units():
    geometry = _geometry().double()
    assert geometry.max_offset == 1 / 16  # world units: 1 / grid_scale = 0.476 of a 2.1 / 16 cell
    rest = geometry.grid_vertices * 2.1
    offset = _corner_offsets(rest.shape[0], seed=0)
    moved = geometry.deformed_vertices(offset) - rest
    assert torch.allclose(moved.abs(), torch.full_like(moved, 1 / 16), rtol=0, atol=1e-12)
    assert torch.equal(moved.sign(), offset.sign())
    cell = 2.1 / 16
    assert moved.abs().max().item() / cell == pytest.approx(1 / 2.1, rel=1e-9)
    half = geometry.deformed_vertices(torch.full_like(offset, 0.5)) - rest
    assert torch.allclose(half, torch.full_like(half, torch.tanh(torch.tensor(0.5)).item() / 16), atol=1e-12)
    assert _geometry(max_offset=0.01).max_offset == 0.01
    with pytest.raises(GeometryError, match="max_offset"):
        _geometry(max_offset=0.0)


def _worst_kuhn_volume(bound_cells: float) -> float:
    """The smallest signed volume any Kuhn tetrahedron of a unit cube reaches when each vertex
    moves at most `bound_cells` per axis. The volume is affine in each vertex's position, so the
    minimum over the boxes is at their corners: 8^4 cases per tetrahedron, all enumerated."""
    tets = torch.from_numpy(_kuhn_cube_tets()).double()  # (6, 4, 3), unit volume 1/6 each
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=torch.float64)
    cases = torch.tensor(list(itertools.product(range(8), repeat=4)))
    moved = tets[:, None] + bound_cells * corners[cases][None]  # (6, 4096, 4, 3)
    return torch.linalg.det(moved[..., 1:, :] - moved[..., :1, :]).min().item()


def test_a_sixth_of_a_cell_is_the_largest_bound_that_never_inverts():
    assert _worst_kuhn_volume(0.0) == pytest.approx(1.0)
    assert _worst_kuhn_volume(1 / 6 - 1e-6) > 0
    assert _worst_kuhn_volume(1 / 6 + 1e-3) < 0
    safe = _geometry(max_offset=2.1 / (6 * 16) * (1 - 1e-6)).double()
    for seed in range(3):
        volumes = _signed_volumes(safe.deformed_vertices(_corner_offsets(safe.grid_vertices.shape[0], seed)), safe.tets)
        assert volumes.min() > 0


def test_the_authors_bound_inverts_fewer_tetrahedra_than_a_full_cell():
    authors = _geometry().double()
    full_cell = _geometry(max_offset=2.1 / 16).double()  # the bound before: one cell
    assert _signed_volumes(authors.deformed_vertices(torch.zeros(authors.grid_vertices.shape[0], 3, dtype=torch.float64)), authors.tets).min() > 0
    fractions = {}
    for name, geometry in (("authors", authors), ("full_cell", full_cell)):
        offset = _corner_offsets(geometry.grid_vertices.shape[0], seed=4)
        volumes = _signed_volumes(geometry.deformed_vertices(offset), geometry.tets)
        fractions[name] = (volumes <= 0).double().mean().item()
    assert 0.10 < fractions["authors"] < 0.17  # 13.4%, as the class docstring says
    assert fractions["full_cell"] > 0.40  # 45.9%


class _SphereField(DMTetGeometry):
    """A DMTet geometry whose network is the exact SDF of a sphere of `radius` world units (no
    offsets), to test what the grid makes of a shape larger than the grid."""

    def __init__(self, radius: float, **kwargs):
        super().__init__(grid_resolution=16, grid_scale=2.1, encoding="frequency", **kwargs)
        self.radius = radius

    def _network(self, grid_points: torch.Tensor) -> torch.Tensor:
        sdf = (grid_points * self.grid_scale).norm(dim=-1, keepdim=True) - self.radius
        return torch.cat([sdf, torch.zeros_like(grid_points)], dim=-1)


def test_bound_radius_closes_a_shape_that_outgrows_the_grid():
    from xdreamer.geometry.cleanup import mesh_pieces

    cell = 2.1 / 16
    # A sphere of radius 1.3 pokes out of the grid's faces (half-width 1.05) but not its corners
    # (1.82): the grid cuts it into an open surface.
    free = mesh_pieces(_SphereField(1.3)())
    assert len(free) == 1 and not free[0].closed and free[0].genus is None
    # Bounded at 0.8 it is the intersection with that ball, a sphere of radius 0.8: one closed
    # piece of genus 0 whose vertices lie on it up to the interpolation along the grid's edges
    # (|x| is not linear along an edge; at most cell^2 / (2 r) off).
    bounded = _SphereField(1.3, bound_radius=0.8)
    mesh = bounded()
    # Carving and the initial fit read the SDF at any point through sdf_at: bounded the same way.
    vertices = bounded.grid_vertices * 2.1
    assert torch.allclose(bounded.sdf_at(vertices), bounded.sdf_and_offset()[0], atol=1e-6)
    assert torch.allclose(bounded.sdf_and_offset()[0], vertices.norm(dim=-1) - 0.8, atol=1e-6)
    pieces = mesh_pieces(mesh)
    assert len(pieces) == 1 and pieces[0].closed and pieces[0].genus == 0
    radii = mesh.vertices.norm(dim=-1)
    assert (radii - 0.8).abs().max().item() < cell**2 / (2 * 0.8)
    # A shape inside the ball is left exactly as it is.
    inner, inner_bounded = _SphereField(0.6)(), _SphereField(0.6, bound_radius=0.8)()
    assert torch.equal(inner.vertices, inner_bounded.vertices) and torch.equal(inner.faces, inner_bounded.faces)
    with pytest.raises(GeometryError, match="bound_radius"):
        _geometry(bound_radius=-1.0)
