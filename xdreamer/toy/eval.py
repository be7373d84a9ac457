"""The toy-world benchmark: generate each prompt (once per seed), then score the asset against the
prompt's ground truth — the shape (nearest primitive by Chamfer distance), the colour (named colour
nearest the mean baked albedo in CIELAB), the volumetric IoU with the prompted primitive and how far
its faces turn from the primitive's (`surface_angle`: waves, ribs, rounded edges) — and what a user
sees in a viewer: connected pieces and genus of the mesh, the CIELAB ΔE of the baked
albedo from the world's colour, the mean baked metallic (the world has none) and the mean tilt of
the baked normal map. Per ablation: means with 95 % intervals, and a paired comparison with "full";
`comparison_table` compares two benchmarks the same way, run by run (`xdreamer toy compare`).

The runs themselves are made by a `generate` callable handed in by the caller (the CLI passes the
pipeline's), so this module only knows the toy world and how to score a run directory."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from xdreamer.atomic import write_json, write_text
from xdreamer.geometry.cleanup import mesh_pieces
from xdreamer.geometry.init import MeshSDF, normalize_mesh, volumetric_iou
from xdreamer.mesh import Mesh, load_mesh
from xdreamer.toy.facing import sample_mesh, score_front_run
from xdreamer.toy.world import (
    COLOURS,
    CONTRAST_SHAPES,
    FRONT_SHAPES,
    HELD_OUT,
    HELD_OUT_OBJECTS,
    SHAPES,
    ToyWorldError,
    caption,
    delta_e,
    ground_truth_sdf,
    parse_caption,
    primitive_mesh,
)

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
# Objects with a front, where the multi-face ("Janus") failure can happen and be counted: two
# held in, two held out of training.
FRONT_PROMPTS = [
    caption("cube", "red", front="blue"),
    caption("mug", "blue"),
    caption("cube", "yellow", front="red"),
    caption("mug", "yellow"),
]
PROMPT_SETS = {"default": HELD_IN_PROMPTS + HELD_OUT_PROMPTS, "front": FRONT_PROMPTS}

ABLATIONS: dict[str, list[str]] = {
    "full": [],
    "no_cg_lora": ["cg_lora.enabled=false"],
    "no_ama": ["ama.enabled=false"],
    "neither": ["cg_lora.enabled=false", "ama.enabled=false"],
    "no_direction": ["direction_prompts=false"],
    "no_cg_lora_no_direction": ["cg_lora.enabled=false", "direction_prompts=false"],
}

_YAWS = np.deg2rad(np.arange(0.0, 90.0, 7.5))  # cube and pyramid repeat every 90 degrees about +y


def parse_prompt(prompt: str) -> tuple[str, str]:
    """'a red cube' -> ('cube', 'red'), 'a red cube with a blue front' -> ('cube', 'red'): the
    shape and the body colour (see `toy.world.parse_caption`). A box has no ground truth to
    score against, so it is refused before any run."""
    thing = parse_caption(prompt)
    if thing.shape in CONTRAST_SHAPES:
        raise ToyWorldError(
            f"toy prompt {prompt!r}: a {thing.shape} has no fixed proportions, so the benchmark cannot score it; "
            f"ask for one of {', '.join(SHAPES + FRONT_SHAPES)}"
        )
    return thing.shape, thing.colour


def _yaw(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]).T


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer distance: mean nearest-neighbour distance both ways, averaged."""
    from scipy.spatial import cKDTree

    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def shape_distances(mesh: Mesh, samples: int = 3000) -> dict[str, tuple[float, float]]:
    """Chamfer distance from the normalized `mesh` to each normalized primitive, minimized over
    rotations about +y (the generated object's yaw is arbitrary): {shape: (distance, yaw)}."""
    generated = sample_mesh(normalize_mesh(mesh), samples, seed=1)[0]
    result = {}
    for shape in SHAPES + FRONT_SHAPES:
        reference = sample_mesh(primitive_mesh(shape), samples, seed=2)[0]
        best = min((chamfer(generated, _yaw(reference, yaw)), yaw) for yaw in _YAWS)
        result[shape] = (float(best[0]), float(best[1]))
    return result


