"""The triangle mesh shared by every stage: geometry makes it, rendering draws it, export writes it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch


class MeshError(ValueError):
    """A mesh file that cannot be used: missing, unreadable or empty."""


@dataclass
class Mesh:
    """vertices: (V, 3) float32; faces: (F, 3) int64, counter-clockwise seen from outside;
    uvs: optional (V, 2) float32 in [0, 1], one per vertex (seams duplicate vertices)."""

    vertices: torch.Tensor
    faces: torch.Tensor
    uvs: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    def to(self, device: torch.device | str) -> Mesh:
        return replace(
            self,
            vertices=self.vertices.to(device),
            faces=self.faces.to(device),
            uvs=None if self.uvs is None else self.uvs.to(device),
        )

    def detach(self) -> Mesh:
        return replace(
            self,
            vertices=self.vertices.detach(),
            uvs=None if self.uvs is None else self.uvs.detach(),
        )

    def face_normals(self) -> torch.Tensor:
        """(F, 3) unit normals."""
        v0, v1, v2 = (self.vertices[self.faces[:, i]] for i in range(3))
        return torch.nn.functional.normalize(torch.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)

    def vertex_normals(self) -> torch.Tensor:
        """(V, 3) unit normals, area-weighted average of the adjacent faces."""
        v0, v1, v2 = (self.vertices[self.faces[:, i]] for i in range(3))
        weighted = torch.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 * area
        normals = torch.zeros_like(self.vertices)
        for i in range(3):
            normals = normals.index_add(0, self.faces[:, i], weighted)
        fallback = torch.tensor([0.0, 0.0, 1.0], device=normals.device, dtype=normals.dtype)
        degenerate = normals.norm(dim=-1, keepdim=True) < 1e-20
        normals = torch.where(degenerate, fallback, normals)
        return torch.nn.functional.normalize(normals, dim=-1)

    def area(self) -> torch.Tensor:
        v0, v1, v2 = (self.vertices[self.faces[:, i]] for i in range(3))
        return 0.5 * torch.cross(v1 - v0, v2 - v0, dim=-1).norm(dim=-1).sum()

    def volume(self) -> torch.Tensor:
        """Signed volume enclosed (positive for outward-facing triangles of a closed mesh)."""
        v0, v1, v2 = (self.vertices[self.faces[:, i]] for i in range(3))
        return (v0 * torch.cross(v1, v2, dim=-1)).sum() / 6.0

    def to_trimesh(self):
        import trimesh

        return trimesh.Trimesh(
            vertices=self.vertices.detach().cpu().numpy(),
            faces=self.faces.detach().cpu().numpy(),
            process=False,
        )

    @staticmethod
    def from_arrays(vertices, faces, device: torch.device | str = "cpu") -> Mesh:
        return Mesh(
            vertices=torch.as_tensor(np.asarray(vertices), dtype=torch.float32, device=device),
            faces=torch.as_tensor(np.asarray(faces), dtype=torch.int64, device=device),
        )


def undirected_edge_keys(edges: torch.Tensor, vertex_count: int) -> torch.Tensor:
    """(E, 2) vertex pairs -> (E,) one int64 per undirected edge, ordered as the sorted pairs are
    lexicographically: a 1-D sort or unique over these is many times faster on a CPU than
    `torch.unique(..., dim=0)` over the pairs."""
    ends = edges.sort(dim=1).values
    return ends[:, 0] * vertex_count + ends[:, 1]


def load_mesh(path: str | Path, device: torch.device | str = "cpu") -> Mesh:
    """Read OBJ/PLY/STL/GLB/GLTF/OFF as one triangle mesh (scenes are flattened).

    Raises MeshError with a one-line reason for a missing, unreadable or empty file."""
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise MeshError(f"mesh file not found: {path}")
    try:
        loaded = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for bad files
        raise MeshError(f"cannot read mesh {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0 or len(loaded.vertices) == 0:
        raise MeshError(f"mesh {path} has no triangles")
    vertices = np.asarray(loaded.vertices, dtype=np.float32)
    if not np.isfinite(vertices).all():
        raise MeshError(f"mesh {path} has non-finite vertex coordinates")
    return Mesh.from_arrays(vertices, np.asarray(loaded.faces, dtype=np.int64), device)


def save_mesh(mesh: Mesh, path: str | Path) -> None:
    """Write an untextured mesh as OBJ/PLY/GLB/STL (by suffix), atomically."""
    from xdreamer.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        mesh.to_trimesh().export(str(tmp), file_type=path.suffix.lstrip(".").lower())
