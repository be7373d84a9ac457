"""Rendered training images of the toy world, made by xdreamer's own renderer.

Each image is one placed primitive seen by a camera from the distribution the geometry and
appearance stages sample, in the two forms those stages feed the guidance model: a PBR render
under the default environment (appearance stage) and a world-space normal map (geometry stage).
The background is black in both: image = value * mask. Renders are made at `supersample` times
the model resolution and resized exactly as the guidance loader resizes renders for a pixel model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from xdreamer.atomic import atomic_path
from xdreamer.mesh import Mesh
from xdreamer.render.camera import Cameras, CameraSampling, sample_cameras
from xdreamer.render.light import EnvironmentLight, default_environment
from xdreamer.render.passes import render_geometry
from xdreamer.render.shade import render_pbr, srgb_to_linear
from xdreamer.toy.world import COLOURS, SHAPES, VIEWS, Placement, caption, primitive_mesh, sample_placement, training_pairs

ROUGHNESS_RANGE = (0.3, 0.9)
# The stages' cameras stop at 45 degrees of elevation; a few higher views teach "overhead view".
OVERHEAD_SAMPLING = CameraSampling(elevation_deg=(60.0, 80.0))
OVERHEAD_EVERY = 8  # one placement in eight is seen from above


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, size, size, C), the resize GuidanceModel.encode_images applies to
    renders before a pixel-space model sees them (bilinear, antialiased)."""
    x = images.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1)


def constant_material(colour: str, roughness: float):
    """A material_fn for render_pbr: one sRGB colour from COLOURS (as linear kd), the given
    roughness, not metallic, unoccluded, unperturbed normals."""
    kd = srgb_to_linear(torch.tensor(COLOURS[colour]))

    def material_fn(positions: torch.Tensor) -> dict[str, torch.Tensor]:
        n = positions.shape[0]
        like = positions.new_zeros(n, 1)
        return {
            "kd": kd.to(positions).expand(n, 3),
            "roughness": like + roughness,
            "metallic": like,
            "occlusion": like,
            "normal_perturbation": torch.tensor([0.0, 0.0, 1.0]).to(positions).expand(n, 3),
        }

    return material_fn


def render_object(
    mesh: Mesh,
    colour: str,
    cameras: Cameras,
    resolution: int,
    roughness: float,
    light: EnvironmentLight,
    supersample: int = 4,
) -> dict[str, torch.Tensor]:
    """A placed mesh in one colour, rendered at `supersample` x `resolution` and resized.

    Returns shaded (B, r, r, 3) sRGB PBR render, normal (B, r, r, 3) world normal * 0.5 + 0.5,
    mask (B, r, r, 1); both images are black where the mask is 0 (value * coverage)."""
    size = resolution * supersample
    geometry = render_geometry(mesh, cameras, size, backend="torch")
    # The antialiased normal is already normal * coverage; the 0.5 offset is weighted the same.
    normal = (0.5 * geometry["normal"] + 0.5 * geometry["mask"]).clamp(0, 1)
    pbr = render_pbr(mesh, cameras, size, constant_material(colour, roughness), light, background=(0.0, 0.0, 0.0), backend="torch")
    return {
        "shaded": downsample(pbr["rgb"].clamp(0, 1), resolution),
        "normal": downsample(normal, resolution),
        "mask": downsample(geometry["mask"], resolution),
    }


@dataclass
class ToyDataset:
    """images: (N, H, W, 3) uint8 sRGB on black; shape, colour, view: (N,) int64 indices into
    SHAPES, COLOURS, VIEWS; normal_map: (N,) bool, True for normal-map images."""

    images: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    view: torch.Tensor
    normal_map: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def caption(self, index: int, with_view: bool = True) -> str:
        view = VIEWS[int(self.view[index])] if with_view else None
        return caption(SHAPES[int(self.shape[index])], list(COLOURS)[int(self.colour[index])], view)

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
    """Render `placements` random placements, cycling through the training pairs (held-out pairs
    never appear), each from `views_per_placement` azimuth-stratified cameras, in both modes:
    2 * placements * views_per_placement images. `light` defaults to default_environment()."""
    from tqdm import tqdm

    light = default_environment() if light is None else light
    pairs = training_pairs()
    meshes = {shape: primitive_mesh(shape) for shape in SHAPES}
    colour_names = list(COLOURS)
    images, shapes, colours, views, normal_maps = [], [], [], [], []
    for i in tqdm(range(placements), desc="rendering toy dataset", disable=not progress):
        shape, colour = pairs[i % len(pairs)]
        placement: Placement = sample_placement(generator)
        sampling = OVERHEAD_SAMPLING if i % OVERHEAD_EVERY == OVERHEAD_EVERY - 1 else CameraSampling()
        cameras = sample_cameras(views_per_placement, generator, sampling)
        roughness = ROUGHNESS_RANGE[0] + (ROUGHNESS_RANGE[1] - ROUGHNESS_RANGE[0]) * float(
            torch.rand((), generator=generator, dtype=torch.float64)
        )
        with torch.no_grad():
            out = render_object(placement.apply(meshes[shape]), colour, cameras, resolution, roughness, light, supersample)
        labels = torch.tensor([VIEWS.index(v) for v in cameras.view_labels()])
        for mode in ("shaded", "normal"):
            images.append((out[mode] * 255).round().to(torch.uint8))
            shapes.append(torch.full((views_per_placement,), SHAPES.index(shape)))
            colours.append(torch.full((views_per_placement,), colour_names.index(colour)))
            views.append(labels)
            normal_maps.append(torch.full((views_per_placement,), mode == "normal"))
    return ToyDataset(
        images=torch.cat(images),
        shape=torch.cat(shapes),
        colour=torch.cat(colours),
        view=torch.cat(views),
        normal_map=torch.cat(normal_maps),
    )
