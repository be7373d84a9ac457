"""Counting fronts on a generated object with a front: the multi-face ("Janus") measure.

The toy world's objects with a front (`ToyObject.has_front`) face +z: a cube whose +z face has
another colour, and a mug whose one handle points to +z. A text-to-3D result shows the
multi-face failure when the feature appears on more than one side. Both scores look at the four
sides of the object, named by the azimuth they face about +y, as the cameras name views
(`Cameras.view_labels`): front (+z, azimuth 0), right (+x, 90: the viewer's right when seen from
the front), back (-z), left (-x).

- Front colour: surface samples whose normal faces sideways, grouped by the side the normal
  faces; a side carries the front when most of its area is nearer (CIELAB) the front colour than
  the body colour.
- Handle: surface samples in the middle of the object's height, grouped by the side they lie
  on around the body's axis; a side carries a handle when its farthest point reaches beyond the
  body (at that height) by `HANDLE_REACH` body radii or more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xdreamer.mesh import Mesh, load_mesh
from xdreamer.toy.world import COLOURS, ToyWorldError, parse_caption, srgb_to_lab

SIDES: tuple[str, ...] = ("front", "right", "back", "left")  # azimuth 0, 90, 180, -90 degrees

FRONT_SHARE = 0.5  # a side carries the front colour when at least this share of it has it
SIDEWAYS = 0.7  # |normal.y| below this: the sample belongs to a side, not to the top or bottom
HANDLE_REACH = 0.45  # in body radii beyond the body: the world's handle reaches 0.76, cube corners 0.29
MIDDLE = (0.2, 0.8)  # the height band (fractions of the object's height) where handles are sought
SLICES = 12  # horizontal slices of the middle band, each with its own body radius
TRIM = 0.1  # samples within TRIM radii of the fitted wall count as wall when refitting the axis
AXIS_ITERATIONS = 4
SAMPLES = 20000  # surface samples per score


@dataclass
class FrontCount:
    """How many sides of a result carry the feature that belongs on the front only.

    feature: "front colour" or "handle"; sides: per side of SIDES the measured value (share of
    the side's area in the front colour, or the reach beyond the body in body radii); found:
    the sides that carry the feature, in SIDES order."""

    feature: str
    sides: dict[str, float]
    found: list[str]

    @property
    def count(self) -> int:
        return len(self.found)

    @property
    def at_front(self) -> bool:
        return "front" in self.found

    @property
    def correct(self) -> bool:
        """Exactly one, at the front: what the world shows."""
        return self.found == ["front"]

    @property
    def multi_face(self) -> bool:
        return self.count > 1

    def to_dict(self) -> dict:
        return {
            "feature": self.feature,
            "sides": {k: round(v, 4) for k, v in self.sides.items()},
            "found": self.found,
            "count": self.count,
            "at_front": self.at_front,
            "correct": self.correct,
            "multi_face": self.multi_face,
        }


def side_index(directions: np.ndarray) -> np.ndarray:
    """(N, 3) directions -> (N,) index into SIDES of the side their horizontal part points to."""
    azimuth = np.degrees(np.arctan2(directions[:, 0], directions[:, 2]))  # 0 at +z, 90 at +x
    return np.round(azimuth / 90.0).astype(np.int64) % 4


def count_front_colour(normals: np.ndarray, colours: np.ndarray, body: str, front: str) -> FrontCount:
    """Sides whose area is mostly in the `front` colour rather than the `body` colour.

    normals: (N, 3) unit normals and colours: (N, 3) sRGB in [0, 1] of equal-area surface
    samples (uniform in area, so a count is an area)."""
    lab = srgb_to_lab(colours)
    nearer_front = np.linalg.norm(lab - srgb_to_lab(COLOURS[front]), axis=-1) < np.linalg.norm(
        lab - srgb_to_lab(COLOURS[body]), axis=-1
    )
    sideways = np.abs(normals[:, 1]) < SIDEWAYS
    side = side_index(normals)
    shares = {}
    for k, name in enumerate(SIDES):
        on_side = sideways & (side == k)
        shares[name] = float(nearer_front[on_side].mean()) if on_side.any() else 0.0
    return FrontCount("front colour", shares, [name for name in SIDES if shares[name] >= FRONT_SHARE])


def _axis(xz: np.ndarray) -> np.ndarray:
    """Centre (2,) of the circle the body's wall samples xz (N, 2) lie on: an algebraic
    least-squares circle fit, refitted on the samples within TRIM radii of the fitted circle
    (so a handle, unlike for a median or a bounding box, does not pull the axis)."""
    keep = np.ones(len(xz), dtype=bool)
    for _ in range(AXIS_ITERATIONS):
        # x^2 + z^2 + D x + E z + F = 0, linear in (D, E, F); centre = -(D, E) / 2.
        a = np.concatenate([xz[keep], np.ones((keep.sum(), 1))], axis=1)
        solution, *_ = np.linalg.lstsq(a, -(xz[keep] ** 2).sum(1), rcond=None)
        centre = -solution[:2] / 2
        radius = np.linalg.norm(xz - centre, axis=-1)
        keep = np.abs(radius - np.median(radius)) <= TRIM * np.median(radius)
    return centre


def count_handles(points: np.ndarray) -> FrontCount:
    """Sides on which something sticks out of the body in the middle of its height.

    points: (N, 3) equal-area surface samples, +y up. The middle band of the height is cut into
    `SLICES` horizontal slices; in each, the body's radius is the median distance of the
    samples from the body's vertical axis (`_axis`), so a tapering body (a cone) is no handle.
    A side's value is the farthest reach of its samples beyond their slice's body radius, in
    radii."""
    low, high = points[:, 1].min(), points[:, 1].max()
    height = (points[:, 1] - low) / max(high - low, 1e-9)
    in_band = (height >= MIDDLE[0]) & (height <= MIDDLE[1])
    xz, height = points[in_band][:, [0, 2]], height[in_band]
    offset = xz - _axis(xz)
    radius = np.linalg.norm(offset, axis=-1)
    slice_index = np.minimum(((height - MIDDLE[0]) / (MIDDLE[1] - MIDDLE[0]) * SLICES).astype(np.int64), SLICES - 1)
    body = np.array([np.median(radius[slice_index == k]) if (slice_index == k).any() else np.inf for k in range(SLICES)])
    relative = radius / body[slice_index] - 1.0
    side = side_index(np.stack([offset[:, 0], np.zeros(len(offset)), offset[:, 1]], axis=-1))
    reach = {name: float(relative[side == k].max()) if (side == k).any() else 0.0 for k, name in enumerate(SIDES)}
    return FrontCount("handle", reach, [name for name in SIDES if reach[name] >= HANDLE_REACH])


def sample_mesh(mesh: Mesh, count: int = SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Equal-area surface samples of a mesh: points (N, 3) and their face normals (N, 3)."""
    import trimesh

    surface = mesh.to_trimesh()
    points, faces = trimesh.sample.sample_surface(surface, count, seed=seed)
    return np.asarray(points), np.asarray(surface.face_normals[faces])


def sample_glb(path: str | Path, count: int = SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-area samples of an exported GLB (xdreamer's export: one textured primitive):
    points (N, 3), face normals (N, 3) and base colour (N, 3) sRGB in [0, 1] from its
    baseColorTexture (times baseColorFactor)."""
    import trimesh
    from trimesh.visual.color import uv_to_interpolated_color

    scene = trimesh.load(path)
    surface = next(iter(scene.geometry.values())) if hasattr(scene, "geometry") else scene
    points, faces, barycentric = trimesh.sample.sample_surface(surface, count, seed=seed, return_barycentric=True)
    material = surface.visual.material
    factor = np.asarray(material.baseColorFactor if material.baseColorFactor is not None else [255] * 4, dtype=np.float64)[:3] / 255.0
    if material.baseColorTexture is None:
        colours = np.broadcast_to(factor, (len(points), 3))
    else:
        uv = (surface.visual.uv[surface.faces[faces]] * barycentric[:, :, None]).sum(1)
        colours = uv_to_interpolated_color(uv, material.baseColorTexture)[:, :3] / 255.0 * factor
    return np.asarray(points), np.asarray(surface.face_normals[faces]), np.asarray(colours, dtype=np.float64)


def score_front_run(run_dir: str | Path, prompt: str) -> FrontCount:
    """Count fronts on a finished run of a prompt naming an object with a front: the front
    colour on the baked base colour of export/model.glb, handles on geometry/mesh.ply."""
    thing = parse_caption(prompt)
    if not thing.has_front:
        raise ToyWorldError(f"{prompt!r} names no object with a front (a mug, or a cube 'with a blue front')")
    run_dir = Path(run_dir)
    if thing.front is not None:
        _, normals, colours = sample_glb(run_dir / "export" / "model.glb")
        return count_front_colour(normals, colours, thing.colour, thing.front)
    points, _ = sample_mesh(load_mesh(run_dir / "geometry" / "mesh.ply"))
    return count_handles(points)
