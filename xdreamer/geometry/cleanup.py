"""Mesh topology and clean-up: the connected pieces of a mesh, the genus of each closed piece, and
the removal of small loose pieces (the floaters marching tetrahedra leaves beside a shape) and of
cavities (closed bubbles of empty space inside the solid).

Topology is read on positions: vertices at exactly the same position count as one (a UV-unwrapped
mesh duplicates vertices along its seams; those copies are one point of the surface). Two faces
are in the same piece when they share a vertex.

A piece is `closed` when every edge is shared by exactly two faces. Its `genus` is given only when
it is also a 2-manifold surface that can be oriented: the two faces at each edge run through it in
opposite directions (consistent outward winding) and the faces around every vertex form a single
fan. Then V - E + F = 2 - 2g. Open pieces (with a boundary) and non-manifold or inconsistently
wound ones have no well-defined genus here: `genus` is None.

A closed piece is a `cavity` when its faces wind inward (negative signed volume): marching
tetrahedra winds every face with the solid on its inner side, so an inward-wound closed piece is
the wall of a pocket of empty space enclosed by the solid. It cannot be seen from outside; it only
adds faces and pieces (the toy preset's cubes grow one in about one run in four: 220-260 faces,
volume 0.003-0.004 inside a 0.6-volume cube). Removing it fills the pocket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xdreamer.mesh import Mesh

# Loose pieces smaller than this fraction of the largest piece's surface area are dropped. The
# floaters of the toy preset's 32-grid DMTet (24-72 faces each; 9 of them in three runs: 4 beside
# a red cube, 5 beside a yellow torus, none on a green sphere) measured 0.006-0.77 % of the main
# piece's area: 2 % keeps a margin of 2.6x above the largest, and a detached part small enough
# to be dropped is under 14 % (sqrt(0.02)) of the main piece's linear size. Measured in area, not
# faces, so that it does not depend on how finely a piece is triangulated; threestudio's clean-up
# of DMTet meshes drops pieces under 1 % of the largest piece's face count.
MIN_AREA_FRACTION = 0.02


class CleanupError(ValueError):
    """A clean-up setting out of range."""


@dataclass(frozen=True)
class Piece:
    """One connected piece. faces: (k,) int64 indices into the mesh's faces; area: surface area;
    volume: enclosed volume (absolute signed volume; None for an open piece, where it has no
    meaning); closed: every edge shared by exactly two faces; genus: see the module docstring;
    cavity: a closed piece wound inward, the wall of an enclosed pocket (module docstring)."""

    faces: np.ndarray
    area: float
    volume: float | None
    closed: bool
    genus: int | None
    cavity: bool = False

    def summary(self) -> dict:
        """The piece as report.json records it."""
        return {
            "faces": int(self.faces.shape[0]),
            "area": self.area,
            "volume": self.volume,
            "closed": self.closed,
            "genus": self.genus,
            "cavity": self.cavity,
        }


def _welded_faces(mesh: Mesh) -> np.ndarray:
    """(F, 3) faces indexing unique positions instead of vertices."""
    vertices = mesh.vertices.detach().cpu().numpy()
    _, inverse = np.unique(vertices, axis=0, return_inverse=True)
    return inverse.reshape(-1)[mesh.faces.detach().cpu().numpy()]


def _connected_labels(edges: np.ndarray, count: int) -> np.ndarray:
    """(count,) component label of each node of the undirected graph with `edges` (E, 2)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(edges.shape[0], dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def _genus(faces: np.ndarray) -> tuple[bool, int | None]:
    """(closed, genus) of one connected piece given as (k, 3) welded faces."""
    start = faces.reshape(-1)  # half-edge h = 3 i + j runs from corner h ...
    following = 3 * (np.arange(start.shape[0]) // 3) + (np.arange(start.shape[0]) + 1) % 3
    end = start[following]  # ... to the next corner of face i
    undirected = np.sort(np.stack([start, end], -1), axis=-1)
    _, edge, counts = np.unique(undirected, axis=0, return_inverse=True, return_counts=True)
    closed = bool((counts == 2).all())
    oriented = np.unique(np.stack([start, end], -1), axis=0).shape[0] == start.shape[0]
    if not (closed and oriented):
        return closed, None
    # Each edge's two half-edges a->b and b->a join the corners at a and the corners at b; the
    # corners around a vertex then form one connected fan per sheet through that vertex.
    order = np.argsort(edge.reshape(-1), kind="stable")
    first, second = order[0::2], order[1::2]
    links = np.concatenate([np.stack([first, following[second]], -1), np.stack([following[first], second], -1)])
    fans = np.unique(_connected_labels(links, start.shape[0])).shape[0]
    vertices = np.unique(start).shape[0]
    if fans != vertices:
        return closed, None
    euler = vertices - counts.shape[0] + faces.shape[0]
    return closed, (2 - euler) // 2


def mesh_pieces(mesh: Mesh) -> list[Piece]:
    """The connected pieces of `mesh`, largest surface area first."""
    welded = _welded_faces(mesh)
    if welded.shape[0] == 0:
        return []
    edges = np.concatenate([welded[:, [0, 1]], welded[:, [1, 2]], welded[:, [2, 0]]])
    labels = _connected_labels(edges, int(welded.max()) + 1)[welded[:, 0]]
    v = mesh.vertices.detach().cpu().double()[mesh.faces.detach().cpu()]  # (F, 3, 3)
    cross = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
    face_area = (0.5 * cross.norm(dim=-1)).numpy()
    face_volume = ((v[:, 0] * cross).sum(-1) / 6.0).numpy()  # signed tetrahedra to the origin
    pieces = []
    for label in np.unique(labels):
        faces = np.flatnonzero(labels == label)
        closed, genus = _genus(welded[faces])
        signed_volume = float(face_volume[faces].sum())
        pieces.append(
            Piece(
                faces=faces,
                area=float(face_area[faces].sum()),
                volume=abs(signed_volume) if closed else None,
                closed=closed,
                genus=genus,
                cavity=closed and genus is not None and signed_volume < 0,
            )
        )
    return sorted(pieces, key=lambda p: -p.area)


def keep_faces(mesh: Mesh, faces: np.ndarray) -> Mesh:
    """The sub-mesh made of `faces` (k,) indices, without the vertices no kept face uses (uvs kept)."""
    device = mesh.device
    kept = mesh.faces[torch.as_tensor(faces, dtype=torch.int64, device=device)]
    used, inverse = torch.unique(kept, return_inverse=True)
    return Mesh(
        vertices=mesh.vertices[used],
        faces=inverse.reshape(kept.shape),
        uvs=None if mesh.uvs is None else mesh.uvs[used],
    )


def remove_loose_pieces(mesh: Mesh, min_area_fraction: float = MIN_AREA_FRACTION) -> tuple[Mesh, list[Piece]]:
    """Drop every piece whose surface area is below `min_area_fraction` of the largest piece's,
    and every cavity whatever its size. Returns (the mesh without them, the dropped pieces largest
    first: their `faces` index the input mesh). The largest piece is always kept; a mesh with one
    piece comes back unchanged."""
    if not 0.0 <= min_area_fraction <= 1.0:
        raise CleanupError(f"min_area_fraction must be in [0, 1], got {min_area_fraction}")
    pieces = mesh_pieces(mesh)
    if len(pieces) <= 1:
        return mesh, []
    dropped = [p for p in pieces[1:] if p.cavity or p.area < min_area_fraction * pieces[0].area]
    if not dropped:
        return mesh, []
    kept = np.setdiff1d(np.arange(mesh.faces.shape[0]), np.concatenate([p.faces for p in dropped]))
    return keep_faces(mesh, kept), dropped


def topology_report(mesh: Mesh, dropped: list[Piece]) -> dict:
    """What report.json records about a final mesh and the pieces removed from it:
    {"pieces": n, "genus": genus of each piece largest first (None for open or non-manifold),
    "closed": every piece closed, "pieces_removed": [Piece.summary(), ...], "faces_removed": k}."""
    pieces = mesh_pieces(mesh)
    return {
        "pieces": len(pieces),
        "genus": [p.genus for p in pieces],
        "closed": all(p.closed for p in pieces),
        "pieces_removed": [p.summary() for p in dropped],
        "faces_removed": int(sum(p.faces.shape[0] for p in dropped)),
    }


def describe_topology(report: dict) -> str:
    """`topology_report` in words, for the console: "1 piece, genus 0 (2 loose pieces and 1 cavity
    removed)"."""
    pieces = report.get("pieces", 0)
    genus = ", ".join("?" if g is None else str(g) for g in report.get("genus", []))
    words = f"{pieces} piece{'s' if pieces != 1 else ''}" + (f", genus {genus}" if genus else "")
    removed = report.get("pieces_removed", [])
    cavities = sum(1 for p in removed if p.get("cavity"))
    loose = len(removed) - cavities
    parts = [f"{loose} loose piece{'s' if loose != 1 else ''}"] * bool(loose)
    parts += [f"{cavities} cavit{'ies' if cavities != 1 else 'y'}"] * bool(cavities)
    return words + (f" ({' and '.join(parts)} removed)" if parts else "")
