"""Geometry timings: marching tetrahedra, the hash encoding, DMTet mesh extraction, and the toy
preset's per-step geometry work (normal consistency, the normal + mask pass), each beside the
way it was done before, so that one run compares them.

Usage: python benchmarks/bench_geometry.py [--device cpu|cuda] [--repeats 3]
Prints a markdown table of the best time over the repeats."""

from __future__ import annotations

import argparse

import torch

from timing import call_seconds, print_table

from xdreamer.encoding import HashEncoding
from xdreamer.geometry.dmtet import DMTetGeometry, marching_tetrahedra
from xdreamer.geometry.regularizers import normal_consistency
from xdreamer.geometry.tets import tetrahedral_grid
from xdreamer.mesh import Mesh
from xdreamer.render.camera import orbit_cameras
from xdreamer.render.passes import clip_positions, render_geometry
from xdreamer.render.raster import antialias, edge_neighbors, interpolate, rasterize


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


def _toy_step_rows(device, repeats):
    """A sphere at the toy preset's grid (32) and render size (128², 4 views)."""
    vertices, tets = tetrahedral_grid(32)
    verts, faces = marching_tetrahedra(vertices.to(device), tets.to(device), vertices.to(device).norm(dim=-1) - 0.5)
    cameras = orbit_cameras(4).to(device)

    def consistency():
        mesh = Mesh(verts.clone().requires_grad_(), faces)
        normal_consistency(mesh).backward()

    def consistency_before():  # face pairs from torch.unique over the (E, 2) edges
        edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
        _, inverse, counts = torch.unique(edges, dim=0, return_inverse=True, return_counts=True)
        shared = counts[inverse] == 2
        pairs = torch.arange(faces.shape[0], device=device).repeat(3)[shared][torch.argsort(inverse[shared], stable=True)]
        normals = Mesh(verts.clone().requires_grad_(), faces).face_normals()[pairs.view(-1, 2)]
        (1.0 - (normals[:, 0] * normals[:, 1]).sum(-1)).mean().backward()

    def geometry_pass():
        out = render_geometry(Mesh(verts.clone().requires_grad_(), faces), cameras, 128, "torch")
        (out["normal"].sum() + out["mask"].sum()).backward()

    def geometry_pass_before():  # one antialias call per image: the silhouette search twice
        mesh = Mesh(verts.clone().requires_grad_(), faces)
        pos = clip_positions(mesh.vertices, cameras, (128, 128))
        rast = rasterize(pos, faces, (128, 128), "torch")
        neighbors = edge_neighbors(faces)
        normal = interpolate(mesh.vertex_normals(), rast, faces, "torch")
        normal = antialias(normal, rast, pos, faces, "torch", neighbors)
        mask = antialias((rast[..., 3:] > 0).to(pos.dtype), rast, pos, faces, "torch", neighbors)
        (normal.sum() + mask.sum()).backward()

    label = f"({faces.shape[0]} faces)"
    return [
        (f"normal consistency {label}", None, _best_ms(consistency, device, repeats)),
        (f"normal consistency, torch.unique over pairs (before) {label}", None, _best_ms(consistency_before, device, repeats)),
        (f"geometry pass, 4 views at 128² {label}", None, _best_ms(geometry_pass, device, repeats)),
        (f"geometry pass, antialias per image (before) {label}", None, _best_ms(geometry_pass_before, device, repeats)),
    ]


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
        *_toy_step_rows(device, args.repeats),
    ]
    print(f"device: {device}, torch threads: {torch.get_num_threads()}\n")
    print_table(
        ["operation", "forward ms", "forward + backward ms"], ["---", "---:", "---:"],
        [[name, "-" if fwd is None else f"{fwd:.1f}", f"{fwd_bwd:.1f}"] for name, fwd, fwd_bwd in rows],
    )


if __name__ == "__main__":
    main()
