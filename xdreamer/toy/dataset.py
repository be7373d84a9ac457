"""Rendered training images of the toy world, made by xdreamer's own renderer.

Each image is one placed object (`training_objects`) seen by a camera from the distribution the
geometry and appearance stages sample, in the two forms those stages feed the guidance model: a
PBR render under the default environment (appearance stage) and a world-space normal map
(geometry stage), captioned with ", normal map" so the two modes stay apart.
The background is black in both: image = value * mask. Renders are made at `supersample` times
the model resolution and resized exactly as the guidance loader resizes renders for a pixel model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from xdreamer.atomic import atomic_path
from xdreamer.mesh import Mesh
from xdreamer.render.camera import Cameras, CameraSampling, sample_cameras
from xdreamer.render.light import EnvironmentLight, default_environment
from xdreamer.render.passes import render_geometry
from xdreamer.render.shade import render_pbr, srgb_to_linear
from xdreamer.toy.world import (
    COLOURS,
    CONTRAST_SHAPES,
    OBJECT_SHAPES,
    VIEWS,
    Placement,
    ToyObject,
    primitive_mesh,
    sample_placement,
    training_objects,
)


ROUGHNESS_RANGE = (0.3, 0.9)
# The paper's cameras stop at 45 degrees of elevation; a few higher views teach "overhead view",
# from the elevations the stages' overhead views take (`camera.overhead_fraction`; the toy preset
# matches OVERHEAD_EVERY with 1/8).
OVERHEAD_SAMPLING = CameraSampling(elevation_deg=CameraSampling.overhead_elevation_deg)
OVERHEAD_EVERY = 8  # one placement in eight of every object is seen from above


def is_overhead(placement: int, objects: int) -> bool:
    """Whether placement number `placement` of a dataset cycling through `objects` objects is
    seen from above. The object's own count of placements is staggered by the object's index, so
    every object gets one placement in `OVERHEAD_EVERY` from above; counting placements alone
    (dataset v2) gave all 20 of the objects whose index is 7 mod 8 when `objects` is a multiple
    of 8: the red cube and the yellow torus were never seen from the side."""
    thing, round_ = placement % objects, placement // objects
    return (thing + round_) % OVERHEAD_EVERY == OVERHEAD_EVERY - 1


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, size, size, C), the resize GuidanceModel.encode_images applies to
    renders before a pixel-space model sees them (bilinear, antialiased)."""
    x = images.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1)


def surface_material(albedo: Callable[[torch.Tensor], torch.Tensor], roughness: float):
    """A material_fn for render_pbr: base colour albedo(world positions (N, 3)) -> (N, 3) sRGB
    (as linear kd), the given roughness, not metallic, unoccluded, unperturbed normals."""

    def material_fn(positions: torch.Tensor) -> dict[str, torch.Tensor]:
        n = positions.shape[0]
        like = positions.new_zeros(n, 1)
        return {
            "kd": srgb_to_linear(albedo(positions)),
            "roughness": like + roughness,
            "metallic": like,
            "occlusion": like,
            "normal_perturbation": torch.tensor([0.0, 0.0, 1.0]).to(positions).expand(n, 3),
        }

    return material_fn


def constant_material(colour: str, roughness: float):
    """`surface_material` in one colour of COLOURS."""
    srgb = torch.tensor(COLOURS[colour])
    return surface_material(lambda positions: srgb.to(positions).expand(positions.shape[0], 3), roughness)


def render_object(
    mesh: Mesh,
    colour: str | Callable[[torch.Tensor], torch.Tensor],
    cameras: Cameras,
    resolution: int,
    roughness: float,
    light: EnvironmentLight,
    supersample: int = 4,
) -> dict[str, torch.Tensor]:
    """A placed mesh in one colour (a COLOURS name) or coloured by a function of world positions
    (N, 3) -> sRGB (N, 3), rendered at `supersample` x `resolution` and resized.

    Returns shaded (B, r, r, 3) sRGB PBR render, normal (B, r, r, 3) world normal * 0.5 + 0.5,
    mask (B, r, r, 1); both images are black where the mask is 0 (value * coverage)."""
    size = resolution * supersample
    geometry = render_geometry(mesh, cameras, size, backend="torch")
    # The antialiased normal is already normal * coverage; the 0.5 offset is weighted the same.
    normal = (0.5 * geometry["normal"] + 0.5 * geometry["mask"]).clamp(0, 1)
    material = constant_material(colour, roughness) if isinstance(colour, str) else surface_material(colour, roughness)
    pbr = render_pbr(mesh, cameras, size, material, light, background=(0.0, 0.0, 0.0), backend="torch")
    return {
        "shaded": downsample(pbr["rgb"].clamp(0, 1), resolution),
        "normal": downsample(normal, resolution),
        "mask": downsample(geometry["mask"], resolution),
    }