def turned_primitive_sdf(shape: str, yaw: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ground truth's signed distance, points (N, 3) -> (N,), of `shape` turned by `yaw` about
    +y: the primitive's own evaluated at the inversely turned points."""

    def sdf(points: torch.Tensor) -> torch.Tensor:
        return ground_truth_sdf(shape, torch.as_tensor(_yaw(points.double().numpy(), -yaw), dtype=points.dtype))

    return sdf


def surface_angle(mesh: Mesh, shape: str, yaw: float) -> float:
    """How far the surface's faces turn from the primitive's: the area-weighted mean angle in
    degrees between each face's normal of the normalized `mesh` and the ground truth's normal
    (its signed distance's gradient, by central differences) at the face's centre, the primitive
    turned by `yaw`. 0 on the primitive's own mesh; waves, ribs and rounded edges raise it."""
    normalized = normalize_mesh(mesh)
    vertices = normalized.vertices.detach().double().cpu().numpy()
    corners = vertices[normalized.faces.cpu().numpy()]  # (F, 3, 3)
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    area = np.linalg.norm(cross, axis=1)
    keep = area > 0
    normals, centres, area = cross[keep] / area[keep, None], corners[keep].mean(axis=1), area[keep]
    # The six probes of every centre in one evaluation: +x, +y, +z, then -x, -y, -z.
    step = 1e-4
    offsets = np.concatenate([np.eye(3), -np.eye(3)]) * step
    probes = torch.as_tensor((centres[None] + offsets[:, None]).reshape(-1, 3))
    distances = turned_primitive_sdf(shape, yaw)(probes).numpy().reshape(6, -1)
    truth = ((distances[:3] - distances[3:]) / (2 * step)).T  # (F, 3)
    truth /= np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-12)
    angles = np.degrees(np.arccos(np.clip((normals * truth).sum(axis=1), -1.0, 1.0)))
    return float((angles * area).sum() / area.sum())


