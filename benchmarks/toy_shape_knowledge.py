"""How well the shipped toy model tells the world's shapes apart in normal-map mode, per noise level:
a markdown table of denoising errors.

For each primitive (in one held-in colour) the normal maps of 8 views around it, rendered as the
training data is (32x32, bounding radius 0.75, turned 0.4 rad), are noised at t and denoised under
"a <colour> <shape>, normal map" and under the same caption with each other shape. The table gives,
per t, the error under the right caption divided by the smallest error under a wrong one, and which
wrong shape that is: below 1 the model prefers the right shape at that noise level, near 1 it cannot
tell the two apart there. Score distillation shapes the geometry with t in [0.02, 0.6] (the toy
preset): what the model cannot tell apart at those t, SDS cannot sculpt.

Given run folders of `xdreamer generate` (toy prompts), the same row for each run's final mesh,
normalized to the same bounding radius and rendered with the same cameras as a normal map: how far
the model's preference for the prompted shape got on what score distillation made of it.

With --box-heights, instead: which height the model prefers for a cube. The world's cube is
stretched along its vertical axis by each factor in BOX_HEIGHTS (renormalized to the same bounding
radius, turned 0.4 rad), rendered as above from 8 views at each elevation in BOX_ELEVATIONS, and
denoised at each t under "a red cube, normal map" and under the empty caption. Per elevation and t
the table gives the factor with the smallest error under the caption (what the conditional model
calls most likely) and the factor with the largest margin of the empty caption's error over the
caption's (what the implicit classifier log p(caption | image) prefers; classifier-free guidance at
scale w pushes along it w - 1 times, so at the toy preset's 20 it decides the shape). Generated
cubes come out 3-11 % lower than wide; this shows whether the model asks for that.

Each error is averaged over 4 noise draws (fixed seeds). Takes about a minute on one CPU thread,
and 10 s more per run folder; --box-heights about 4 minutes.

Run: HF_HUB_OFFLINE=1 python benchmarks/toy_shape_knowledge.py [--model DIR] [--box-heights] [RUN_DIR ...]
(--model: another exported toy model, e.g. a `xdreamer toy train` output's model/; default the
shipped one.)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from xdreamer.geometry.init import normalize_mesh
from xdreamer.guidance.loader import load_guidance_model
from xdreamer.guidance.sds import predict_noise
from xdreamer.mesh import Mesh, load_mesh
from xdreamer.render.camera import orbit_cameras
from xdreamer.render.light import default_environment
from xdreamer.render.passes import render_geometry
from xdreamer.toy.dataset import render_placed
from xdreamer.toy.train import encode_text
from xdreamer.toy.world import SHAPES, Placement, ToyObject, caption, parse_caption, primitive_mesh

RADIUS = 0.75  # bounding radius of the rendered object, the middle of the world's placements
COLOUR = {"sphere": "green", "cube": "red", "cylinder": "blue", "cone": "purple", "torus": "yellow", "pyramid": "white"}
TIMESTEPS = (100, 300, 450, 600, 800)
NOISE_DRAWS = 4
BOX_HEIGHTS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
BOX_ELEVATIONS = (-15.0, 0.0, 20.0, 40.0, 70.0)  # the toy preset looks from -20 to 45, 1 view in 8 from 60-80


def denoising_error(toy, x0: torch.Tensor, t: int, text: str) -> float:
    """Mean epsilon-prediction error on x0 (B, 3, 32, 32) noised at t, over NOISE_DRAWS draws."""
    steps = torch.full((x0.shape[0],), t)
    a = toy.alphas_cumprod[steps].view(-1, 1, 1, 1)
    errors = []
    with torch.no_grad():
        context = encode_text(toy.text_encoder, toy.tokenizer, [text] * x0.shape[0])
        for draw in range(NOISE_DRAWS):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(draw))
            eps = predict_noise(toy, a.sqrt() * x0 + (1 - a).sqrt() * noise, steps, context)
            errors.append((eps - noise).pow(2).mean().item())
    return sum(errors) / len(errors)


def preference_cells(toy, x0: torch.Tensor, shape: str, colour: str) -> list[str]:
    """Per t: error under the right caption / the smallest under another shape's, and that shape."""
    cells = []
    for t in TIMESTEPS:
        own = denoising_error(toy, x0, t, caption(shape, colour, normal_map=True))
        wrong = {other: denoising_error(toy, x0, t, caption(other, colour, normal_map=True))
                 for other in SHAPES if other != shape}
        nearest = min(wrong, key=wrong.get)
        cells.append(f"{own / wrong[nearest]:.2f} ({nearest})")
    return cells


