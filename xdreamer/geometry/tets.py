"""The tetrahedral grid DMTet deforms: a regular cube lattice, each cube split into 6 tetrahedra.

The split is Kuhn's (Freudenthal's): every tetrahedron of a cube runs from corner (0,0,0) to corner
(1,1,1) along one monotone path of cube edges, one per order of the three axes. Because every
cube is split the same way, the diagonals of shared faces match and the grid is conforming.
"""

from __future__ import annotations

import itertools
import numbers

import numpy as np
import torch

from xdreamer.atomic import atomic_path
from xdreamer.cache import cache_dir

MIN_RESOLUTION = 2
MAX_RESOLUTION = 512


class TetGridError(ValueError):
    """A tetrahedral grid resolution that cannot be built."""


def _kuhn_cube_tets() -> np.ndarray:
    """(6, 4, 3) int corner offsets of the 6 tets of the unit cube, each positively oriented."""
    tets = []
    for order in itertools.permutations(range(3)):
        corner = np.zeros(3, dtype=np.int64)
        path = [corner.copy()]
        for axis in order:
            corner[axis] = 1
            path.append(corner.copy())
        path = np.stack(path)
        if np.linalg.det((path[1:] - path[0]).astype(np.float64)) < 0:
            path[[2, 3]] = path[[3, 2]]  # an odd permutation of the axes flips the orientation
        tets.append(path)
    return np.stack(tets)


def _build_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    n = resolution + 1
    axis = np.arange(n, dtype=np.float64) / resolution - 0.5
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    vertices = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=-1).astype(np.float32)

    cube = np.arange(resolution, dtype=np.int64)
    ci, cj, ck = (a.ravel() for a in np.meshgrid(cube, cube, cube, indexing="ij"))
    base = ci * n * n + cj * n + ck  # index of each cube's (0,0,0) corner
    offsets = _kuhn_cube_tets()  # (6, 4, 3)
    corner_shift = offsets[..., 0] * n * n + offsets[..., 1] * n + offsets[..., 2]  # (6, 4)
    tets = (base[:, None, None] + corner_shift[None]).reshape(-1, 4)
    return vertices, tets


def tetrahedral_grid(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A conforming grid of resolution^3 cubes, 6 tetrahedra each, cached on disk.

    Returns vertices (N, 3) float32 in [-0.5, 0.5]^3 with N = (resolution + 1)^3 (vertex (i, j, k)
    at index i*(r+1)^2 + j*(r+1) + k), and tets (T, 4) int64 with T = 6 * resolution^3, every
    tetrahedron with positive signed volume det(v1 - v0, v2 - v0, v3 - v0) > 0."""
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral):
        raise TetGridError(f"tet grid resolution must be an integer, got {resolution!r}")
    resolution = int(resolution)
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise TetGridError(
            f"tet grid resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}"
        )
    path = cache_dir("tets") / f"kuhn_{resolution}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                return torch.from_numpy(data["vertices"]), torch.from_numpy(data["tets"].astype(np.int64))
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is rebuilt below
    vertices, tets = _build_grid(resolution)
    # int32 halves the cache file; indices stay below 2^31 up to the maximum resolution.
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, vertices=vertices, tets=tets.astype(np.int32))
    return torch.from_numpy(vertices), torch.from_numpy(tets)
