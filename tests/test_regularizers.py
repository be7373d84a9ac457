"""The geometry stage's regularizers: face adjacency against a brute-force count, the exact values
of normal consistency and Laplacian smoothness on meshes whose answer is known, the tet grid's edges."""

import itertools
import math

import pytest
import torch
import trimesh

from xdreamer.geometry.regularizers import (
    face_adjacency,
    laplacian_smoothness,
    normal_consistency,
    sdf_sign_regularizer,
    tet_edges,
)
from xdreamer.geometry.tets import tetrahedral_grid
from xdreamer.mesh import Mesh


def _brute_force_adjacency(faces: torch.Tensor) -> set[tuple[int, int]]:
    """Pairs of faces whose undirected edge no third face shares."""
    by_edge: dict[frozenset, list[int]] = {}
    for index, face in enumerate(faces.tolist()):
        for a, b in ((face[0], face[1]), (face[1], face[2]), (face[2], face[0])):
            by_edge.setdefault(frozenset((a, b)), []).append(index)
    return {tuple(sorted(owners)) for owners in by_edge.values() if len(owners) == 2}


def test_face_adjacency_matches_a_brute_force_count_and_skips_non_manifold_edges():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    faces = torch.as_tensor(sphere.faces, dtype=torch.int64)
    pairs = face_adjacency(faces)
    # A closed triangle mesh has 3F/2 edges, each shared by exactly two faces.
    assert pairs.shape == (faces.shape[0] * 3 // 2, 2)
    assert {tuple(sorted(p)) for p in pairs.tolist()} == _brute_force_adjacency(faces)
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == pairs.shape[0]  # each pair once
    # A third face on the edge (0, 1): that edge joins three faces and is left out; the new face's
    # other two edges are open.
    a, b = faces[0, 0].item(), faces[0, 1].item()
    fan = torch.cat([faces, torch.tensor([[b, a, faces.max().item() + 1]])])
    fan_pairs = face_adjacency(fan)
    assert fan_pairs.shape[0] == pairs.shape[0] - 1
    assert {tuple(sorted(p)) for p in fan_pairs.tolist()} == _brute_force_adjacency(fan)
    assert face_adjacency(torch.empty(0, 3, dtype=torch.int64)).shape == (0, 2)


def test_normal_consistency_is_zero_on_a_plane_and_one_minus_cosine_across_a_fold():
    square = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert normal_consistency(Mesh(square, faces)).item() == pytest.approx(0.0, abs=1e-7)
    # Fold the second triangle up by 60 degrees about the shared diagonal.
    angle = math.radians(60)
    axis = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    corner = square[3]
    along = (corner @ axis) * axis
    off = corner - along
    folded = along + off * math.cos(angle) + torch.linalg.cross(axis, off) * math.sin(angle)
    bent = torch.stack([square[0], square[1], square[2], folded])
    assert normal_consistency(Mesh(bent, faces)).item() == pytest.approx(1 - math.cos(angle), abs=1e-6)


def test_laplacian_smoothness_equals_a_brute_force_sum_on_a_grid_with_a_raised_vertex():
    # A 3x3 vertex grid, two triangles per square, with the centre raised: the term is the mean
    # squared offset of each vertex from the mean of its edge neighbours, counted here by hand.
    side = 3
    points = torch.tensor([[x, y, 0.0] for y in range(side) for x in range(side)])
    quads = [(y * side + x, y * side + x + 1, (y + 1) * side + x + 1, (y + 1) * side + x)
             for y in range(side - 1) for x in range(side - 1)]
    faces = torch.tensor([f for a, b, c, d in quads for f in ((a, b, c), (a, c, d))])
    flat = Mesh(points, faces)
    centre = 4
    raised = points.clone()
    raised[centre, 2] = 0.5
    neighbours = {v: set() for v in range(side * side)}
    for a, b, c in faces.tolist():
        for u, v in itertools.permutations((a, b, c), 2):
            neighbours[u].add(v)
    expected = torch.zeros(side * side, 3)
    for v, ns in neighbours.items():
        expected[v] = raised[v] - raised[sorted(ns)].mean(0)
    value = laplacian_smoothness(Mesh(raised, faces)).item()
    assert value == pytest.approx(expected.square().sum(-1).mean().item(), rel=1e-6)
    assert value > laplacian_smoothness(flat).item()


def test_tet_edges_are_each_grid_edge_once_and_the_sign_term_sees_only_crossing_edges():
    vertices, tets = tetrahedral_grid(4)
    edges = tet_edges(tets)
    brute = {tuple(sorted(p)) for t in tets.tolist() for p in itertools.combinations(t, 2)}
    assert edges.shape == (len(brute), 2)
    assert {tuple(e) for e in edges.tolist()} == brute
    assert bool((edges[:, 0] < edges[:, 1]).all())
    # Lexicographic order, as a unique over the pairs gives it.
    keys = edges[:, 0] * vertices.shape[0] + edges[:, 1]
    assert bool((keys[1:] > keys[:-1]).all())
    # An SDF with one sign everywhere has no crossing edge: the term is exactly 0.
    assert sdf_sign_regularizer(torch.ones(vertices.shape[0]), edges).item() == 0.0
    sdf = vertices.norm(dim=-1) - 0.3
    assert sdf_sign_regularizer(sdf, edges).item() > 0.0
