"""Rasterizer speed: rasterize + interpolate (+ antialias), forward + backward, pure-PyTorch backend.

A unit sphere seen from radius 3 (it fills most of the frame), one view; prints a markdown table.
Usage: python benchmarks/bench_raster.py [--backend torch|nvdiffrast|auto] [--device cpu|cuda] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import trimesh

from xdreamer.render.camera import orbit_cameras
from xdreamer.render.passes import clip_positions
from xdreamer.render.raster import Rasterizer, edge_neighbors


def sphere(faces_wanted: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    count = max(int(round((faces_wanted / 4) ** 0.5)), 4)  # a uv sphere has about 4 count^2 faces
    mesh = trimesh.creation.uv_sphere(radius=1.0, count=[count, count])
    return (
        torch.tensor(mesh.vertices, dtype=torch.float32, device=device),
        torch.tensor(mesh.faces, dtype=torch.int64, device=device),
    )


def run(rasterizer, vertices, faces, size, with_antialias, device) -> float:
    cameras = orbit_cameras(1).to(device)
    neighbors = edge_neighbors(faces) if with_antialias else None
    variable = vertices.clone().requires_grad_(True)
    pos = clip_positions(variable, cameras, (size, size))
    rast = rasterizer.rasterize(pos, faces, size)
    image = rasterizer.interpolate(variable, rast, faces)
    if with_antialias:
        image = rasterizer.antialias(image, rast, pos, faces, neighbors)
    image.square().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return float(variable.grad.abs().sum())


def timed(repeats: int, *args) -> float:
    run(*args)  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rasterizer = Rasterizer(args.backend)
    print(f"backend {rasterizer.backend_for(device)}, device {device}, torch threads {torch.get_num_threads()}, best of {args.repeats}\n")
    print("| triangles | resolution | rasterize + interpolate, fwd + bwd (ms) | + antialias (ms) |")
    print("|---:|---:|---:|---:|")
    for faces_wanted, size in [(5_000, 128), (5_000, 256), (5_000, 512), (20_000, 256), (50_000, 128), (50_000, 256), (50_000, 512)]:
        vertices, faces = sphere(faces_wanted, device)
        plain = timed(args.repeats, rasterizer, vertices, faces, size, False, device)
        full = timed(args.repeats, rasterizer, vertices, faces, size, True, device)
        target = " (target <= 40 ms)" if (faces_wanted, size) == (20_000, 256) else ""
        print(f"| {faces.shape[0]} | {size}x{size} | {plain:.1f}{target} | {full:.1f} |")


if __name__ == "__main__":
    main()
