"""The toy world: coloured primitives, objects with a front, their captions, and what is held
out of training.

Every shape is one watertight triangle mesh with outward counter-clockwise faces, centred on its
bounding box and scaled so its farthest vertex is at distance 1 (bounding radius 1), +y up. Faces
are split to a small edge length, so smooth vertex normals blur a crease over one thin band of
triangles only, the way a marching-tetrahedra mesh of the same object looks.

Objects with a front face +z (azimuth 0, the "front" of `Cameras.view_labels`) and differ from
behind, so a text-to-3D result can show the multi-face ("Janus") failure: a mug with one handle,
and a cube whose +z face has another colour ("a red cube with a blue front").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from xdreamer.mesh import Mesh

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
# Shapes with a front (+z): placed facing the front camera, never turned at random.
FRONT_SHAPES: tuple[str, ...] = ("mug",)
# Shapes the model learns only so that its other words mean what they say: a "box" is a cuboid
# whose sides differ (drawn per placement, `sample_placement`), so "cube" comes to mean equal
# sides. A box has no fixed proportions, so it has no ground truth and is never scored.
CONTRAST_SHAPES: tuple[str, ...] = ("box",)
# Every shape the world has, in this order (the training data indexes it).
OBJECT_SHAPES: tuple[str, ...] = SHAPES + FRONT_SHAPES + CONTRAST_SHAPES

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

# Colours a cube's front face can have, on any body colour at least this far away in CIELAB
# (red/orange, blue/purple and white/gray are too close to tell a front apart reliably).
FRONT_COLOURS: tuple[str, ...] = ("red", "blue", "yellow", "white")
MIN_FRONT_CONTRAST = 60.0  # CIELAB ΔE between body and front colour

VIEWS: tuple[str, ...] = ("front", "side", "back", "overhead")

SIZE_RANGE = (0.6, 0.85)  # bounding radius of a placed object
PLACEMENT_JITTER = 0.05  # max offset of its centre along each axis
# A box's height over its width: lower or higher than a cube by at least a fifth, so that at the
# toy model's 32x32 pixels the difference spans a few pixels; its depth over its width.
BOX_HEIGHTS = ((0.6, 0.8), (1.25, 1.5))
BOX_DEPTH = (0.6, 1.0)
FRONT_YAW_JITTER = math.radians(10.0)  # objects with a front turn at most this far from +z

_SEGMENTS = 48  # around the axis of revolved shapes
_MAX_EDGE = 0.1  # in units of the bounding radius

# The mug before normalization: a solid cylinder (radius 0.45, height 1, base at y = 0) and a
# handle, a torus of tube radius 0.075 whose centre line (radius 0.27) stands in the plane
# through the axis, centred on the wall at mid-height; it sticks out 0.345 beyond the wall.
MUG_RADIUS, MUG_HEIGHT = 0.45, 1.0
HANDLE_RADIUS, HANDLE_THICKNESS = 0.27, 0.075
_MUG_GRID = 64  # marching-cubes cells along the longest side


class ToyWorldError(ValueError):
    """An unknown shape, colour or view name, or an object the world does not have."""


def _check(shape: str | None = None, colour: str | None = None, view: str | None = None) -> None:
    if shape is not None and shape not in OBJECT_SHAPES:
        raise ToyWorldError(f"unknown shape {shape!r}; choose one of {', '.join(OBJECT_SHAPES)}")
    if colour is not None and colour not in COLOURS:
        raise ToyWorldError(f"unknown colour {colour!r}; choose one of {', '.join(COLOURS)}")
    if view is not None and view not in VIEWS:
        raise ToyWorldError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str, view: str | None = None, front: str | None = None, normal_map: bool = False) -> str:
    """"a red cube", "an orange torus, side view", "a red cube with a blue front", "a red mug,
    normal map, front view": the article follows the colour's first sound; ", normal map" marks
    the normal-map rendering (the geometry stage's prompt), the view suffix comes last."""
    _check(shape, colour, view)
    text = f"{_article(colour)} {colour} {shape}"
    if front is not None:
        _check(colour=front)
        text += f" with {_article(front)} {front} front"
    if normal_map:
        text += ", normal map"
    return text if view is None else f"{text}, {view} view"


def caption_words() -> list[str]:
    """Every word a toy caption can contain, for a tokenizer that keeps each one whole (words
    added to the world come last, so the tokens of the earlier ones keep their order)."""
    return ["a", "an", *COLOURS, *SHAPES, *FRONT_SHAPES, *VIEWS, "view", "with", "normal", "map", ",", *CONTRAST_SHAPES]


def training_pairs() -> list[tuple[str, str]]:
    """The 42 (shape, colour) pairs of primitives the toy model sees: all 48 minus `HELD_OUT`."""
    return [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT]


def srgb_to_lab(srgb) -> np.ndarray:
    """sRGB in [0, 1], any shape (..., 3) -> CIELAB of the same shape (OpenCV's conversion, D65)."""
    import cv2

    srgb = np.asarray(srgb, dtype=np.float32)
    return cv2.cvtColor(srgb.reshape(-1, 1, 3), cv2.COLOR_RGB2Lab).reshape(srgb.shape)


def delta_e(srgb_a, srgb_b) -> float:
    """CIE76 colour difference: Euclidean distance in CIELAB (OpenCV's conversion, D65) of two sRGB colours."""
    return float(np.linalg.norm(srgb_to_lab(srgb_a) - srgb_to_lab(srgb_b)))


def colour_difference(a: str, b: str) -> float:
    """CIELAB ΔE between two named colours."""
    return delta_e(COLOURS[a], COLOURS[b])


@dataclass(frozen=True)
class ToyObject:
    """One thing the world can show: a shape in a colour and, for a cube, optionally the colour
    of its front (+z) face."""

    shape: str
    colour: str
    front: str | None = None

    def __post_init__(self) -> None:
        _check(self.shape, self.colour)
        if self.front is not None:
            if self.shape != "cube" or self.front not in FRONT_COLOURS:
                raise ToyWorldError(f"only a cube has a front colour, one of {', '.join(FRONT_COLOURS)}")
            if colour_difference(self.colour, self.front) < MIN_FRONT_CONTRAST:
                raise ToyWorldError(f"a {self.front} front on a {self.colour} cube is too close in colour to tell apart")

    @property
    def has_front(self) -> bool:
        """Whether the object looks different from the front and from behind."""
        return self.front is not None or self.shape in FRONT_SHAPES

    def caption(self, view: str | None = None, normal_map: bool = False) -> str:
        return caption(self.shape, self.colour, view, self.front, normal_map)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """sRGB base colour (N, 3) at surface points (N, 3) of the canonical (unplaced) shape."""
        body = torch.tensor(COLOURS[self.colour], dtype=points.dtype, device=points.device).expand(len(points), 3)
        if self.front is None:
            return body
        front = torch.tensor(COLOURS[self.front], dtype=points.dtype, device=points.device)
        # The canonical cube's faces lie at +-1/sqrt(3); the tolerance covers float rounding only.
        on_front = points[:, 2:3] > 0.999 / math.sqrt(3)
        return torch.where(on_front, front, body)


# Never shown in training: a mug colour and a front/body combination, for composition.
HELD_OUT_OBJECTS: frozenset[ToyObject] = frozenset({ToyObject("mug", "yellow"), ToyObject("cube", "yellow", "red")})


def front_objects() -> list[ToyObject]:
    """Every object with a front: a mug in each colour, and each cube/front colour pair with
    enough contrast (24 pairs)."""
    mugs = [ToyObject("mug", c) for c in COLOURS]
    cubes = [
        ToyObject("cube", body, front)
        for front in FRONT_COLOURS
        for body in COLOURS
        if body != front and colour_difference(body, front) >= MIN_FRONT_CONTRAST
    ]
    return mugs + cubes


def training_objects() -> list[ToyObject]:
    """What the toy model sees: the 42 primitive pairs, then the objects with a front minus
    `HELD_OUT_OBJECTS` (7 mugs, 23 cubes with a front), then a box in every colour (80 in all)."""
    plain = [ToyObject(s, c) for s, c in training_pairs()]
    boxes = [ToyObject(s, c) for s in CONTRAST_SHAPES for c in COLOURS]
    return plain + [o for o in front_objects() if o not in HELD_OUT_OBJECTS] + boxes


def parse_caption(text: str) -> ToyObject:
    """The object a toy prompt names: "a red cube" -> ToyObject("cube", "red"), "a red cube with
    a blue front, front view" -> ToyObject("cube", "red", "blue"); view words and ", normal map"
    are ignored. Raises ToyWorldError unless the text names one shape and its colour(s)."""
    words = re.findall(r"[a-z]+", text.lower())
    shapes = [w for w in words if w in OBJECT_SHAPES]
    colours = [w for w in words if w in COLOURS]
    fronts = [words[i - 1] for i, w in enumerate(words) if w == "front" and i > 0 and words[i - 1] in COLOURS]
    body = [c for c in colours if c not in fronts] if fronts else colours
    if len(shapes) != 1 or len(body) != 1 or len(fronts) > 1:
        raise ToyWorldError(
            f"toy prompt {text!r} must name one shape ({', '.join(SHAPES + FRONT_SHAPES)}), its colour "
            f"({', '.join(COLOURS)}) and at most one front colour ('with a blue front')"
        )
    return ToyObject(shapes[0], body[0], fronts[0] if fronts else None)


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


def mug_sdf(points: np.ndarray, handle_azimuths: tuple[float, ...] = (0.0,)) -> np.ndarray:
    """Signed distance (N,) to the unnormalized mug at points (N, 3), negative inside: the solid
    cylinder united with one handle per azimuth (degrees about +y, 0 = +z, 90 = +x)."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    dr = np.hypot(x, z) - MUG_RADIUS
    dy = np.abs(y - MUG_HEIGHT / 2) - MUG_HEIGHT / 2
    distance = np.minimum(np.maximum(dr, dy), 0.0) + np.hypot(np.maximum(dr, 0.0), np.maximum(dy, 0.0))
    for azimuth in np.deg2rad(handle_azimuths):
        out = np.array([np.sin(azimuth), 0.0, np.cos(azimuth)])  # where the handle points
        across = np.array([np.cos(azimuth), 0.0, -np.sin(azimuth)])  # the handle's torus axis
        local = points - np.array([0.0, MUG_HEIGHT / 2, 0.0]) - MUG_RADIUS * out
        in_plane = np.hypot(local @ out, local[:, 1])
        handle = np.hypot(in_plane - HANDLE_RADIUS, local @ across) - HANDLE_THICKNESS
        distance = np.minimum(distance, handle)
    return distance


def _mug(handle_azimuths: tuple[float, ...] = (0.0,)) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of `mug_sdf` (a union has no simple polygonal construction)."""
    import igl

    reach = MUG_RADIUS + HANDLE_RADIUS + HANDLE_THICKNESS + 0.05
    step = 2 * reach / _MUG_GRID
    axes = [np.arange(-reach, reach + step / 2, step), np.arange(-0.05, MUG_HEIGHT + 0.05 + step / 2, step)]
    axes.insert(2, axes[0])
    # igl wants x fastest, then y, then z.
    gz, gy, gx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    grid = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=-1)
    vertices, faces, _ = igl.marching_cubes(mug_sdf(grid, handle_azimuths), grid, len(axes[0]), len(axes[1]), len(axes[2]))
    return vertices, faces


