"""The toy-world benchmark: generate each prompt, then score the asset against the prompt's ground
truth — the shape (nearest primitive by Chamfer distance), the colour (named colour nearest the
mean baked albedo in CIELAB) and the volumetric IoU with the prompted primitive.

The runs themselves are made by a `generate` callable handed in by the caller (the CLI passes the
pipeline's), so this module only knows the toy world and how to score a run directory."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from xdreamer.atomic import write_json, write_text
from xdreamer.geometry.init import MeshSDF, normalize_mesh, volumetric_iou
from xdreamer.mesh import Mesh, load_mesh
from xdreamer.toy.world import COLOURS, HELD_OUT, SHAPES, ToyWorldError, caption, ground_truth_sdf, primitive_mesh

# Held-in prompts cover every shape and colour once; held-out are the six pairs never trained on.
HELD_IN_PROMPTS = [
    caption("cube", "red"),
    caption("sphere", "green"),
    caption("cylinder", "blue"),
    caption("torus", "yellow"),
    caption("cone", "purple"),
    caption("pyramid", "white"),
    caption("sphere", "orange"),
    caption("cube", "gray"),
]
HELD_OUT_PROMPTS = [caption(shape, colour) for shape, colour in sorted(HELD_OUT)]

ABLATIONS: dict[str, list[str]] = {
    "full": [],
    "no_cg_lora": ["cg_lora.enabled=false"],
    "no_ama": ["ama.enabled=false"],
    "neither": ["cg_lora.enabled=false", "ama.enabled=false"],
}

_YAWS = np.deg2rad(np.arange(0.0, 90.0, 7.5))  # cube and pyramid repeat every 90 degrees about +y


def parse_prompt(prompt: str) -> tuple[str, str]:
    """'a red cube' -> ('cube', 'red'); exactly one known shape and one known colour."""
    words = re.findall(r"[a-z]+", prompt.lower())
    shapes = [w for w in words if w in SHAPES]
    colours = [w for w in words if w in COLOURS]
    if len(shapes) != 1 or len(colours) != 1:
        raise ToyWorldError(
            f"toy prompt {prompt!r} must name one shape ({', '.join(SHAPES)}) and one colour ({', '.join(COLOURS)})"
        )
    return shapes[0], colours[0]


def _yaw(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]).T


def _surface_points(mesh: Mesh, count: int, seed: int = 0) -> np.ndarray:
    import trimesh

    points, _ = trimesh.sample.sample_surface(mesh.to_trimesh(), count, seed=seed)
    return np.asarray(points)


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer distance: mean nearest-neighbour distance both ways, averaged."""
    from scipy.spatial import cKDTree

    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def shape_distances(mesh: Mesh, samples: int = 3000) -> dict[str, tuple[float, float]]:
    """Chamfer distance from the normalized `mesh` to each normalized primitive, minimized over
    rotations about +y (the generated object's yaw is arbitrary): {shape: (distance, yaw)}."""
    generated = _surface_points(normalize_mesh(mesh), samples, seed=1)
    result = {}
    for shape in SHAPES:
        reference = _surface_points(primitive_mesh(shape), samples, seed=2)
        best = min((chamfer(generated, _yaw(reference, yaw)), yaw) for yaw in _YAWS)
        result[shape] = (float(best[0]), float(best[1]))
    return result


def mean_albedo(glb: Path) -> np.ndarray:
    """Area-weighted mean base colour (sRGB, (3,)) of an exported GLB, averaged in linear space."""
    import trimesh

    scene = trimesh.load(glb)
    geometry = next(iter(scene.geometry.values())) if hasattr(scene, "geometry") else scene
    colours = geometry.visual.to_color().vertex_colors[:, :3].astype(np.float64) / 255.0
    area = np.zeros(len(geometry.vertices))
    np.add.at(area, geometry.faces.reshape(-1), np.repeat(geometry.area_faces / 3.0, 3))
    linear = np.where(colours <= 0.04045, colours / 12.92, ((colours + 0.055) / 1.055) ** 2.4)
    mean = (linear * area[:, None]).sum(0) / area.sum()
    return np.where(mean <= 0.0031308, mean * 12.92, 1.055 * mean ** (1 / 2.4) - 0.055)


def nearest_colour(srgb: np.ndarray) -> tuple[str, float]:
    """The named toy colour nearest `srgb` in CIELAB (OpenCV's conversion), and its ΔE."""
    import cv2

    def lab(rgb) -> np.ndarray:
        return cv2.cvtColor(np.asarray(rgb, dtype=np.float32).reshape(1, 1, 3), cv2.COLOR_RGB2Lab).reshape(3)

    target = lab(srgb)
    distances = {name: float(np.linalg.norm(lab(value) - target)) for name, value in COLOURS.items()}
    name = min(distances, key=distances.get)
    return name, distances[name]


@dataclass
class Score:
    prompt: str
    split: str  # held-in | held-out
    ablation: str
    shape: str
    colour: str
    predicted_shape: str
    predicted_colour: str
    shape_correct: bool
    colour_correct: bool
    iou: float
    chamfer: float | None  # None for a failed run
    mean_albedo: list[float]
    seconds: float


