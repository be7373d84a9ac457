"""Wavefront OBJ + MTL + PNG textures (PBR extension of MTL, as Blender's importer reads it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xdreamer.atomic import write_bytes, write_text
from xdreamer.export.bake import encode_png, texture_images
from xdreamer.mesh import Mesh
from xdreamer.render.shade import welded_vertex_normals


def _shared_positions(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weld vertices (V, 3) at exactly the same position (the copies `unwrap` makes along UV
    seams). Returns the first vertex at each distinct position (P,), in order of appearance, and
    the position index of every vertex (V,)."""
    _, first, inverse = np.unique(vertices, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return first[order], rank[inverse.reshape(-1)]


def write_obj(path: str | Path, mesh: Mesh, maps: dict[str, torch.Tensor]) -> list[Path]:
    """Write `path` (.obj), `<stem>.mtl` and `<stem>_{basecolor,roughness,metallic,normal}.png`
    beside it, each atomically. mesh needs uvs (glTF orientation; OBJ's vt is written as
    (u, 1 - v)); maps are `bake_textures`' output. Returns the written paths.

    OBJ indexes positions and uvs separately, so each distinct position is written once and the
    seam copies of a vertex differ only in their vt: a closed mesh loads back watertight (GLB
    needs one index per vertex and keeps the split)."""
    path = Path(path)
    if mesh.uvs is None:
        raise ValueError("write_obj needs a mesh with uvs; unwrap and bake it first")
    stem = path.stem
    images = texture_images(maps)
    files = {
        "map_Kd": (f"{stem}_basecolor.png", images["base_color"]),
        "map_Pr": (f"{stem}_roughness.png", images["roughness"]),
        "map_Pm": (f"{stem}_metallic.png", images["metallic"]),
        "norm": (f"{stem}_normal.png", images["normal"]),
    }
    written = []
    for name, image in files.values():
        write_bytes(path.with_name(name), encode_png(image))
        written.append(path.with_name(name))

    mtl = [
        "# xdreamer PBR material",
        "newmtl material_0",
        "Ka 0.000000 0.000000 0.000000",
        "Kd 1.000000 1.000000 1.000000",
        "Ks 0.000000 0.000000 0.000000",
        "Ns 10.000000",
        "illum 2",
        f"map_Kd {files['map_Kd'][0]}",
        f"map_Pr {files['map_Pr'][0]}",
        f"map_Pm {files['map_Pm'][0]}",
        f"norm {files['norm'][0]}",
        # Older importers (Blender's included) take a tangent-space normal map from map_Bump.
        f"map_Bump -bm 1.000000 {files['norm'][0]}",
        "",
    ]
    write_text(path.with_suffix(".mtl"), "\n".join(mtl))
    written.append(path.with_suffix(".mtl"))

    vertices = mesh.vertices.detach().cpu().numpy()
    representative, position = _shared_positions(vertices)
    normals = welded_vertex_normals(mesh.detach()).cpu().numpy()  # equal on every copy of a position
    uvs = mesh.uvs.detach().cpu().numpy().copy()
    uvs[:, 1] = 1 - uvs[:, 1]  # OBJ's v points up the image
    faces = mesh.faces.detach().cpu().numpy()
    # v/vt/vn: the position and its normal are shared by the seam copies, the uv is each copy's own.
    corner = np.stack([position[faces] + 1, faces + 1, position[faces] + 1], axis=-1)
    lines = [f"mtllib {path.with_suffix('.mtl').name}", "o mesh"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices[representative]]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uvs]
    lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in normals[representative]]
    lines += ["usemtl material_0"]
    lines += ["f " + " ".join(f"{a}/{b}/{c}" for a, b, c in face) for face in corner]
    write_text(path, "\n".join(lines) + "\n")
    written.append(path)
    return written
