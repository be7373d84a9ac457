"""The Kuhn tetrahedral grid: valid, positively oriented, conforming, cached."""

import numpy as np
import pytest
import torch

from xdreamer.geometry.tets import TetGridError, tetrahedral_grid


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path))


def _signed_volumes(vertices, tets):
    v = vertices.double()[tets]
    return torch.linalg.det(v[:, 1:] - v[:, :1]) / 6


@pytest.mark.parametrize("resolution", [2, 5, 16])
def test_counts_bounds_and_volumes(resolution):
    vertices, tets = tetrahedral_grid(resolution)
    assert vertices.dtype == torch.float32 and tets.dtype == torch.int64
    assert vertices.shape == ((resolution + 1) ** 3, 3)
    assert tets.shape == (6 * resolution**3, 4)
    assert vertices.min().item() == -0.5 and vertices.max().item() == 0.5
    volumes = _signed_volumes(vertices, tets)
    # every tet is 1/6 of a cube of side 1/r, positively oriented, and together they fill the box
    expected = 1.0 / (6 * resolution**3)
    assert torch.allclose(volumes, torch.full_like(volumes, expected), rtol=1e-5)
    assert volumes.sum().item() == pytest.approx(1.0, rel=1e-9)
    assert len(np.unique(np.sort(tets.numpy(), axis=1), axis=0)) == tets.shape[0]


def test_conforming_faces():
    resolution = 6
    vertices, tets = tetrahedral_grid(resolution)
    local_faces = [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    faces = np.sort(tets.numpy()[:, local_faces].reshape(-1, 3), axis=1)
    unique, counts = np.unique(faces, axis=0, return_counts=True)
    assert counts.max() == 2
    boundary = unique[counts == 1]
    # a face used once must lie on the box: all three vertices share one coordinate at +-0.5
    corners = vertices.numpy()[boundary]  # (B, 3, 3)
    on_plane = [
        (np.abs(corners[:, :, axis] - side) < 1e-7).all(axis=1) for axis in range(3) for side in (-0.5, 0.5)
    ]
    assert np.any(on_plane, axis=0).all()
    # the box's 6 sides, each r^2 squares of 2 triangles
    assert len(boundary) == 6 * resolution**2 * 2


def test_cache_roundtrip_is_identical(tmp_path):
    first = tetrahedral_grid(4)
    assert (tmp_path / "tets" / "kuhn_4.npz").is_file()
    second = tetrahedral_grid(4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert second[1].dtype == torch.int64


def test_damaged_cache_is_rebuilt(tmp_path):
    reference = tetrahedral_grid(3)
    (tmp_path / "tets" / "kuhn_3.npz").write_bytes(b"not an npz")
    rebuilt = tetrahedral_grid(3)
    assert torch.equal(reference[1], rebuilt[1])


@pytest.mark.parametrize("bad", [1, 0, -4, 513, 3.5, "64", True])
def test_bad_resolution(bad):
    with pytest.raises(TetGridError, match="resolution"):
        tetrahedral_grid(bad)
    assert issubclass(TetGridError, ValueError)
