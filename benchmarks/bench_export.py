"""The export of a fine mesh with and without its simplification (`export.max_faces`): simplify
(quadric edge collapses, topology checked), UV-unwrap (xatlas), bake (the material on every
texel; with the full mesh as detail when simplified), on the marching-tets surface of a rippled
sphere over the pipeline's grid (scale 2.1), and how far the exported surface lies from the full
one.

    .venv/bin/python benchmarks/bench_export.py --resolutions 64,128 --max-faces 0,100000 --texture-size 1024
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_unwrap import rippled_sphere
from timing import print_table

from xdreamer.appearance.material import MaterialNetwork
from xdreamer.export.bake import NearestSurface, bake_textures, unwrap
from xdreamer.pipeline.assets import simplify


def max_distance(full, exported) -> float:
    """Largest distance from a vertex of the full mesh to the exported surface."""
    nearest, _ = NearestSurface(exported)(full.vertices)
    return float((nearest - full.vertices).norm(dim=-1).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="64,128")
    parser.add_argument("--max-faces", default="0,100000")
    parser.add_argument("--texture-size", type=int, default=1024)
    args = parser.parse_args()
    rows = []
    for resolution in [int(r) for r in args.resolutions.split(",")]:
        mesh = rippled_sphere(resolution, grid_scale=2.1)  # closed, in the pipeline's grid
        torch.manual_seed(0)
        material = MaterialNetwork.for_mesh(mesh, encoding="frequency").eval()
        for max_faces in [int(m) for m in args.max_faces.split(",")]:
            seconds = [time.perf_counter()]
            exported, report = simplify(mesh, max_faces)
            seconds.append(time.perf_counter())
            atlas = unwrap(exported, args.texture_size)
            seconds.append(time.perf_counter())
            with torch.no_grad():
                bake_textures(atlas, material, args.texture_size, backend="torch", detail=mesh if report.simplified else None)
            seconds.append(time.perf_counter())
            steps = np.diff(seconds)
            rows.append([
                f"grid {resolution}", f"{report.faces:,}", str(max_faces), f"{report.exported_faces:,}",
                *(f"{s:.1f}" for s in steps), f"{sum(steps):.1f}", f"{max_distance(mesh, exported):.1e}",
            ])
    print(f"torch threads: {torch.get_num_threads()}, texture {args.texture_size}²\n")
    print_table(
        ["mesh", "faces", "export.max_faces", "exported faces", "simplify s", "unwrap s", "bake s", "total s",
         "max distance to the full surface"],
        ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
        rows,
    )


if __name__ == "__main__":
    main()
