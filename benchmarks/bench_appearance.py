"""Appearance-stage timings: environment prefiltering, PBR shading of one frame (material network
forward + split-sum shading, with and without backward), and texture baking.

Usage: python benchmarks/bench_appearance.py [--device cpu|cuda] [--repeats N] [--bake-sizes 1024 2048]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
import trimesh

from timing import call_seconds, print_table

from xdreamer.appearance.material import MaterialNetwork
from xdreamer.export.bake import bake_textures, unwrap
from xdreamer.mesh import Mesh
from xdreamer.render.camera import orbit_cameras
from xdreamer.render.light import default_environment
from xdreamer.render.raster import Rasterizer
from xdreamer.render.shade import render_pbr


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    times = sorted(call_seconds(fn, device, repeats))
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--bake-sizes", type=int, nargs="+", default=[1024, 2048])
    args = parser.parse_args()
    device = torch.device(args.device)

    sphere = trimesh.creation.icosphere(5, radius=0.8)  # 20k faces, a typical DMTet output size
    mesh = Mesh.from_arrays(sphere.vertices, sphere.faces, device)
    rasterizer = Rasterizer("auto")
    rows = []

    start = time.perf_counter()
    light = default_environment().to(device)
    rows.append(("environment prefilter (128² cube, 6 levels + irradiance)", "-", time.perf_counter() - start))

    material = MaterialNetwork.for_mesh(mesh, encoding="hash")
    camera = orbit_cameras(1, elevation=20).to(device)
    for resolution in args.resolutions:
        def forward():
            with torch.no_grad():
                render_pbr(mesh, camera, resolution, material, light, backend=rasterizer)

        def forward_backward():
            render_pbr(mesh, camera, resolution, material, light, backend=rasterizer)["rgb"].mean().backward()

        rows.append((f"render_pbr forward, 1 view, {mesh.faces.shape[0]} faces", f"{resolution}²", timed(forward, args.repeats, device)))
        rows.append(("render_pbr forward + backward", f"{resolution}²", timed(forward_backward, args.repeats, device)))

    atlas = unwrap(mesh, texture_size=max(args.bake_sizes))
    for size in args.bake_sizes:
        rows.append(("bake_textures (hash material, gutters filled)", f"{size}²", timed(lambda: bake_textures(atlas, material, size, backend=rasterizer), 1, device)))

    print(f"device: {device}, rasterizer backend: {rasterizer.backend_for(device)}, torch threads: {torch.get_num_threads()}\n")
    print_table(
        ["operation", "resolution", "seconds"], ["---", "---", "---"],
        [[name, resolution, f"{seconds:.3f}"] for name, resolution, seconds in rows],
    )


if __name__ == "__main__":
    main()
