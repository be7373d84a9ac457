"""Simplifying the exported mesh: at most `export.max_faces` triangles, the same topology.

Marching tetrahedra on a fine grid gives far more triangles than the shape needs (155 k for a
rippled sphere of radius 0.6 at grid 128, many of them slivers), and the export's UV unwrapping
grows faster than the mesh (docs/benchmarks.md). The mesh is simplified by quadric-error edge
collapses before it is unwrapped (`fast_simplification`, Forstmann's fast quadric simplification,
which refuses collapses that flip a triangle; libigl's QSlim folded 0.5 % of a rippled sphere's
surface over at 155 k -> 100 k faces); the bake then reads the shading normals of the full mesh
into the normal map (`bake_textures(..., detail=...)`), so the lighter mesh shades like the one the
appearance stage was trained on.

Simplification is skipped (the full mesh exported) when the mesh is not a closed, oriented
2-manifold or when the collapses would change the pieces or their genus (they can, where marching
tetrahedra left thin folds); `SimplifyReport.skipped` says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from xdreamer.geometry.cleanup import mesh_pieces
from xdreamer.mesh import Mesh


@dataclass(frozen=True)
class SimplifyReport:
    """faces: of the mesh given; exported_faces: of the mesh returned; skipped: why the full mesh
    is returned although it has more than max_faces faces (None otherwise)."""

    faces: int
    exported_faces: int
    skipped: str | None = None

    @property
    def simplified(self) -> bool:
        return self.exported_faces < self.faces

    def to_dict(self) -> dict:
        return {**asdict(self), "simplified": self.simplified}


def _topology(mesh: Mesh) -> list[tuple[bool, int | None]]:
    """(closed, genus) of every piece, in a fixed order."""
    return sorted(((p.closed, p.genus) for p in mesh_pieces(mesh)), key=lambda item: (item[0], -1 if item[1] is None else item[1]))


def simplify(mesh: Mesh, max_faces: int) -> tuple[Mesh, SimplifyReport]:
    """At most `max_faces` faces by quadric edge collapses (0: no limit). mesh: (V, 3) vertices, (F, 3)
    faces, no uvs (it is simplified before unwrapping). Returns the mesh to export (the input
    itself when it is small enough or cannot be simplified) and what was done."""
    faces = int(mesh.faces.shape[0])
    if max_faces <= 0 or faces <= max_faces:
        return mesh, SimplifyReport(faces, faces)
    import fast_simplification

    before = _topology(mesh)
    if not all(closed and genus is not None for closed, genus in before):
        return mesh, SimplifyReport(faces, faces, "the mesh is not a closed, oriented manifold")
    vertices = mesh.vertices.detach().cpu().double().numpy()
    indices = mesh.faces.detach().cpu().numpy().astype(np.int64)
    new_vertices, new_faces = fast_simplification.simplify(vertices, indices, target_count=max_faces)
    simplified = Mesh(
        vertices=torch.as_tensor(np.asarray(new_vertices), dtype=mesh.vertices.dtype, device=mesh.device),
        faces=torch.as_tensor(np.asarray(new_faces), dtype=torch.int64, device=mesh.device),
    )
    if _topology(simplified) != before:
        return mesh, SimplifyReport(faces, faces, "simplifying would change the pieces or their genus")
    return simplified, SimplifyReport(faces, int(simplified.faces.shape[0]))


def describe_export(report: dict) -> str:
    """A run's export simplification (`SimplifyReport.to_dict`) for the console: "100,000 of
    154,600 faces exported", the reason when it was skipped, "" when the mesh was small enough."""
    if report.get("simplified"):
        return f"{report['exported_faces']:,} of {report['faces']:,} faces exported"
    if report.get("skipped"):
        return f"all {report['faces']:,} faces exported: {report['skipped']}"
    return ""
