"""The toy world: six coloured primitives, their captions, and the pairs held out of training.

Every primitive is one watertight triangle mesh with outward counter-clockwise faces, centred
on its bounding box and scaled so its farthest vertex is at distance 1 (bounding radius 1), +y
up. Faces are split to a small edge length, so smooth vertex normals blur a crease over one thin
band of triangles only, the way a marching-tetrahedra mesh of the same object looks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from xdreamer.mesh import Mesh

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")

# sRGB base colours in [0, 1]; shading uses srgb_to_linear of these.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.92, 0.92, 0.92),
    "gray": (0.50, 0.50, 0.50),
}

# (shape, colour) pairs never shown in training: the benchmark asks for them to test composition.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("torus", "purple"),
        ("cone", "yellow"),
        ("pyramid", "green"),
        ("cylinder", "white"),
        ("sphere", "blue"),
        ("cube", "orange"),
    }
)

VIEWS: tuple[str, ...] = ("front", "side", "back", "overhead")

SIZE_RANGE = (0.6, 0.85)  # bounding radius of a placed object
PLACEMENT_JITTER = 0.05  # max offset of its centre along each axis

_SEGMENTS = 48  # around the axis of revolved shapes
_MAX_EDGE = 0.1  # in units of the bounding radius


class ToyWorldError(ValueError):
    """An unknown shape, colour or view name."""


def _check(shape: str | None = None, colour: str | None = None, view: str | None = None) -> None:
    if shape is not None and shape not in SHAPES:
        raise ToyWorldError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if colour is not None and colour not in COLOURS:
        raise ToyWorldError(f"unknown colour {colour!r}; choose one of {', '.join(COLOURS)}")
    if view is not None and view not in VIEWS:
        raise ToyWorldError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")


def caption(shape: str, colour: str, view: str | None = None) -> str:
    """"a red cube", "an orange torus, side view": the article follows the colour's first sound."""
    _check(shape, colour, view)
    article = "an" if colour[0] in "aeiou" else "a"
    text = f"{article} {colour} {shape}"
    return text if view is None else f"{text}, {view} view"


def caption_words() -> list[str]:
    """Every word a toy caption can contain, for a tokenizer that keeps each one whole."""
    return ["a", "an", *COLOURS, *SHAPES, *VIEWS, "view", ","]


def training_pairs() -> list[tuple[str, str]]:
    """The 42 (shape, colour) pairs the toy model sees: all 48 minus `HELD_OUT`."""
    return [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT]


def _ring(radius: float, y: float, segments: int = _SEGMENTS) -> np.ndarray:
    """(segments, 3) points on a horizontal circle, counter-clockwise seen from +y."""
    angle = np.arange(segments) * 2 * np.pi / segments
    return np.stack([radius * np.sin(angle), np.full(segments, y), radius * np.cos(angle)], axis=-1)


