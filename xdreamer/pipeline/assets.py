"""The finished asset: UV unwrap, bake, GLB and OBJ + MTL + PNG, the turntable video.

The export folder is replaced as one unit: everything is written into `export.tmpPID/` beside
it, then swapped in (`rundir.replace_folder`), so an interrupted export never leaves textures of
one size beside an OBJ whose UVs belong to another."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from xdreamer.export.bake import bake_textures, unwrap
from xdreamer.export.gltf import write_glb
from xdreamer.export.obj import write_obj
from xdreamer.export.simplify import SimplifyError, SimplifyReport, quadric_simplify
from xdreamer.export.video import write_video
from xdreamer.geometry.cleanup import mesh_pieces
from xdreamer.mesh import Mesh, save_mesh
from xdreamer.render.camera import orbit_cameras
from xdreamer.render.light import EnvironmentLight
from xdreamer.render.raster import Rasterizer
from xdreamer.render.shade import render_textured
from xdreamer.rundir import RunPaths, replace_folder

FORMATS = ("glb", "obj")


def _topology(mesh: Mesh) -> list[tuple[bool, int | None, bool]]:
    """(closed, genus, cavity) of every piece, in a fixed order."""
    pieces = [(p.closed, p.genus, p.cavity) for p in mesh_pieces(mesh)]
    return sorted(pieces, key=lambda t: (t[0], -1 if t[1] is None else t[1], t[2]))


def simplify(mesh: Mesh, max_faces: int) -> tuple[Mesh, SimplifyReport]:
    """The mesh to export: `mesh` simplified to about `max_faces` faces (0: no limit), or `mesh`
    itself when it is small enough, is not a closed oriented manifold, or would change its pieces,
    their genus or winding (collapses can, where marching tetrahedra left thin folds)."""
    faces = int(mesh.faces.shape[0])
    if max_faces <= 0 or faces <= max_faces:
        return mesh, SimplifyReport(faces, faces)
    before = _topology(mesh)
    if not all(closed and genus is not None for closed, genus, _ in before):
        return mesh, SimplifyReport(faces, faces, "the mesh is not a closed, oriented manifold")
    try:
        simplified = quadric_simplify(mesh, max_faces)
    except SimplifyError as error:
        return mesh, SimplifyReport(faces, faces, str(error))
    if _topology(simplified) != before:
        return mesh, SimplifyReport(faces, faces, "simplifying would change the pieces, their genus or winding")
    return simplified, SimplifyReport(faces, int(simplified.faces.shape[0]))


def export_asset(
    paths: RunPaths,
    mesh: Mesh,
    material: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    light: EnvironmentLight,
    rasterizer: Rasterizer,
    formats: list[str],
    texture_size: int,
    max_faces: int,
    turntable_frames: int,
    turntable_resolution: int,
    fps: int,
    background: tuple[float, float, float],
    device: torch.device,
) -> tuple[dict[str, str], SimplifyReport]:
    """Write the asset of `mesh` with `material` into the run's export folder (replaced as one
    unit), `geometry/mesh.ply` (the full mesh) and `turntable.mp4` (the exported one). The asset's
    mesh is `mesh` simplified to at most `max_faces` faces (0: not simplified), its normal map
    baked from the full mesh. Returns ({kind: path} of what was written, the simplification)."""
    exported, simplification = simplify(mesh, max_faces)
    unwrapped = unwrap(exported, texture_size=texture_size)
    detail = mesh if simplification.simplified else None
    with torch.no_grad():
        textures = bake_textures(unwrapped, material, size=texture_size, backend=rasterizer, detail=detail)
    tmp = paths.root / f"export.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    written = {}
    if "glb" in formats:
        write_glb(tmp / "model.glb", unwrapped, textures)
        written["glb"] = str(paths.export / "model.glb")
    if "obj" in formats:
        write_obj(tmp / "model.obj", unwrapped, textures)
        written["obj"] = str(paths.export / "model.obj")
    replace_folder(tmp, paths.export)
    save_mesh(mesh, paths.geometry / "mesh.ply")
    cameras = orbit_cameras(turntable_frames, elevation=15.0)
    frames = []
    with torch.no_grad():
        for i in range(0, len(cameras), 8):
            out = render_textured(
                unwrapped, cameras[i : i + 8].to(device), turntable_resolution, textures, light,
                background=background, backend=rasterizer,
            )
            frames.extend((out["rgb"].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    write_video(frames, paths.turntable, fps=fps)
    written["turntable"] = str(paths.turntable)
    return written, simplification
