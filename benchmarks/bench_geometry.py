"""Geometry timings: marching tetrahedra, the hash encoding, DMTet mesh extraction.

Usage: python benchmarks/bench_geometry.py [--device cpu|cuda] [--repeats 3]
Prints a markdown table of the best time over the repeats."""

from __future__ import annotations

import argparse

import torch

from timing import call_seconds, print_table

from xdreamer.encoding import HashEncoding
from xdreamer.geometry.dmtet import DMTetGeometry, marching_tetrahedra
from xdreamer.geometry.tets import tetrahedral_grid


def _best_ms(fn, device: torch.device, repeats: int) -> float:
    return min(call_seconds(fn, device, repeats)) * 1000


def _marching_rows(device, repeats):
    rows = []
    for resolution in (64, 128):
        vertices, tets = tetrahedral_grid(resolution)
        vertices, tets = vertices.to(device), tets.to(device)
        base_sdf = vertices.norm(dim=-1) - 0.35

        def forward():
            with torch.no_grad():
                return marching_tetrahedra(vertices, tets, base_sdf)

        def forward_backward():
            sdf = base_sdf.clone().requires_grad_()
            verts, _ = marching_tetrahedra(vertices, tets, sdf)
            verts.square().sum().backward()

        faces = forward()[1].shape[0]
        rows.append(
            (f"marching tets, grid {resolution} (sphere, {faces} faces)",
             _best_ms(forward, device, repeats), _best_ms(forward_backward, device, repeats))
        )
    return rows


def _hash_rows(device, repeats):
    encoding = HashEncoding(backend="torch").to(device)
    rows = []
    for n in (100_000, 300_000):
        x = torch.rand(n, 3, device=device, generator=torch.Generator(device).manual_seed(0))

        def forward():
            with torch.no_grad():
                encoding(x)

        def forward_backward():
            encoding.table.grad = None
            encoding(x).square().sum().backward()

        rows.append((f"hash encoding (16 levels, 2^19), {n // 1000}k points",
                     _best_ms(forward, device, repeats), _best_ms(forward_backward, device, repeats)))
    return rows


def _dmtet_rows(device, repeats):
    rows = []
    for resolution in (64, 128):
        torch.manual_seed(0)
        geometry = DMTetGeometry(grid_resolution=resolution, encoding="hash", hash_backend="torch").to(device)
        with torch.no_grad():
            sdf, _ = geometry.sdf_and_offset()
            geometry.mlp.output_layer.bias[0] -= sdf.median()  # a surface through the grid

        def forward():
            with torch.no_grad():
                geometry()

        def forward_backward():
            geometry.zero_grad(set_to_none=True)
            geometry().vertices.square().sum().backward()

        rows.append((f"DMTet extract (hash + MLP + marching), grid {resolution}",
                     _best_ms(forward, device, repeats), _best_ms(forward_backward, device, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [
        *_marching_rows(device, args.repeats),
        *_hash_rows(device, args.repeats),
        *_dmtet_rows(device, args.repeats),
    ]
    print(f"device: {device}, torch threads: {torch.get_num_threads()}\n")
    print_table(
        ["operation", "forward ms", "forward + backward ms"], ["---", "---:", "---:"],
        [[name, f"{fwd:.1f}", f"{fwd_bwd:.1f}"] for name, fwd, fwd_bwd in rows],
    )


if __name__ == "__main__":
    main()