def normal_maps(toy, mesh: Mesh, cameras) -> torch.Tensor:
    """The model's input (B, 3, 32, 32): `mesh` normalized to bounding radius RADIUS, rendered at
    128x128 as the geometry stage renders its normal maps."""
    mesh = normalize_mesh(mesh)
    with torch.no_grad():
        out = render_geometry(Mesh(mesh.vertices * RADIUS, mesh.faces), cameras, 128, backend="torch")
    return toy.encode_images((out["normal"] * 0.5 + 0.5) * out["mask"])


def stretched_cube(height: float, yaw: float = 0.4) -> Mesh:
    """The world's cube scaled by `height` along y and turned `yaw` radians about y."""
    cube = primitive_mesh("cube")
    x, y, z = cube.vertices.unbind(-1)
    c, s = math.cos(yaw), math.sin(yaw)
    return Mesh(torch.stack([c * x + s * z, y * height, -s * x + c * z], dim=-1), cube.faces)


def box_height_table(toy) -> None:
    """Per elevation and t, the cube height the conditional model and the implicit classifier prefer."""
    text = caption("cube", "red", normal_map=True)
    print("| elevation | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " |")
    print("|---:|" + "---:|" * len(TIMESTEPS))
    boxes = [stretched_cube(h) for h in BOX_HEIGHTS]
    for elevation in BOX_ELEVATIONS:
        cameras = orbit_cameras(8, elevation=elevation, start_azimuth=20.0)
        images = [normal_maps(toy, box, cameras) for box in boxes]
        cells = []
        for t in TIMESTEPS:
            own = [denoising_error(toy, x0, t, text) for x0 in images]
            margin = [denoising_error(toy, x0, t, "") - e for x0, e in zip(images, own)]
            conditional = BOX_HEIGHTS[min(range(len(own)), key=own.__getitem__)]
            classifier = BOX_HEIGHTS[max(range(len(margin)), key=margin.__getitem__)]
            cells.append(f"{conditional:.2f} / {classifier:.2f}")
        print(f"| {elevation:+.0f}° | " + " | ".join(cells) + " |")


def main(run_dirs: list[Path], model: str = "toy", box_heights: bool = False) -> None:
    toy = load_guidance_model(model, "cpu")
    if box_heights:
        box_height_table(toy)
        return
    cameras = orbit_cameras(8, elevation=20.0, start_azimuth=10.0)
    print("| normal maps of | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " |")
    print("|---|" + "---:|" * len(TIMESTEPS))
    for shape in SHAPES:
        colour = COLOUR[shape]
        with torch.no_grad():
            image = render_placed(ToyObject(shape, colour), Placement(RADIUS, 0.4, (0.0, 0.0, 0.0)), cameras, 32, 0.6,
                                  default_environment())["normal"]
        cells = preference_cells(toy, toy.encode_images(image), shape, colour)
        print(f"| the world's {colour} {shape} | " + " | ".join(cells) + " |")
    for run in run_dirs:
        thing = parse_caption(str(OmegaConf.load(run / "config.yaml").prompt))
        x0 = normal_maps(toy, load_mesh(run / "geometry" / "mesh.ply"), cameras)
        cells = preference_cells(toy, x0, thing.shape, thing.colour)
        print(f"| {run} ({thing.colour} {thing.shape}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="an exported toy model folder (default: the shipped one)")
    parser.add_argument("--box-heights", action="store_true", help="the cube height the model prefers, per elevation and t")
    parser.add_argument("runs", nargs="*", type=Path, help="run folders of `xdreamer generate` on toy prompts")
    args = parser.parse_args()
    main(args.runs, args.model, args.box_heights)