def score_run(run_dir: Path, prompt: str, ablation: str = "full", seconds: float = 0.0) -> Score:
    """Score one finished run directory against its prompt's ground truth."""
    shape, _ = parse_prompt(prompt)
    mesh = load_mesh(run_dir / "geometry" / "mesh.ply")
    distances = shape_distances(mesh)
    predicted_shape = min(distances, key=lambda s: distances[s][0])
    yaw = distances[shape][1]
    generated_sdf = MeshSDF(normalize_mesh(mesh))

    def prompted_sdf(points: torch.Tensor) -> torch.Tensor:
        # The primitive turned by the best yaw: evaluate at the inversely turned points.
        return ground_truth_sdf(shape, torch.as_tensor(_yaw(points.double().numpy(), -yaw), dtype=points.dtype))

    iou = volumetric_iou(generated_sdf, prompted_sdf, bounds=1.05, resolution=40)
    albedo = mean_albedo(run_dir / "export" / "model.glb")
    predicted_colour, _ = nearest_colour(albedo)
    return _score(
        prompt, ablation, seconds, predicted_shape, predicted_colour, float(iou), distances[shape][0],
        [float(x) for x in albedo],
    )


def failed_score(prompt: str, ablation: str, seconds: float) -> Score:
    """The score of a run that ended with status "failed": wrong shape and colour, IoU 0."""
    return _score(prompt, ablation, seconds, "(failed)", "(failed)", 0.0, None, [])


def _score(prompt, ablation, seconds, predicted_shape, predicted_colour, iou, chamfer, albedo) -> Score:
    shape, colour = parse_prompt(prompt)
    return Score(
        prompt=prompt,
        split="held-out" if (shape, colour) in HELD_OUT else "held-in",
        ablation=ablation,
        shape=shape,
        colour=colour,
        predicted_shape=predicted_shape,
        predicted_colour=predicted_colour,
        shape_correct=predicted_shape == shape,
        colour_correct=predicted_colour == colour,
        iou=iou,
        chamfer=chamfer,
        mean_albedo=albedo,
        seconds=seconds,
    )


def run_status(run_dir: Path) -> str | None:
    report = run_dir / "report.json"
    return json.loads(report.read_text())["status"] if report.is_file() else None


def summarize(scores: list[Score]) -> list[dict]:
    """Accuracy and mean IoU per (ablation, split)."""
    rows = []
    for ablation in dict.fromkeys(s.ablation for s in scores):
        for split in ("held-in", "held-out"):
            group = [s for s in scores if s.ablation == ablation and s.split == split]
            if not group:
                continue
            rows.append(
                {
                    "ablation": ablation,
                    "split": split,
                    "prompts": len(group),
                    "shape_accuracy": sum(s.shape_correct for s in group) / len(group),
                    "colour_accuracy": sum(s.colour_correct for s in group) / len(group),
                    "mean_iou": sum(s.iou for s in group) / len(group),
                    "mean_seconds": sum(s.seconds for s in group) / len(group),
                }
            )
    return rows


def markdown_table(scores: list[Score]) -> str:
    lines = [
        "| ablation | split | prompts | shape acc. | colour acc. | mean IoU | s / prompt |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in summarize(scores):
        lines.append(
            f"| {row['ablation']} | {row['split']} | {row['prompts']} | {row['shape_accuracy']:.0%} | "
            f"{row['colour_accuracy']:.0%} | {row['mean_iou']:.3f} | {row['mean_seconds']:.0f} |"
        )
    lines += [
        "",
        "| ablation | prompt | split | shape → predicted | colour → predicted | IoU | Chamfer | s |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for s in scores:
        shape = f"{s.shape} → {s.predicted_shape}" + ("" if s.shape_correct else " ✗")
        colour = f"{s.colour} → {s.predicted_colour}" + ("" if s.colour_correct else " ✗")
        chamfer = "-" if s.chamfer is None else f"{s.chamfer:.3f}"
        lines.append(
            f"| {s.ablation} | {s.prompt} | {s.split} | {shape} | {colour} | {s.iou:.3f} | {chamfer} | {s.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return HELD_IN_PROMPTS + HELD_OUT_PROMPTS
    if not path.is_file():
        raise ToyWorldError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ToyWorldError(f"prompts file {path} has no prompts")
    for prompt in prompts:
        parse_prompt(prompt)
    return prompts


def run_benchmark(
    prompts: list[str],
    out_dir: Path,
    ablations: list[str],
    generate: Callable[[str, Path, list[str]], int],
) -> list[Score]:
    """For each ablation and prompt: `generate(prompt, run_dir, overrides)` then score the run.
    Finished runs are scored again without regenerating, so an interrupted benchmark continues."""
    for name in ablations:
        if name not in ABLATIONS:
            raise ToyWorldError(f"unknown ablation {name!r} (choose from: {', '.join(ABLATIONS)})")
    scores: list[Score] = []
    for ablation in ablations:
        for prompt in prompts:
            run_dir = out_dir / ablation / re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")
            timing = run_dir / "benchmark_seconds.json"
            if run_status(run_dir) != "done":
                start = time.perf_counter()
                code = generate(prompt, run_dir, ABLATIONS[ablation])
                if code != 0 and run_status(run_dir) != "failed":
                    raise RuntimeError(f"generate failed for {prompt!r} ({ablation}) with exit code {code}")
                write_json(timing, {"seconds": time.perf_counter() - start})
            seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
            if run_status(run_dir) == "failed":
                # A run that went bad counts as a miss on every measure; the benchmark goes on.
                scores.append(failed_score(prompt, ablation, seconds))
            else:
                scores.append(score_run(run_dir, prompt, ablation, seconds))
            write_json(out_dir / "eval.json", {"summary": summarize(scores), "prompts": [asdict(s) for s in scores]})
            write_text(out_dir / "eval.md", markdown_table(scores))
    return scores
