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

Each error is averaged over 4 noise draws (fixed seeds). Takes about a minute on one CPU thread,
and 10 s more per run folder.

Run: HF_HUB_OFFLINE=1 python benchmarks/toy_shape_knowledge.py [--model DIR] [RUN_DIR ...]
(--model: another exported toy model, e.g. a `xdreamer toy train` output's model/; default the
shipped one.)
"""

from __future__ import annotations

import argparse
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
from xdreamer.toy.world import SHAPES, Placement, ToyObject, caption, parse_caption

RADIUS = 0.75  # bounding radius of the rendered object, the middle of the world's placements
COLOUR = {"sphere": "green", "cube": "red", "cylinder": "blue", "cone": "purple", "torus": "yellow", "pyramid": "white"}
TIMESTEPS = (100, 300, 450, 600, 800)
NOISE_DRAWS = 4


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


def main(run_dirs: list[Path], model: str = "toy") -> None:
    toy = load_guidance_model(model, "cpu")
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
        mesh = normalize_mesh(load_mesh(run / "geometry" / "mesh.ply"))
        with torch.no_grad():
            out = render_geometry(Mesh(mesh.vertices * RADIUS, mesh.faces), cameras, 128, backend="torch")
        x0 = toy.encode_images((out["normal"] * 0.5 + 0.5) * out["mask"])
        cells = preference_cells(toy, x0, thing.shape, thing.colour)
        print(f"| {run} ({thing.colour} {thing.shape}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="an exported toy model folder (default: the shipped one)")
    parser.add_argument("runs", nargs="*", type=Path, help="run folders of `xdreamer generate` on toy prompts")
    args = parser.parse_args()
    main(args.runs, args.model)