def _raw_primitive(shape: str) -> tuple[np.ndarray, np.ndarray]:
    if shape == "sphere":
        import trimesh

        sphere = trimesh.creation.icosphere(subdivisions=3)
        return np.asarray(sphere.vertices), np.asarray(sphere.faces)
    if shape in ("cube", "box"):  # a box is the cube until its placement sets its sides
        return _cube()
    if shape == "cylinder":
        return _assemble([(_tube, 0.5, 0.5, 0.0, 1.0), (_cap, 0.5, 1.0, True), (_cap, 0.5, 0.0, False)])
    if shape == "cone":
        return _assemble([(_tube, 0.5, 0.0, 0.0, 1.0), (_cap, 0.5, 0.0, False)])
    if shape == "torus":
        return _torus()
    if shape == "mug":
        return _mug()
    return _pyramid()


def _finish(vertices: np.ndarray, faces: np.ndarray, reference: np.ndarray | None = None) -> Mesh:
    """Centre on the bounding box and scale to bounding radius 1 (of `reference` vertices when
    given, else of `vertices`), split long edges, weld, orient the faces outward."""
    import trimesh

    reference = vertices if reference is None else reference
    centre = (reference.min(0) + reference.max(0)) / 2
    vertices = (vertices - centre) / np.linalg.norm(reference - centre, axis=-1).max()
    vertices, faces = trimesh.remesh.subdivide_to_size(vertices, faces, max_edge=_MAX_EDGE)
    # Parts built separately (caps, cube sides) share rim positions exactly: weld them.
    welded = trimesh.Trimesh(vertices, faces, process=False)
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    if welded.volume < 0:  # marching cubes winds its triangles the other way round
        welded.invert()
    return Mesh.from_arrays(np.asarray(welded.vertices, dtype=np.float32), np.asarray(welded.faces, dtype=np.int64))


