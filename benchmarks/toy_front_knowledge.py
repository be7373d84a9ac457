"""Whether the toy model can paint a cube's front: markdown tables of how much of its denoised
images and of its samples is in the front colour.

Score distillation asks the guidance model to denoise renders of the current object. For a cube with
a front ("a red cube with a blue front") the appearance stage starts from a cube of one colour, so
the first table asks: given front views (azimuth -30 to 30 degrees) of the world's plain cube in the
body colour, noised at t and denoised under the front caption ("..., front view"), what share of the
object's pixels does the predicted clean image x0 give the front colour? The same for renders of the
cube that has its front (the model should keep it), and for those under the plain caption ("a red
cube, front view"; the front should fade). At guidance 1 (the toy preset's appearance stage) and 7.5.
For the plain cube it also gives where x0 paints the front colour, on the front face against the
other faces: score distillation can only grow a front from pushes that land on the same face from
every view.

The second table samples from pure noise (DDIM, 25 steps, guidance 4) under the front caption with
each view word: the share of the foreground in the front colour. A model that knows where the front
goes gives it in front views and not in back views.

A pixel counts as front colour when its hue and chroma (CIELAB a*, b*) are nearer the front colour's
than the body colour's. Blurred, greyed predictions at high t count for a white front.
Takes about a minute on one CPU thread.

Run: HF_HUB_OFFLINE=1 python benchmarks/toy_front_knowledge.py [--model DIR]
"""

from __future__ import annotations

import argparse

import torch

from xdreamer.guidance.loader import load_guidance_model
from xdreamer.guidance.sds import predict_noise
from xdreamer.pipeline.guide import GuideOutput
from xdreamer.render.camera import spherical_cameras
from xdreamer.render.light import default_environment
from xdreamer.toy.dataset import render_placed
from xdreamer.toy.train import encode_text, make_scheduler, sample
from xdreamer.toy.world import COLOURS, Placement, ToyObject, srgb_to_lab

PAIRS = (("red", "blue"), ("yellow", "red"), ("white", "blue"), ("green", "white"))  # (body, front)
TIMESTEPS = (200, 400, 600, 800)
GUIDANCE = (1.0, 7.5)
SAMPLES = 8


def front_cameras():
    """8 front views: azimuth -30, -10, 10, 30 degrees at elevation 10 and 30, radius 3, fov 35."""
    azimuth = torch.tensor([-30.0, -10.0, 10.0, 30.0]).repeat(2)
    elevation = torch.tensor([10.0, 30.0]).repeat_interleave(4)
    full = lambda value: torch.full((8,), float(value))  # noqa: E731
    return spherical_cameras(elevation, azimuth, full(3.0), torch.deg2rad(full(35.0)))


def in_front_colour(images: torch.Tensor, body: str, front: str) -> torch.Tensor:
    """images (B, H, W, 3) sRGB in [0, 1] -> (B, H, W) bool: nearer the front colour than the
    body colour in CIELAB's a*b* plane (hue and chroma; the lightness is left out because shading
    changes it: a shadowed red face is nearer a blue one than a lit red one in L*a*b*)."""
    ab = torch.as_tensor(srgb_to_lab(images.reshape(-1, 3).numpy()))[:, 1:]
    to_front = (ab - torch.as_tensor(srgb_to_lab(COLOURS[front]))[1:]).norm(dim=-1)
    to_body = (ab - torch.as_tensor(srgb_to_lab(COLOURS[body]))[1:]).norm(dim=-1)
    return (to_front < to_body).reshape(images.shape[:-1])


def front_share(images: torch.Tensor, foreground: torch.Tensor, body: str, front: str) -> float:
    """images (B, H, W, 3), foreground (B, H, W) bool -> share of the foreground in the front colour."""
    return float(in_front_colour(images, body, front)[foreground].float().mean()) if foreground.any() else 0.0