def render_placed(
    thing: ToyObject,
    placement: Placement,
    cameras: Cameras,
    resolution: int,
    roughness: float,
    light: EnvironmentLight,
    supersample: int = 4,
    mesh: Mesh | None = None,
) -> dict[str, torch.Tensor]:
    """`render_object` of a world object at a placement, coloured by `ToyObject.albedo` (a cube's
    front stays on its own face however it is placed). `mesh`: its canonical mesh, if at hand."""
    mesh = primitive_mesh(thing.shape) if mesh is None else mesh

    def albedo(positions: torch.Tensor) -> torch.Tensor:
        return thing.albedo(placement.to_local(positions))

    return render_object(placement.apply(mesh), albedo, cameras, resolution, roughness, light, supersample)


@dataclass
class ToyDataset:
    """images: (N, H, W, 3) uint8 sRGB on black; shape, colour, view: (N,) int64 indices into
    OBJECT_SHAPES, COLOURS, VIEWS; front: (N,) int64 index into COLOURS of a cube's front
    colour, -1 for none; normal_map: (N,) bool, True for normal-map images."""

    images: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    front: torch.Tensor
    view: torch.Tensor
    normal_map: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def object(self, index: int) -> ToyObject:
        front = int(self.front[index])
        colours = list(COLOURS)
        return ToyObject(OBJECT_SHAPES[int(self.shape[index])], colours[int(self.colour[index])], None if front < 0 else colours[front])

    def caption(self, index: int, with_view: bool = True) -> str:
        """The object's caption, with ", normal map" on normal-map images and the view suffix
        when `with_view`."""
        view = VIEWS[int(self.view[index])] if with_view else None
        return self.object(index).caption(view, normal_map=bool(self.normal_map[index]))

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, tmp)

    @staticmethod
    def load(path: str | Path) -> ToyDataset:
        return ToyDataset(**torch.load(path, weights_only=True))


def build_dataset(
    placements: int,
    resolution: int,
    generator: torch.Generator,
    views_per_placement: int = 4,
    supersample: int = 4,
    progress: bool = False,
    light: EnvironmentLight | None = None,
) -> ToyDataset:
    """Render `placements` random placements, cycling through `training_objects()` (held-out
    pairs and objects never appear; objects with a front face +z within a few degrees), each
    from `views_per_placement` azimuth-stratified cameras, in both modes:
    2 * placements * views_per_placement images. `light` defaults to default_environment()."""
    from tqdm import tqdm

    light = default_environment() if light is None else light
    objects = training_objects()
    meshes = {shape: primitive_mesh(shape) for shape in {o.shape for o in objects}}
    colour_names = list(COLOURS)
    images, shapes, colours, fronts, views, normal_maps = [], [], [], [], [], []
    for i in tqdm(range(placements), desc="rendering toy dataset", disable=not progress):
        thing = objects[i % len(objects)]
        placement = sample_placement(generator, facing=thing.has_front, box=thing.shape in CONTRAST_SHAPES)
        sampling = OVERHEAD_SAMPLING if is_overhead(i, len(objects)) else CameraSampling()
        cameras = sample_cameras(views_per_placement, generator, sampling)
        roughness = ROUGHNESS_RANGE[0] + (ROUGHNESS_RANGE[1] - ROUGHNESS_RANGE[0]) * float(
            torch.rand((), generator=generator, dtype=torch.float64)
        )
        with torch.no_grad():
            out = render_placed(thing, placement, cameras, resolution, roughness, light, supersample, meshes[thing.shape])
        labels = torch.tensor([VIEWS.index(v) for v in cameras.view_labels()])
        front = -1 if thing.front is None else colour_names.index(thing.front)
        for mode in ("shaded", "normal"):
            images.append((out[mode] * 255).round().to(torch.uint8))
            shapes.append(torch.full((views_per_placement,), OBJECT_SHAPES.index(thing.shape)))
            colours.append(torch.full((views_per_placement,), colour_names.index(thing.colour)))
            fronts.append(torch.full((views_per_placement,), front))
            views.append(labels)
            normal_maps.append(torch.full((views_per_placement,), mode == "normal"))
    return ToyDataset(
        images=torch.cat(images),
        shape=torch.cat(shapes),
        colour=torch.cat(colours),
        front=torch.cat(fronts),
        view=torch.cat(views),
        normal_map=torch.cat(normal_maps),
    )