def uv_coverage(uvs: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """(S, S) bool: the texels the UV charts cover, as `bake_textures` rasterizes them (texel
    centres inside a triangle). uvs: (V, 2) glTF orientation; faces: (F, 3)."""
    from xdreamer.render.raster import Rasterizer

    pos_clip = torch.stack([uvs[:, 0] * 2 - 1, 1 - uvs[:, 1] * 2, torch.zeros_like(uvs[:, 0]), torch.ones_like(uvs[:, 0])], -1)
    return Rasterizer("torch").rasterize(pos_clip[None], faces, (size, size))[0, ..., 3] > 0


def baked_texels(glb: Path) -> dict[str, np.ndarray]:
    """The covered texels of an exported GLB's textures (the gutters between charts left out):
    base_color (N, 3) sRGB in [0, 1], metallic (N,) in [0, 1] (the metallicRoughness texture's
    blue channel) and normal (N, 3) tangent-space in [-1, 1] as glTF decodes it (2 x byte/255 - 1)."""
    import trimesh

    scene = trimesh.load(glb, process=False)
    geometry = next(iter(scene.geometry.values())) if hasattr(scene, "geometry") else scene
    material = geometry.visual.material
    images = {
        "base_color": material.baseColorTexture,
        "metallic_roughness": material.metallicRoughnessTexture,
        "normal": material.normalTexture,
    }
    images = {name: np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for name, image in images.items()}
    size = images["base_color"].shape[0]
    # trimesh's v points up the image; glTF's (and Mesh.uvs') origin is the top-left.
    uv = np.asarray(geometry.visual.uv, dtype=np.float32)
    uvs = torch.as_tensor(np.stack([uv[:, 0], 1 - uv[:, 1]], -1))
    covered = uv_coverage(uvs, torch.as_tensor(np.asarray(geometry.faces, dtype=np.int64)), size).numpy()
    return {
        "base_color": images["base_color"][covered],
        "metallic": images["metallic_roughness"][covered][:, 2],
        "normal": images["normal"][covered] * 2 - 1,
    }


def mean_albedo(base_color: np.ndarray) -> np.ndarray:
    """Mean of sRGB colours (N, 3), averaged in linear space -> (3,) sRGB. Over covered texels it
    is the area-weighted mean over the surface: xatlas packs every chart at one texel density."""
    linear = np.where(base_color <= 0.04045, base_color / 12.92, ((base_color + 0.055) / 1.055) ** 2.4)
    mean = linear.mean(0)
    return np.where(mean <= 0.0031308, mean * 12.92, 1.055 * mean ** (1 / 2.4) - 0.055)


def normal_tilt(normal: np.ndarray) -> np.ndarray:
    """(N,) degrees between tangent-space normals (N, 3) and +z, the unperturbed surface normal.
    An 8-bit map cannot store an exact 0: the nearest bytes (128, 128, 255) decode to 0.32 deg."""
    unit = normal / np.linalg.norm(normal, axis=-1, keepdims=True).clip(1e-12)
    return np.degrees(np.arccos(unit[:, 2].clip(-1.0, 1.0)))


def nearest_colour(srgb: np.ndarray) -> tuple[str, float]:
    """The named toy colour nearest `srgb` in CIELAB, and its ΔE."""
    distances = {name: delta_e(value, srgb) for name, value in COLOURS.items()}
    name = min(distances, key=distances.get)
    return name, distances[name]


def expected_genus(shape: str) -> int:
    """The genus of the world's `shape` (1 for the torus, 0 for the other primitives)."""
    return mesh_pieces(primitive_mesh(shape))[0].genus


@dataclass
class Score:
    prompt: str
    split: str  # held-in | held-out
    ablation: str
    seed: int
    shape: str
    colour: str
    predicted_shape: str
    predicted_colour: str
    shape_correct: bool
    colour_correct: bool
    iou: float
    chamfer: float | None  # None for a failed run
    mean_albedo: list[float]  # sRGB; empty for a failed run
    delta_e: float | None  # CIELAB ΔE of mean_albedo vs the prompted colour
    pieces: int | None  # connected pieces of the final mesh; None for a failed run
    genus: int | None  # of its largest piece; None when that piece is open or not a manifold
    topology_correct: bool  # one piece with the primitive's genus
    pieces_removed: int | None  # by the run's clean-up (report.json "mesh"); None if not recorded
    metallic: float | None  # mean over covered texels
    normal_tilt: float | None  # mean degrees over covered texels
    seconds: float
    front: dict | None = None  # `toy.facing.FrontCount.to_dict()` for an object with a front
    # `surface_angle`: the mean angle (degrees) between the faces and the primitive's surface; None
    # for a failed run or an eval.json from before it was measured
    surface_angle: float | None = None


def score_run(run_dir: Path, prompt: str, ablation: str = "full", seconds: float = 0.0, seed: int = 0) -> Score:
    """Score one finished run directory against its prompt's ground truth."""
    thing = parse_caption(prompt)
    shape, colour = thing.shape, thing.colour
    mesh = load_mesh(run_dir / "geometry" / "mesh.ply")
    distances = shape_distances(mesh)
    predicted_shape = min(distances, key=lambda s: distances[s][0])
    yaw = distances[shape][1]
    generated_sdf = MeshSDF(normalize_mesh(mesh))
    iou = volumetric_iou(generated_sdf, turned_primitive_sdf(shape, yaw), bounds=1.05, resolution=40)
    texels = baked_texels(run_dir / "export" / "model.glb")
    albedo = mean_albedo(texels["base_color"])
    pieces = mesh_pieces(mesh)
    genus = pieces[0].genus if pieces else None
    report = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").is_file() else {}
    removed = (report.get("mesh") or {}).get("pieces_removed")
    front = score_front_run(run_dir, prompt).to_dict() if thing.has_front else None
    return _score(
        prompt, ablation, seed, seconds,
        predicted_shape=predicted_shape,
        predicted_colour=nearest_colour(albedo)[0],
        iou=float(iou),
        chamfer=distances[shape][0],
        mean_albedo=[float(x) for x in albedo],
        delta_e=delta_e(albedo, COLOURS[colour]),
        pieces=len(pieces),
        genus=genus,
        topology_correct=len(pieces) == 1 and genus == expected_genus(shape),
        pieces_removed=None if removed is None else len(removed),
        metallic=float(texels["metallic"].mean()),
        normal_tilt=float(normal_tilt(texels["normal"]).mean()),
        front=front,
        surface_angle=surface_angle(mesh, shape, yaw),
    )


def failed_score(prompt: str, ablation: str, seconds: float, seed: int = 0) -> Score:
    """The score of a run that ended with status "failed": wrong shape, colour and topology, IoU
    0, no texture measures."""
    return _score(
        prompt, ablation, seed, seconds, predicted_shape="(failed)", predicted_colour="(failed)", iou=0.0,
        chamfer=None, mean_albedo=[], delta_e=None, pieces=None, genus=None, topology_correct=False,
        pieces_removed=None, metallic=None, normal_tilt=None,
    )


def _score(prompt: str, ablation: str, seed: int, seconds: float, **measures) -> Score:
    thing = parse_caption(prompt)
    shape, colour = thing.shape, thing.colour
    held_out = thing in HELD_OUT_OBJECTS or (not thing.has_front and (shape, colour) in HELD_OUT)
    return Score(
        prompt=prompt,
        split="held-out" if held_out else "held-in",
        ablation=ablation,
        seed=seed,
        shape=shape,
        colour=colour,
        shape_correct=measures["predicted_shape"] == shape,
        colour_correct=measures["predicted_colour"] == colour,
        seconds=seconds,
        **measures,
    )


def run_status(run_dir: Path) -> str | None:
    report = run_dir / "report.json"
    return json.loads(report.read_text())["status"] if report.is_file() else None


# ----- statistics ----------------------------------------------------------------------------

CONFIDENCE = 0.95
RESAMPLES = 10_000
INTERVALS = (
    "95 % intervals. Accuracies (proportions of runs): Wilson score interval over the runs. "
    f"Means and paired differences: two-stage percentile bootstrap, {RESAMPLES} resamples (seed 0): "
    "prompts with replacement, then seeds within each drawn prompt, since the runs of one prompt "
    "are not independent. Paired "
    "comparison: the difference on the same prompt and seed (full - ablation, or new - old); wins/losses "
    "by which is better (higher accuracy and IoU, lower surface angle, ΔE, metallic, tilt and time); p: two-sided sign test over the "
    "pairs that differ (for accuracies this is the exact McNemar test)."
)
FLAT_SHAPES = ("cube", "pyramid")

# Proportions: summarized with a Wilson interval.
PROPORTIONS: dict[str, Callable[[Score], bool | None]] = {
    "shape_accuracy": lambda s: s.shape_correct,
    "colour_accuracy": lambda s: s.colour_correct,
    "topology_accuracy": lambda s: s.topology_correct,
    # Objects with a front only: exactly one front, where it belongs; two or more (Janus).
    "front_accuracy": lambda s: None if s.front is None else s.front["correct"],
    "multi_face_rate": lambda s: None if s.front is None else s.front["multi_face"],
}
# Means: summarized with a bootstrap interval; None (a failed run, a shape it does not apply to)
# is left out. flat_normal_tilt is the tilt on cube and pyramid, whose surface is flat faces
# except thin crease bands.
MEANS: dict[str, Callable[[Score], float | None]] = {
    "iou": lambda s: s.iou,
    "delta_e": lambda s: s.delta_e,
    "metallic": lambda s: s.metallic,
    "normal_tilt": lambda s: s.normal_tilt,
    "flat_normal_tilt": lambda s: s.normal_tilt if s.shape in FLAT_SHAPES else None,
    "surface_angle": lambda s: s.surface_angle,
    "pieces": lambda s: s.pieces,
    "seconds": lambda s: s.seconds,
}
HIGHER_IS_BETTER = {"shape_accuracy": True, "colour_accuracy": True, "topology_accuracy": True,
                    "front_accuracy": True, "multi_face_rate": False, "iou": True,
                    "delta_e": False, "metallic": False, "normal_tilt": False, "flat_normal_tilt": False,
                    "surface_angle": False,
                    "pieces": False, "seconds": False}


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def bootstrap_mean(
    values: np.ndarray, clusters: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` (N,) and its 95 % percentile interval from a
    two-stage bootstrap: resample the clusters (N,) labels (the prompts) with replacement, then
    the values within each drawn cluster (its seeds), so that both the prompts and the seeds vary."""
    _, cluster = np.unique(clusters, return_inverse=True)
    order = np.argsort(cluster, kind="stable")
    counts = np.bincount(cluster)
    starts = np.cumsum(counts) - counts
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, counts.shape[0], size=(resamples, counts.shape[0]))  # (R, P) clusters
    n = counts[picks][..., None]  # (R, P, 1)
    within = np.minimum((rng.random((*picks.shape, counts.max())) * n).astype(np.int64), n - 1)
    drawn = values[order][starts[picks][..., None] + within]  # (R, P, max count)
    valid = np.arange(counts.max()) < n
    means = np.where(valid, drawn, 0.0).sum((1, 2)) / valid.sum((1, 2))
    low, high = np.percentile(means, [50 * (1 - CONFIDENCE), 100 - 50 * (1 - CONFIDENCE)])
    return float(values.mean()), float(low), float(high)


def sign_test(differences: np.ndarray, higher_is_better: bool = True) -> tuple[int, int, int, float]:
    """(wins, losses, ties, p) for paired differences (N,) = first - second: a win is a pair where
    the first is better; p is the two-sided binomial test of wins against losses (1 with none)."""
    from scipy.stats import binomtest

    better = differences > 0 if higher_is_better else differences < 0
    worse = differences < 0 if higher_is_better else differences > 0
    wins, losses = int(better.sum()), int(worse.sum())
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return wins, losses, int(differences.shape[0]) - wins - losses, float(p)


def _groups(scores: list[Score]):
    """(ablation, split, runs) per ablation in order of appearance, split held-in, held-out."""
    for ablation in dict.fromkeys(s.ablation for s in scores):
        for split in ("held-in", "held-out"):
            group = [s for s in scores if s.ablation == ablation and s.split == split]
            if group:
                yield ablation, split, group


def summarize(scores: list[Score]) -> list[dict]:
    """Per (ablation, split): runs, prompts, seeds, and for every measure its mean and 95 %
    interval (keys `<measure>` and `<measure>_ci`; None where no run has the measure)."""
    rows = []
    for ablation, split, group in _groups(scores):
        row = {
            "ablation": ablation,
            "split": split,
            "runs": len(group),
            "prompts": len({s.prompt for s in group}),
            "seeds": sorted({s.seed for s in group}),
        }
        for name, measure in PROPORTIONS.items():
            kept = [bool(measure(s)) for s in group if measure(s) is not None]
            if not kept:
                row[name], row[f"{name}_ci"] = None, None
                continue
            row[name] = sum(kept) / len(kept)
            row[f"{name}_ci"] = list(wilson_interval(sum(kept), len(kept)))
        for name, measure in MEANS.items():
            kept = [(measure(s), s.prompt) for s in group if measure(s) is not None]
            if not kept:
                row[name], row[f"{name}_ci"] = None, None
                continue
            mean, low, high = bootstrap_mean(np.array([v for v, _ in kept], dtype=np.float64), np.array([p for _, p in kept]))
            row[name], row[f"{name}_ci"] = mean, [low, high]
        rows.append(row)
    return rows


def paired_comparison(scores: list[Score], baseline: str = "full") -> list[dict]:
    """`baseline` against every other ablation on the same prompt and seed, per split and over
    both ("all"). Per measure: `<m>_difference` (baseline - ablation, mean), `<m>_difference_ci`,
    `<m>_wins` / `_losses` / `_ties` (the baseline better / worse / equal) and `<m>_p` (sign test)."""
    reference = {(s.prompt, s.seed): s for s in scores if s.ablation == baseline}
    measures = {**PROPORTIONS, **MEANS}
    rows = []
    for ablation in dict.fromkeys(s.ablation for s in scores if s.ablation != baseline):
        for split in ("held-in", "held-out", "all"):
            pairs = [
                (reference[(s.prompt, s.seed)], s)
                for s in scores
                if s.ablation == ablation and (s.prompt, s.seed) in reference and split in ("all", s.split)
            ]
            if not pairs:
                continue
            row = {"ablation": ablation, "baseline": baseline, "split": split, "pairs": len(pairs)}
            for name, measure in measures.items():
                kept = [(float(measure(a)) - float(measure(b)), a.prompt) for a, b in pairs
                        if measure(a) is not None and measure(b) is not None]
                if not kept:
                    for key in ("difference", "difference_ci", "wins", "losses", "ties", "p"):
                        row[f"{name}_{key}"] = None
                    continue
                differences = np.array([d for d, _ in kept])
                mean, low, high = bootstrap_mean(differences, np.array([p for _, p in kept]))
                wins, losses, ties, p = sign_test(differences, HIGHER_IS_BETTER[name])
                row.update({f"{name}_difference": mean, f"{name}_difference_ci": [low, high], f"{name}_wins": wins,
                            f"{name}_losses": losses, f"{name}_ties": ties, f"{name}_p": p})
            rows.append(row)
    return rows


# ----- tables --------------------------------------------------------------------------------


def _cell(row: dict, name: str, fmt: str, percent: bool = False) -> str:
    if row.get(name) is None:
        return "-"
    scale = 100.0 if percent else 1.0
    low, high = row[f"{name}_ci"]
    unit = " %" if percent else ""
    return f"{row[name] * scale:{fmt}}{unit} [{low * scale:{fmt}}, {high * scale:{fmt}}]"


def _difference(row: dict, name: str, fmt: str, percent: bool = False) -> str:
    if row.get(f"{name}_difference") is None:
        return "-"
    scale = 100.0 if percent else 1.0
    low, high = row[f"{name}_difference_ci"]
    return (
        f"{row[f'{name}_difference'] * scale:+{fmt}} [{low * scale:+{fmt}}, {high * scale:+{fmt}}] "
        f"{row[f'{name}_wins']}/{row[f'{name}_losses']}/{row[f'{name}_ties']} p={row[f'{name}_p']:.2g}"
    )


def _summary_lines(scores: list[Score], label: str = "ablation") -> list[str]:
    """The summary per ablation (or benchmark: `label`) and split: a markdown table."""
    lines = [
        f"| {label} | split | runs | shape acc. % | colour acc. % | one piece, right genus % | IoU | surface ° | ΔE | "
        "metallic | normal tilt ° | tilt on cube/pyramid ° | pieces | one front, at the front % | multi-face % | s / run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summarize(scores):
        lines.append(
            f"| {row['ablation']} | {row['split']} | {row['runs']} | {_cell(row, 'shape_accuracy', '.0f', True)} | "
            f"{_cell(row, 'colour_accuracy', '.0f', True)} | {_cell(row, 'topology_accuracy', '.0f', True)} | "
            f"{_cell(row, 'iou', '.3f')} | {_cell(row, 'surface_angle', '.1f')} | {_cell(row, 'delta_e', '.1f')} | "
            f"{_cell(row, 'metallic', '.2f')} | {_cell(row, 'normal_tilt', '.1f')} | {_cell(row, 'flat_normal_tilt', '.1f')} | "
            f"{_cell(row, 'pieces', '.1f')} | {_cell(row, 'front_accuracy', '.0f', True)} | "
            f"{_cell(row, 'multi_face_rate', '.0f', True)} | {row['seconds']:.0f} |"
        )
    return lines


def _paired_lines(paired: list[dict], label: str = "ablation") -> list[str]:
    """Paired comparison rows (`paired_comparison`): a markdown table; `label` heads the column
    of what the baseline is compared with."""
    lines = [
        f"| {label} | split | pairs | IoU | surface ° | shape acc. (points) | colour acc. (points) | "
        "one piece, right genus (points) | ΔE | multi-face (points) | s / run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in paired:
        lines.append(
            f"| {row['ablation']} | {row['split']} | {row['pairs']} | {_difference(row, 'iou', '.3f')} | "
            f"{_difference(row, 'surface_angle', '.1f')} | {_difference(row, 'shape_accuracy', '.0f', True)} | {_difference(row, 'colour_accuracy', '.0f', True)} | "
            f"{_difference(row, 'topology_accuracy', '.0f', True)} | {_difference(row, 'delta_e', '.1f')} | "
            f"{_difference(row, 'multi_face_rate', '.0f', True)} | {_difference(row, 'seconds', '.0f')} |"
        )
    return lines


def markdown_table(scores: list[Score]) -> str:
    """The summary per ablation and split, the paired comparison with "full" and every run."""
    lines = _summary_lines(scores)
    paired = paired_comparison(scores)
    if paired:
        lines += [
            "",
            "Paired with full (same prompt and seed): difference full - ablation [95 % interval], "
            "wins/losses/ties of full, sign-test p.",
            "",
            *_paired_lines(paired),
        ]
    lines += [
        "",
        INTERVALS,
        "",
        "| ablation | prompt | seed | split | shape → predicted | colour → predicted | IoU | surface ° | Chamfer | "
        "pieces (removed) | genus | ΔE | metallic | tilt ° | fronts (sides) | s |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        shape = f"{s.shape} → {s.predicted_shape}" + ("" if s.shape_correct else " ✗")
        colour = f"{s.colour} → {s.predicted_colour}" + ("" if s.colour_correct else " ✗")
        number = lambda x, fmt: "-" if x is None else f"{x:{fmt}}"  # noqa: E731
        removed = "" if s.pieces_removed is None else f" ({s.pieces_removed})"
        genus = number(s.genus, "d") + ("" if s.topology_correct else " ✗")
        lines.append(
            f"| {s.ablation} | {s.prompt} | {s.seed} | {s.split} | {shape} | {colour} | {s.iou:.3f} | "
            f"{number(s.surface_angle, '.1f')} | {number(s.chamfer, '.3f')} | {number(s.pieces, 'd')}{removed} | {genus} | {number(s.delta_e, '.1f')} | "
            f"{number(s.metallic, '.2f')} | {number(s.normal_tilt, '.1f')} | {_fronts(s.front)} | {s.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


# What every run of a compared benchmark must have (the rest reads as None when missing).
_COMPARED = ("prompt", "seed", "split", "shape", "colour", "iou", "seconds", "shape_correct", "colour_correct",
             "topology_correct")


def read_scores(source: Path, ablation: str = "full") -> list[Score]:
    """The scored runs of one ablation from a benchmark: its folder (`xdreamer toy eval --out`) or
    its eval.json. Measures an older eval.json lacks read as None; those every table needs
    (`_COMPARED`) must be there."""
    path = source / "eval.json" if source.is_dir() else source
    if not path.is_file():
        raise ToyWorldError(f"no benchmark results at {path} (give the folder of `xdreamer toy eval --out`)")
    try:
        every = json.loads(path.read_text())["runs"]
        ablations = [run["ablation"] for run in every] if all(isinstance(run, dict) for run in every) else None
    except (ValueError, KeyError, TypeError):
        ablations = None
    if ablations is None:
        raise ToyWorldError(f"{path} is not a benchmark's eval.json")
    runs = [run for run in every if run["ablation"] == ablation]
    for run in runs:
        missing = [name for name in _COMPARED if name not in run]
        if missing:
            raise ToyWorldError(f"{path} lacks {', '.join(missing)} in its runs (written by an older xdreamer?)")
    names = [f.name for f in fields(Score)]
    scores = [Score(**{name: run.get(name) for name in names}) for run in runs]
    if not scores:
        found = ", ".join(dict.fromkeys(str(name) for name in ablations)) or "none"
        raise ToyWorldError(f"{path} has no runs of ablation {ablation!r} (it has: {found})")
    return scores


def comparison_table(new: list[Score], old: list[Score]) -> str:
    """Two benchmarks of one ablation compared on the (prompt, seed) pairs they share, e.g. after
    and before a code change: each one's summary over those pairs, the paired differences new - old
    with intervals and sign tests, and the IoU per prompt and seed. A single-seed comparison moves
    by about +-0.05 IoU per run whatever changed (docs/benchmarks.md), so read the intervals."""
    shared = {(s.prompt, s.seed) for s in new} & {(s.prompt, s.seed) for s in old}
    if not shared:
        raise ToyWorldError("the two benchmarks share no (prompt, seed) pair to compare")
    new = [replace(s, ablation="new") for s in new if (s.prompt, s.seed) in shared]
    old = [replace(s, ablation="old") for s in old if (s.prompt, s.seed) in shared]
    lines = [
        *_summary_lines(new + old, label="benchmark"),
        "",
        "Paired (same prompt and seed): difference new - old [95 % interval], wins/losses/ties of new, "
        "sign-test p.",
        "",
        *_paired_lines(paired_comparison(new + old, baseline="new"), label="new against"),
        "",
        INTERVALS,
        "",
        "IoU per prompt, old → new, one value per seed (✗s: shape read wrong, ✗t: not one piece with the right genus).",
        "",
        "| prompt | split | seeds | old | new | mean difference |",
        "|---|---|---|---|---|---:|",
    ]
    before = {(s.prompt, s.seed): s for s in old}

    def cell(s: Score) -> str:
        return f"{s.iou:.3f}" + ("" if s.shape_correct else "✗s") + ("" if s.topology_correct else "✗t")

    for prompt in dict.fromkeys(s.prompt for s in new):
        runs = sorted((s for s in new if s.prompt == prompt), key=lambda s: s.seed)
        olds = [before[(s.prompt, s.seed)] for s in runs]
        difference = float(np.mean([a.iou - b.iou for a, b in zip(runs, olds)]))
        lines.append(
            f"| {prompt} | {runs[0].split} | {','.join(str(s.seed) for s in runs)} | "
            f"{' '.join(cell(s) for s in olds)} | {' '.join(cell(s) for s in runs)} | {difference:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def _fronts(front: dict | None) -> str:
    if front is None:
        return "-"
    return f"{front['count']} ({', '.join(front['found'])})" if front["found"] else "0"


def read_prompts(source: str | Path | None) -> list[str]:
    """The benchmark's prompts: a named set ("default": 8 held-in + 6 held-out primitives,
    "front": the objects with a front), or a text file, one prompt per line."""
    if source is None or str(source) in PROMPT_SETS:
        return list(PROMPT_SETS["default" if source is None else str(source)])
    path = Path(source)
    if not path.is_file():
        raise ToyWorldError(f"prompts file not found: {path} (or name a set: {', '.join(PROMPT_SETS)})")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ToyWorldError(f"prompts file {path} has no prompts")
    for prompt in prompts:
        parse_prompt(prompt)
    return prompts


def run_directory(out_dir: Path, ablation: str, prompt: str, seed: int) -> Path:
    """out_dir/<ablation>/<prompt as a slug>/seed_<seed>"""
    return out_dir / ablation / re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_") / f"seed_{seed}"


def write_results(out_dir: Path, scores: list[Score]) -> None:
    """eval.json (summary, paired comparison, every run) and eval.md, each atomically."""
    results = {
        "intervals": INTERVALS,
        "summary": summarize(scores),
        "paired": paired_comparison(scores),
        "runs": [asdict(s) for s in scores],
    }
    write_json(out_dir / "eval.json", results)
    write_text(out_dir / "eval.md", markdown_table(scores))


def run_benchmark(
    prompts: list[str],
    out_dir: Path,
    ablations: list[str],
    generate: Callable[[str, Path, list[str]], int],
    seeds: Sequence[int] = (0,),
) -> list[Score]:
    """For each seed, ablation and prompt: `generate(prompt, run_dir, overrides + ["seed=N"])`,
    then score the run. Seeds are the outer loop, so an interrupted benchmark already has complete
    paired comparisons for its first seeds. Finished runs are scored again without regenerating,
    so a rerun continues where it stopped; eval.json and eval.md are rewritten after every run."""
    for name in ablations:
        if name not in ABLATIONS:
            raise ToyWorldError(f"unknown ablation {name!r} (choose from: {', '.join(ABLATIONS)})")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ToyWorldError(f"seeds must be distinct integers, at least one, got {seeds}")
    scores: list[Score] = []
    for seed in seeds:
        for ablation in ablations:
            for prompt in prompts:
                run_dir = run_directory(out_dir, ablation, prompt, seed)
                timing = run_dir / "benchmark_seconds.json"
                if run_status(run_dir) != "done":
                    start = time.perf_counter()
                    code = generate(prompt, run_dir, ABLATIONS[ablation] + [f"seed={seed}"])
                    if code != 0 and run_status(run_dir) != "failed":
                        raise RuntimeError(f"generate failed for {prompt!r} ({ablation}, seed {seed}) with exit code {code}")
                    write_json(timing, {"seconds": time.perf_counter() - start})
                seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
                if run_status(run_dir) == "failed":
                    # A run that went bad counts as a miss on every measure; the benchmark goes on.
                    scores.append(failed_score(prompt, ablation, seconds, seed))
                else:
                    scores.append(score_run(run_dir, prompt, ablation, seconds, seed))
                write_results(out_dir, scores)
    return scores
