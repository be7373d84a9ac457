"""Mesh topology and clean-up on meshes whose answer is known: pieces, genus, and which loose
pieces `remove_loose_pieces` drops."""

import math

import numpy as np
import pytest
import torch
import trimesh

from xdreamer.export.bake import unwrap
from xdreamer.geometry.cleanup import (
    CleanupError,
    describe_topology,
    mesh_pieces,
    remove_loose_pieces,
    topology_report,
)
from xdreamer.mesh import Mesh
from xdreamer.toy.world import SHAPES, primitive_mesh


def from_trimesh(*meshes: trimesh.Trimesh) -> Mesh:
    joined = trimesh.util.concatenate(meshes) if len(meshes) > 1 else meshes[0]
    return Mesh.from_arrays(joined.vertices, joined.faces)


def sphere(radius=1.0, centre=(0.0, 0.0, 0.0), subdivisions=2) -> trimesh.Trimesh:
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    s.apply_translation(centre)
    return s


@pytest.mark.parametrize("shape", SHAPES)
def test_toy_primitives_are_one_closed_piece_with_their_genus(shape):
    (piece,) = mesh_pieces(primitive_mesh(shape))
    assert piece.closed and piece.genus == (1 if shape == "torus" else 0)


def test_torus_has_genus_one_and_cube_genus_zero():
    (torus,) = mesh_pieces(from_trimesh(trimesh.creation.torus(1.0, 0.3)))
    assert (torus.closed, torus.genus) == (True, 1)
    assert torus.volume == pytest.approx(2 * math.pi**2 * 1.0 * 0.3**2, rel=0.02)
    (cube,) = mesh_pieces(from_trimesh(trimesh.creation.box((2.0, 2.0, 2.0))))
    assert (cube.closed, cube.genus, cube.faces.shape[0]) == (True, 0, 12)
    assert (cube.area, cube.volume) == (pytest.approx(24.0), pytest.approx(8.0))


def test_two_spheres_are_two_pieces_largest_first():
    small, large = sphere(0.5, (3.0, 0.0, 0.0)), sphere(1.0)
    pieces = mesh_pieces(from_trimesh(small, large))
    assert len(pieces) == 2
    assert [p.area for p in pieces] == [pytest.approx(large.area), pytest.approx(small.area)]
    assert [p.genus for p in pieces] == [0, 0]
    # Faces come back as indices into the input: the small sphere's faces are listed first.
    assert np.array_equal(pieces[1].faces, np.arange(len(small.faces)))


def test_seam_copies_of_an_unwrapped_mesh_are_one_surface():
    torus = from_trimesh(trimesh.creation.torus(1.0, 0.3))
    atlas = unwrap(torus, texture_size=256)
    assert atlas.vertices.shape[0] > torus.vertices.shape[0]
    (piece,) = mesh_pieces(atlas)
    assert (piece.closed, piece.genus) == (True, 1)


def test_open_and_non_manifold_pieces_have_no_genus():
    s = sphere()
    (opened,) = mesh_pieces(Mesh.from_arrays(s.vertices, s.faces[1:]))
    assert (opened.closed, opened.genus, opened.volume) == (False, None, None)

    flipped = s.faces.copy()
    flipped[0] = flipped[0, ::-1]
    (inconsistent,) = mesh_pieces(Mesh.from_arrays(s.vertices, flipped))
    assert (inconsistent.closed, inconsistent.genus) == (True, None)

    # Two spheres touching at one shared vertex: every edge has two faces, V - E + F = 3, and
    # the faces around the shared vertex form two fans, so it is not a surface.
    top, bottom = int(np.argmax(s.vertices[:, 2])), int(np.argmin(s.vertices[:, 2]))
    shift = s.vertices[top] - s.vertices[bottom]
    second = s.faces + len(s.vertices)
    second[second == bottom + len(s.vertices)] = top
    touching = Mesh.from_arrays(np.concatenate([s.vertices, s.vertices + shift]), np.concatenate([s.faces, second]))
    (piece,) = mesh_pieces(touching)
    assert (piece.closed, piece.genus) == (True, None)