def primitive_mesh(shape: str) -> Mesh:
    """The canonical shape: watertight, outward CCW faces, bounding-box centre at the origin,
    farthest vertex at distance 1, +y up (cone and pyramid point up, the torus lies flat, the
    mug's handle points to +z)."""
    _check(shape)
    return _finish(*_raw_primitive(shape))


def mug_mesh(handle_azimuths: tuple[float, ...]) -> Mesh:
    """A mug with handles at the given azimuths (degrees, 0 = +z), placed and scaled like the
    world's mug (`primitive_mesh("mug")`, handle at 0): (0.0, 180.0) is the two-faced result
    of a multi-face failure, with the body where the world's mug has it."""
    return _finish(*_mug(handle_azimuths), reference=_mug()[0])


def ground_truth_sdf(shape: str, points: torch.Tensor) -> torch.Tensor:
    """Signed distance from `points` (N, 3) to the canonical primitive, negative inside: (N,)."""
    import igl

    if shape in CONTRAST_SHAPES:
        raise ToyWorldError(f"a {shape} has no fixed proportions, so no ground truth to score against")

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
    in radians, the offset (3,) of its centre, and `stretch` (3,), the factors along x, y, z of
    the canonical shape applied first (all 1 but for a box; they keep its bounding radius 1)."""

    scale: float
    rotation: float
    offset: tuple[float, float, float]
    stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def _rotation(self, like: torch.Tensor) -> torch.Tensor:
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=like.dtype, device=like.device)

    def apply(self, mesh: Mesh) -> Mesh:
        rotation = self._rotation(mesh.vertices)
        offset = torch.tensor(self.offset, dtype=mesh.vertices.dtype, device=mesh.device)
        stretch = torch.tensor(self.stretch, dtype=mesh.vertices.dtype, device=mesh.device)
        return Mesh(vertices=self.scale * (mesh.vertices * stretch) @ rotation.T + offset, faces=mesh.faces)

    def to_local(self, points: torch.Tensor) -> torch.Tensor:
        """World points (N, 3) of a placed mesh -> the same points on the canonical mesh."""
        offset = torch.tensor(self.offset, dtype=points.dtype, device=points.device)
        stretch = torch.tensor(self.stretch, dtype=points.dtype, device=points.device)
        return (points - offset) @ self._rotation(points) / self.scale / stretch


def box_stretch(height: float, depth: float) -> tuple[float, float, float]:
    """`Placement.stretch` of a box `height` and `depth` times as long as it is wide, scaled so
    that the stretched canonical cube (corners at distance 1) keeps bounding radius 1."""
    norm = math.sqrt((1.0 + height**2 + depth**2) / 3.0)
    return (1.0 / norm, height / norm, depth / norm)


def sample_placement(generator: torch.Generator, facing: bool = False, box: bool = False) -> Placement:
    """A random size in `SIZE_RANGE`, rotation about +y and offset up to `PLACEMENT_JITTER`; a
    `facing` object (one with a front) turns at most `FRONT_YAW_JITTER` away from +z. A `box`
    draws its sides too: its height from one of `BOX_HEIGHTS` (each half the time), its depth
    from `BOX_DEPTH`, both over its width."""
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    scale = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u[0]
    offset = tuple(PLACEMENT_JITTER * (2 * x - 1) for x in u[2:5])
    rotation = FRONT_YAW_JITTER * (2 * u[1] - 1) if facing else 2 * math.pi * u[1]
    stretch = (1.0, 1.0, 1.0)
    if box:
        which, h, d = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        low, high = BOX_HEIGHTS[int(which < 0.5)]
        stretch = box_stretch(low + (high - low) * h, BOX_DEPTH[0] + (BOX_DEPTH[1] - BOX_DEPTH[0]) * d)
    return Placement(scale=scale, rotation=rotation, offset=offset, stretch=stretch)
