"""The toy benchmark's scoring on assets whose answer is known: a placed primitive, baked with a
constant colour, must be recognized as that shape and colour with a high IoU."""

import math

import pytest
import torch

from xdreamer.export.bake import bake_textures, unwrap
from xdreamer.export.gltf import write_glb
from xdreamer.mesh import save_mesh
from xdreamer.render.shade import srgb_to_linear
from xdreamer.atomic import write_json
from xdreamer.toy.eval import markdown_table, nearest_colour, parse_prompt, run_benchmark, score_run, summarize
from xdreamer.toy.world import COLOURS, Placement, ToyWorldError, primitive_mesh


def fake_run(tmp_path, shape, colour, rotation=0.4):
    mesh = Placement(scale=0.7, rotation=rotation, offset=(0.03, -0.02, 0.01)).apply(primitive_mesh(shape))
    run = tmp_path / f"{shape}_{colour}"
    save_mesh(mesh, run / "geometry" / "mesh.ply")
    kd = srgb_to_linear(torch.tensor(COLOURS[colour]))

    def material(positions):
        n = positions.shape[0]
        return {
            "kd": kd.expand(n, 3),
            "roughness": torch.full((n, 1), 0.5),
            "metallic": torch.zeros(n, 1),
            "occlusion": torch.ones(n, 1),
            "normal_perturbation": torch.tensor([0.5, 0.5, 1.0]).expand(n, 3),
        }

    uv_mesh = unwrap(mesh, texture_size=128)
    write_glb(run / "export" / "model.glb", uv_mesh, bake_textures(uv_mesh, material, size=128))
    return run


@pytest.mark.parametrize("shape,colour", [("cube", "red"), ("torus", "purple"), ("cone", "yellow")])
def test_known_assets_score_right(tmp_path, shape, colour):
    score = score_run(fake_run(tmp_path, shape, colour), f"a {colour} {shape}")
    assert score.predicted_shape == shape and score.predicted_colour == colour
    assert score.iou >= 0.85, score.iou
    assert score.chamfer < 0.03
    assert max(abs(a - b) for a, b in zip(score.mean_albedo, COLOURS[colour])) < 0.03


def test_wrong_prompt_is_scored_wrong(tmp_path):
    score = score_run(fake_run(tmp_path, "sphere", "green"), "a blue cube")
    assert not score.shape_correct and not score.colour_correct
    assert score.predicted_shape == "sphere" and score.predicted_colour == "green"
    assert score.iou < 0.85
    rows = summarize([score])
    assert rows[0]["shape_accuracy"] == 0.0 and rows[0]["split"] == "held-in"
    assert "a blue cube" in markdown_table([score])


def test_colour_and_prompt_parsing():
    for name, value in COLOURS.items():
        assert nearest_colour(value) == (name, pytest.approx(0.0, abs=1e-3))
    assert parse_prompt("An orange torus, front view") == ("torus", "orange")
    with pytest.raises(ToyWorldError):
        parse_prompt("a red thing")


def test_benchmark_scores_a_failed_run_as_a_miss_and_goes_on(tmp_path):
    """One prompt's run goes bad (status "failed"): it counts as wrong shape, wrong colour, IoU 0,
    and the next prompt is still generated and scored; rerunning regenerates only the failure."""
    calls = []

    def generate(prompt, run_dir, overrides):
        calls.append(prompt)
        if prompt == "a red cube":
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "report.json", {"status": "failed"})
            return 1
        fake = fake_run(tmp_path, "torus", "purple")
        fake.rename(run_dir)
        write_json(run_dir / "report.json", {"status": "done"})
        return 0

    scores = run_benchmark(["a red cube", "a purple torus"], tmp_path / "bench", ["full"], generate)
    assert calls == ["a red cube", "a purple torus"]
    failed, good = scores
    assert (failed.shape_correct, failed.colour_correct, failed.iou, failed.chamfer) == (False, False, 0.0, None)
    assert good.shape_correct and good.colour_correct and good.iou >= 0.85
    rows = summarize(scores)
    assert [(r["split"], r["shape_accuracy"]) for r in rows] == [("held-in", 0.0), ("held-out", 1.0)]
    assert "(failed)" in (tmp_path / "bench" / "eval.md").read_text()

    calls.clear()
    run_benchmark(["a red cube", "a purple torus"], tmp_path / "bench", ["full"], generate)
    assert calls == ["a red cube"]  # the failed run is tried again; the finished one is only rescored