def test_the_tiny_sphere_is_dropped_and_reported():
    big, tiny, moon = sphere(1.0), sphere(0.05, (2.0, 0.0, 0.0), 1), sphere(0.3, (0.0, 2.0, 0.0), 1)
    mesh = from_trimesh(big, tiny, moon)
    cleaned, dropped = remove_loose_pieces(mesh)
    # The tiny sphere has 0.25 % of the big one's area, the moon 9 %: only the tiny one goes.
    assert len(dropped) == 1
    (gone,) = dropped
    assert gone.faces.shape[0] == len(tiny.faces)
    assert np.array_equal(gone.faces, len(big.faces) + np.arange(len(tiny.faces)))
    assert gone.area == pytest.approx(tiny.area) and gone.volume == pytest.approx(tiny.volume)
    assert cleaned.faces.shape[0] == len(big.faces) + len(moon.faces)
    assert cleaned.vertices.shape[0] == len(big.vertices) + len(moon.vertices)
    assert float(cleaned.area()) == pytest.approx(big.area + moon.area, rel=1e-5)
    assert float(cleaned.volume()) == pytest.approx(big.volume + moon.volume, rel=1e-5)

    report = topology_report(cleaned, dropped)
    assert (report["pieces"], report["genus"], report["closed"], report["faces_removed"]) == (2, [0, 0], True, len(tiny.faces))
    assert report["pieces_removed"] == [
        {"faces": len(tiny.faces), "area": gone.area, "volume": gone.volume, "closed": True, "genus": 0, "cavity": False}
    ]

    # A larger fraction takes the moon too; 0 keeps everything.
    assert len(remove_loose_pieces(mesh, 0.1)[1]) == 2
    kept, none = remove_loose_pieces(mesh, 0.0)
    assert none == [] and kept is mesh


def test_a_cavity_is_dropped_whatever_its_size():
    outer, pocket = sphere(1.0), sphere(0.5)
    pocket.invert()  # wound inward: the wall of an empty pocket inside the solid ball
    mesh = from_trimesh(outer, pocket)
    assert float(mesh.volume()) == pytest.approx(outer.volume - abs(pocket.volume), rel=1e-5)
    pieces = mesh_pieces(mesh)
    assert [(p.cavity, p.genus) for p in pieces] == [(False, 0), (True, 0)]
    # 25 % of the outer area, far above the 2 % floater threshold, and still removed: the pocket
    # is filled and the solid's volume is the outer sphere's.
    assert pieces[1].area / pieces[0].area == pytest.approx(0.25, rel=1e-6)
    cleaned, dropped = remove_loose_pieces(mesh)
    assert [p.summary()["cavity"] for p in dropped] == [True] and dropped[0].faces.shape[0] == len(pocket.faces)
    assert float(cleaned.volume()) == pytest.approx(outer.volume, rel=1e-5)
    assert topology_report(cleaned, dropped)["pieces"] == 1
    # The same ball wound outward is a solid piece inside a solid, not a cavity: it stays.
    assert remove_loose_pieces(from_trimesh(outer, sphere(0.5)))[1] == []

    floater = sphere(0.05, (3.0, 0.0, 0.0), 1)
    cleaned, dropped = remove_loose_pieces(from_trimesh(outer, pocket, floater))
    report = topology_report(cleaned, dropped)
    assert describe_topology(report) == "1 piece, genus 0 (1 loose piece and 1 cavity removed)"
    assert describe_topology(topology_report(from_trimesh(outer, sphere(0.5, (3.0, 0.0, 0.0))), [])) == "2 pieces, genus 0, 0"


def test_removal_keeps_uvs_with_their_vertices():
    big, tiny = sphere(1.0), sphere(0.05, (2.0, 0.0, 0.0), 1)
    mesh = from_trimesh(big, tiny)
    mesh.uvs = torch.rand(mesh.vertices.shape[0], 2, generator=torch.Generator().manual_seed(0))
    cleaned, _ = remove_loose_pieces(mesh)
    n = len(big.vertices)
    assert torch.equal(cleaned.vertices, mesh.vertices[:n]) and torch.equal(cleaned.uvs, mesh.uvs[:n])
    assert torch.equal(cleaned.faces, mesh.faces[: len(big.faces)])


def test_bad_fraction_is_a_user_error():
    with pytest.raises(CleanupError):
        remove_loose_pieces(from_trimesh(sphere()), 1.5)