def predictions(toy, x0: torch.Tensor, t: int, text: str) -> GuideOutput:
    """x0 (B, 3, 32, 32) noised at t (fixed noise) and the model's conditional (`text`) and
    unconditional noise predictions, as a GuideOutput whose `denoised(scale)` is the clean image
    score distillation pulls toward at that guidance scale."""
    steps = torch.full((x0.shape[0],), t)
    alphas = toy.alphas_cumprod[steps]
    a = alphas.view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        context = encode_text(toy.text_encoder, toy.tokenizer, [text] * len(x0) + [""] * len(x0))
        conditional, unconditional = predict_noise(toy, torch.cat([noisy, noisy]), steps.repeat(2), context).chunk(2)
    return GuideOutput({}, False, None, None, x0, noise, unconditional, conditional, alphas)


def main(model: str = "toy") -> None:
    toy = load_guidance_model(model, "cpu")
    cameras = front_cameras()
    placement = Placement(0.75, 0.0, (0.0, 0.0, 0.0))
    print("| render | caption | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " |")
    print("|---|---|" + "---:|" * len(TIMESTEPS))
    for body, front in PAIRS:
        fronted = ToyObject("cube", body, front)
        renders = {}
        for thing in (ToyObject("cube", body), fronted):
            with torch.no_grad():
                out = render_placed(thing, placement, cameras, 32, 0.6, default_environment())
            renders[thing] = (toy.encode_images(out["shaded"]), out["mask"][..., 0] > 0.5)
        x0, mask = renders[fronted]
        front_face = in_front_colour(toy.decode_images(x0), body, front) & mask
        cases = (
            (f"plain {body} cube", ToyObject("cube", body), fronted.caption("front")),
            (f"{body} cube, {front} front", fronted, fronted.caption("front")),
            (f"{body} cube, {front} front", fronted, ToyObject("cube", body).caption("front")),
        )
        for label, thing, text in cases:
            x0, mask = renders[thing]
            cells = []
            for t in TIMESTEPS:
                prediction = predictions(toy, x0, t, text)
                shares = []
                for g in GUIDANCE:
                    painted = in_front_colour(toy.decode_images(prediction.denoised(g)), body, front) & mask
                    share = f"{100 * float(painted[mask].float().mean()):.0f} %"
                    if thing.front is None:  # where it paints: on the front face, on the other faces
                        rest = mask & ~front_face
                        share += (f" ({100 * float(painted[front_face].float().mean()):.0f}"
                                  f" : {100 * float(painted[rest].float().mean()):.0f})")
                    shares.append(share)
                cells.append(" / ".join(shares))
            input_share = front_share(toy.decode_images(x0), mask, body, front)
            print(f"| {label} ({100 * input_share:.0f} % front) | \"{text}\" | " + " | ".join(cells) + " |")
    print(f"\nCells: front-colour share of x0 at guidance {' / '.join(str(g) for g in GUIDANCE)}; in brackets, for the "
          "plain cube, the % of the front face (where the cube with its front has it) : of the other faces.\n")
    views = ("front", "side", "back")
    print("| caption | " + " | ".join(f"{v} view" for v in views) + " |")
    print("|---|" + "---:|" * len(views))
    for body, front in PAIRS:
        fronted = ToyObject("cube", body, front)
        cells = []
        for view in views:
            images = sample(toy.unet, toy.text_encoder, toy.tokenizer, make_scheduler(), [fronted.caption(view)] * SAMPLES,
                            torch.Generator().manual_seed(0))
            cells.append(f"{100 * front_share(images, images.max(-1).values > 0.15, body, front):.0f} %")
        print(f"| \"{fronted.caption()}\" | " + " | ".join(cells) + " |")
    print(f"\nCells: front-colour share of the foreground of {SAMPLES} samples (DDIM 25 steps, guidance 4, seed 0).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="an exported toy model folder (default: the shipped one)")
    main(parser.parse_args().model)
