"""Simplifying the exported mesh to at most `export.max_faces` triangles.

Marching tetrahedra on a fine grid gives far more triangles than the shape needs (155 k for a
rippled sphere of radius 0.6 at grid 128, many of them slivers), and the export's UV unwrapping
grows faster than the mesh (docs/benchmarks.md). The mesh is simplified by quadric-error edge
collapses before it is unwrapped (`fast_simplification`, Forstmann's fast quadric simplification,
which refuses collapses that flip a triangle; libigl's QSlim folded 0.5 % of a rippled sphere's
surface over at 155 k -> 100 k faces); the bake then reads the shading normals of the full mesh
into the normal map (`bake_textures(..., detail=...)`), so the lighter mesh shades like the one the
appearance stage was trained on. The pipeline keeps the full mesh where the collapses would change
its topology (`xdreamer.pipeline.assets`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from xdreamer.mesh import Mesh


class SimplifyError(RuntimeError):
    """The simplification library is missing or failed on a mesh."""


@dataclass(frozen=True)
class SimplifyReport:
    """faces: of the mesh given; exported_faces: of the mesh exported; skipped: why the full mesh
    is exported although it has more than max_faces faces (None otherwise)."""

    faces: int
    exported_faces: int
    skipped: str | None = None

    @property
    def simplified(self) -> bool:
        return self.exported_faces < self.faces

    def to_dict(self) -> dict:
        return {**asdict(self), "simplified": self.simplified}


def quadric_simplify(mesh: Mesh, max_faces: int) -> Mesh:
    """mesh: (V, 3) vertices, (F, 3) faces, no uvs -> a mesh of about `max_faces` faces (the
    library stops after its passes even if a few more remain) by quadric edge collapses, on
    mesh.device. Raises SimplifyError if the library is missing or fails."""
    try:
        import fast_simplification

        vertices, faces = fast_simplification.simplify(
            mesh.vertices.detach().cpu().double().numpy(),
            mesh.faces.detach().cpu().numpy().astype(np.int64),
            target_count=max_faces,
        )
    except Exception as error:  # an export at the end of a long run falls back instead of failing
        raise SimplifyError(f"fast_simplification failed: {error}") from error
    return Mesh(
        vertices=torch.as_tensor(np.asarray(vertices), dtype=mesh.vertices.dtype, device=mesh.device),
        faces=torch.as_tensor(np.asarray(faces), dtype=torch.int64, device=mesh.device),
    )


def describe_export(report: dict) -> str:
    """A run's export simplification (`SimplifyReport.to_dict`) for the console: "100,000 of
    154,600 faces exported", the reason when it was skipped, "" when the mesh was small enough."""
    if report.get("simplified"):
        return f"{report['exported_faces']:,} of {report['faces']:,} faces exported"
    if report.get("skipped"):
        return f"all {report['faces']:,} faces kept: {report['skipped']}"
    return ""