def _cap(radius: float, y: float, up: bool, start: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat disc as a fan around its centre, facing +y if `up` else -y."""
    vertices = np.concatenate([[[0.0, y, 0.0]], _ring(radius, y)])
    n = _SEGMENTS
    i = np.arange(n)
    faces = np.stack([np.zeros(n, dtype=np.int64), 1 + i, 1 + (i + 1) % n], axis=-1)
    if not up:
        faces = faces[:, [0, 2, 1]]
    return vertices, faces + start


def _tube(radius_bottom: float, radius_top: float, y0: float, y1: float, start: int):
    """The side of a (truncated) cone between two rings, smooth around the axis, facing out."""
    n = _SEGMENTS
    bottom, top = _ring(radius_bottom, y0), _ring(radius_top, y1)
    if radius_top == 0.0:
        # One apex copy per segment, so the apex normal follows each side facet.
        vertices = np.concatenate([bottom, top])
        i = np.arange(n)
        faces = np.stack([i, (i + 1) % n, n + i], axis=-1)
        return vertices, faces + start
    vertices = np.concatenate([bottom, top])
    i = np.arange(n)
    j = (i + 1) % n
    faces = np.concatenate([np.stack([i, n + j, n + i], -1), np.stack([i, j, n + j], -1)])
    return vertices, faces + start


def _assemble(parts) -> tuple[np.ndarray, np.ndarray]:
    vertices, faces, start = [], [], 0
    for build, *args in parts:
        v, f = build(*args, start=start)
        vertices.append(v)
        faces.append(f)
        start += len(v)
    return np.concatenate(vertices), np.concatenate(faces)


def _cube() -> tuple[np.ndarray, np.ndarray]:
    vertices, faces = [], []
    for axis in range(3):
        for sign in (1.0, -1.0):
            normal = np.zeros(3)
            normal[axis] = sign
            u = np.zeros(3)
            u[(axis + 1) % 3] = 1.0
            v = np.cross(normal, u)  # (u, v, normal) right-handed: CCW seen from outside
            base = len(vertices)
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                vertices.append(normal + du * u + dv * v)
            faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    return np.asarray(vertices), np.asarray(faces)


def _pyramid() -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[-1.0, 0.0, -1.0], [-1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, -1.0]])  # CCW from +y
    apex = np.array([0.0, 1.6, 0.0])
    vertices, faces = [], []
    for k in range(4):
        base = len(vertices)
        vertices += [corners[k], corners[(k + 1) % 4], apex]
        faces.append([base, base + 1, base + 2])
    base = len(vertices)
    vertices += list(corners)
    faces += [[base, base + 2, base + 1], [base, base + 3, base + 2]]  # facing -y
    return np.asarray(vertices), np.asarray(faces)


def _torus() -> tuple[np.ndarray, np.ndarray]:
    major, minor, minor_segments = 1.0, 0.4, 24
    u = np.arange(_SEGMENTS) * 2 * np.pi / _SEGMENTS  # around +y
    v = np.arange(minor_segments) * 2 * np.pi / minor_segments  # around the tube
    uu, vv = np.meshgrid(u, v, indexing="ij")
    ring = major + minor * np.cos(vv)
    vertices = np.stack([ring * np.sin(uu), minor * np.sin(vv), ring * np.cos(uu)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(_SEGMENTS), np.arange(minor_segments), indexing="ij")
    a = i * minor_segments + j
    b = ((i + 1) % _SEGMENTS) * minor_segments + j
    c = ((i + 1) % _SEGMENTS) * minor_segments + (j + 1) % minor_segments
    d = i * minor_segments + (j + 1) % minor_segments
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return vertices, faces


def _raw_primitive(shape: str) -> tuple[np.ndarray, np.ndarray]:
    if shape == "sphere":
        import trimesh

        sphere = trimesh.creation.icosphere(subdivisions=3)
        return np.asarray(sphere.vertices), np.asarray(sphere.faces)
    if shape == "cube":
        return _cube()
    if shape == "cylinder":
        return _assemble([(_tube, 0.5, 0.5, 0.0, 1.0), (_cap, 0.5, 1.0, True), (_cap, 0.5, 0.0, False)])
    if shape == "cone":
        return _assemble([(_tube, 0.5, 0.0, 0.0, 1.0), (_cap, 0.5, 0.0, False)])
    if shape == "torus":
        return _torus()
    return _pyramid()


def primitive_mesh(shape: str) -> Mesh:
    """The canonical primitive: watertight, outward CCW faces, bounding-box centre at the origin,
    farthest vertex at distance 1, +y up (cone and pyramid point up, the torus lies flat)."""
    import trimesh

    _check(shape)
    vertices, faces = _raw_primitive(shape)
    vertices = vertices - (vertices.min(0) + vertices.max(0)) / 2
    vertices = vertices / np.linalg.norm(vertices, axis=-1).max()
    vertices, faces = trimesh.remesh.subdivide_to_size(vertices, faces, max_edge=_MAX_EDGE)
    # Parts built separately (caps, cube sides) share rim positions exactly: weld them.
    welded = trimesh.Trimesh(vertices, faces, process=False)
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    return Mesh.from_arrays(np.asarray(welded.vertices, dtype=np.float32), np.asarray(welded.faces, dtype=np.int64))


def ground_truth_sdf(shape: str, points: torch.Tensor) -> torch.Tensor:
    """Signed distance from `points` (N, 3) to the canonical primitive, negative inside: (N,)."""
    import igl

    mesh = primitive_mesh(shape)
    distance, *_ = igl.signed_distance(
        points.detach().cpu().double().numpy(),
        mesh.vertices.double().numpy(),
        mesh.faces.numpy(),
        igl.SIGNED_DISTANCE_TYPE_WINDING_NUMBER,
    )
    return torch.as_tensor(distance, dtype=points.dtype, device=points.device)


@dataclass
class Placement:
    """Where a primitive sits in a scene: uniform scale (its bounding radius), rotation about +y
    in radians, and the offset (3,) of its centre."""

    scale: float
    rotation: float
    offset: tuple[float, float, float]

    def apply(self, mesh: Mesh) -> Mesh:
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        rotation = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=mesh.vertices.dtype)
        offset = torch.tensor(self.offset, dtype=mesh.vertices.dtype)
        vertices = self.scale * mesh.vertices @ rotation.T.to(mesh.device) + offset.to(mesh.device)
        return Mesh(vertices=vertices, faces=mesh.faces)


def sample_placement(generator: torch.Generator) -> Placement:
    """A random size in `SIZE_RANGE`, rotation about +y and offset up to `PLACEMENT_JITTER`."""
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    scale = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u[0]
    offset = tuple(PLACEMENT_JITTER * (2 * x - 1) for x in u[2:5])
    return Placement(scale=scale, rotation=2 * math.pi * u[1], offset=offset)
