"""Regularizers the DMTet literature adds to score distillation: smooth, single-surface meshes.

The authors' X-Dreamer code uses none; nvdiffrec and Fantasia3D use the SDF sign term, and mesh
methods (Magic3D's fine stage, threestudio) normal consistency and Laplacian smoothness. Each is
a scalar differentiable in the mesh vertices or the SDF, 0 for its ideal input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xdreamer.mesh import Mesh, undirected_edge_keys


def face_adjacency(faces: torch.Tensor) -> torch.Tensor:
    """(F, 3) faces -> (P, 2) pairs of faces sharing an edge (edges with exactly two faces), in
    the order of their edges' sorted vertex pairs."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    if edges.shape[0] == 0:
        return torch.empty(0, 2, dtype=torch.int64, device=faces.device)
    face_of = torch.arange(faces.shape[0], device=faces.device).repeat(3)
    key, order = undirected_edge_keys(edges, int(faces.max()) + 1).sort(stable=True)
    # Runs of one key are the faces of one edge; keep the runs of exactly two.
    starts = torch.cat([key.new_ones(1, dtype=torch.bool), key[1:] != key[:-1]]).nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([key.shape[0]]))
    first = starts[lengths == 2]
    return torch.stack([face_of[order[first]], face_of[order[first + 1]]], dim=-1)


def normal_consistency(mesh: Mesh) -> torch.Tensor:
    """Mean of 1 - cos(angle) between the normals of faces sharing an edge: 0 on a plane, 2 at a
    fold. A mesh without shared edges gives 0."""
    pairs = face_adjacency(mesh.faces)
    if pairs.shape[0] == 0:
        return mesh.vertices.sum() * 0.0
    normals = mesh.face_normals()
    return (1.0 - (normals[pairs[:, 0]] * normals[pairs[:, 1]]).sum(-1)).mean()


def laplacian_smoothness(mesh: Mesh) -> torch.Tensor:
    """Mean squared length of the uniform Laplacian: each vertex's offset from the mean of its
    edge neighbours (0 where every vertex is the centroid of its neighbours)."""
    v, faces = mesh.vertices, mesh.faces
    if faces.shape[0] == 0:
        return v.sum() * 0.0
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    count = v.shape[0]
    key = undirected_edge_keys(edges, count).unique()  # each undirected edge once
    ends = torch.stack([key // count, key % count], dim=-1)
    edges = torch.cat([ends, ends.flip(1)])  # each direction once
    neighbour_sum = torch.zeros_like(v).index_add(0, edges[:, 0], v[edges[:, 1]])
    degree = torch.zeros(v.shape[0], device=v.device, dtype=v.dtype).index_add(
        0, edges[:, 0], torch.ones(edges.shape[0], device=v.device, dtype=v.dtype)
    )
    used = degree > 0
    offset = v[used] - neighbour_sum[used] / degree[used, None]
    return offset.square().sum(-1).mean()


def tet_edges(tets: torch.Tensor) -> torch.Tensor:
    """(T, 4) tetrahedra -> (E, 2) their unique edges, smaller index first."""
    pairs = tets[:, [0, 0, 0, 1, 1, 2, 1, 2, 3, 2, 3, 3]].view(-1, 2, 6).permute(0, 2, 1).reshape(-1, 2)
    count = int(tets.max()) + 1
    key = undirected_edge_keys(pairs, count).unique()
    return torch.stack([key // count, key % count], dim=-1)


def sdf_sign_regularizer(sdf: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """nvdiffrec's SDF regularizer: on every grid edge whose ends have opposite signs, the binary
    cross-entropy of each end's SDF (as a logit) against the other end's side. It pushes the
    field towards fewer sign changes, which removes floaters and thin internal sheets.

    sdf: (N,) at the grid vertices; edges: (E, 2) from `tet_edges`. 0 when no edge crosses."""
    a, b = sdf[edges[:, 0]], sdf[edges[:, 1]]
    crossing = (a > 0) != (b > 0)
    if not bool(crossing.any()):
        return sdf.sum() * 0.0
    a, b = a[crossing], b[crossing]
    return (
        F.binary_cross_entropy_with_logits(a, (b > 0).to(a.dtype))
        + F.binary_cross_entropy_with_logits(b, (a > 0).to(b.dtype))
    )
