"""UV unwrapping time (xatlas, as `xdreamer.export.bake.unwrap` calls it) against mesh size: the
marching-tets surface of a rippled sphere (the kind of surface SDS leaves) over the project's grid.

    .venv/bin/python benchmarks/bench_unwrap.py --resolutions 32,64,128 --texture-size 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import print_table

from xdreamer.export.bake import unwrap
from xdreamer.geometry.dmtet import marching_tetrahedra
from xdreamer.geometry.tets import tetrahedral_grid
from xdreamer.mesh import Mesh


def rippled_sphere(resolution: int, grid_scale: float = 1.0) -> Mesh:
    """The surface of a sphere of radius 0.6 with ripples of 0.05 (V, 3) / (F, 3) over the grid
    scaled to [-grid_scale / 2, grid_scale / 2]^3. At the default scale of 1 the grid's box cuts
    the sphere open (the table in docs/benchmarks.md was measured on that); at the pipeline's 2.1
    (`geometry.grid_scale`) it is closed."""
    vertices, tets = tetrahedral_grid(resolution)
    vertices = vertices * grid_scale
    x, y, z = vertices.unbind(-1)
    sdf = vertices.norm(dim=-1) - 0.6 - 0.05 * torch.sin(9 * x) * torch.sin(7 * y) * torch.sin(8 * z)
    with torch.no_grad():
        verts, faces = marching_tetrahedra(vertices, tets, sdf)
    return Mesh(vertices=verts, faces=faces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="32,64,128")
    parser.add_argument("--texture-size", type=int, default=1024)
    args = parser.parse_args()
    rows = []
    for resolution in [int(r) for r in args.resolutions.split(",")]:
        mesh = rippled_sphere(resolution)
        start = time.perf_counter()
        unwrapped = unwrap(mesh, args.texture_size)
        seconds = time.perf_counter() - start
        seams = unwrapped.vertices.shape[0] - mesh.vertices.shape[0]
        rows.append([f"grid {resolution}", f"{mesh.faces.shape[0]:,}", f"{seams:,}", f"{seconds:.1f}"])
    print_table(["mesh", "faces", "vertices added at seams", "unwrap s"], ["---", "---:", "---:", "---:"], rows)


if __name__ == "__main__":
    main()
