"""The toy benchmark's scoring on assets whose answer is known: a placed primitive, baked with a
constant colour, must be recognized as that shape and colour with a high IoU, as one piece of the
primitive's genus, with the baked metallic and normal tilt it was given; and the statistics over
seeds on synthetic scores whose means, intervals and paired differences are known."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import trimesh

from xdreamer.atomic import write_json
from xdreamer.export.bake import bake_textures, unwrap
from xdreamer.export.gltf import write_glb
from xdreamer.mesh import Mesh, save_mesh
from xdreamer.render.shade import srgb_to_linear
from xdreamer.toy.eval import (
    FRONT_PROMPTS,
    baked_texels,
    bootstrap_mean,
    comparison_table,
    delta_e,
    expected_genus,
    failed_score,
    markdown_table,
    nearest_colour,
    normal_tilt,
    paired_comparison,
    parse_prompt,
    read_prompts,
    read_scores,
    run_benchmark,
    score_run,
    sign_test,
    summarize,
    surface_angle,
    uv_coverage,
    wilson_interval,
    write_results,
)
from xdreamer.toy.world import COLOURS, Placement, ToyWorldError, primitive_mesh


def fake_run(tmp_path, shape, colour, rotation=0.4, metallic=0.0, perturbation=(0.0, 0.0, 1.0), mesh=None):
    """A run directory holding a placed primitive (or `mesh`), baked with a constant material."""
    if mesh is None:
        mesh = Placement(scale=0.7, rotation=rotation, offset=(0.03, -0.02, 0.01)).apply(primitive_mesh(shape))
    run = tmp_path / f"{shape}_{colour}_{metallic}_{perturbation[0]}"
    save_mesh(mesh, run / "geometry" / "mesh.ply")
    kd = srgb_to_linear(torch.tensor(COLOURS[colour]))

    def material(positions):
        n = positions.shape[0]
        return {
            "kd": kd.expand(n, 3),
            "roughness": torch.full((n, 1), 0.5),
            "metallic": torch.full((n, 1), metallic),
            "occlusion": torch.ones(n, 1),
            "normal_perturbation": torch.tensor(perturbation).expand(n, 3),
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
    assert max(abs(a - b) for a, b in zip(score.mean_albedo, COLOURS[colour])) < 0.01
    assert score.delta_e < 1.0
    assert (score.pieces, score.genus, score.topology_correct) == (1, 1 if shape == "torus" else 0, True)
    assert score.pieces_removed is None  # no report.json
    assert score.metallic == 0.0
    # An unperturbed normal map: 8-bit (128, 128, 255) is the nearest to +z, 0.32 degrees off.
    assert score.normal_tilt == pytest.approx(math.degrees(math.atan(math.hypot(1, 1) / 255)), abs=1e-3)
    # The primitive's own faces, placed and turned: off only by the yaw search's step.
    assert score.surface_angle < 1.0, score.surface_angle


@pytest.mark.parametrize("shape", ["cube", "pyramid", "sphere", "cylinder", "cone", "torus"])
def test_surface_angle_is_zero_on_the_primitive_and_grows_with_a_turn(shape):
    mesh = primitive_mesh(shape)
    assert surface_angle(mesh, shape, 0.0) == pytest.approx(0.0, abs=1e-6)
    if shape in ("cube", "pyramid"):
        # Against the primitive turned by a wrong yaw the side faces alone (2/3 of a cube's area)
        # are off by the turn; near the edges the truth's normal turns further.
        angles = [surface_angle(mesh, shape, math.radians(degrees)) for degrees in (2, 5, 10)]
        assert angles[0] < angles[1] < angles[2]
        assert angles[2] > 10 * 2 / 3


def test_baked_metallic_and_normal_tilt_are_read_from_the_covered_texels(tmp_path):
    score = score_run(fake_run(tmp_path, "cube", "gray", metallic=0.75, perturbation=(0.5, 0.5, 1.0)), "a gray cube")
    assert score.metallic == pytest.approx(191 / 255, abs=1e-9)  # 0.75 stored as byte 191
    # (0.5, 0.5, 1) leans atan(sqrt(0.5)) = 35.26 degrees off the surface normal.
    assert score.normal_tilt == pytest.approx(math.degrees(math.atan(math.sqrt(0.5))), abs=0.3)


def test_texture_measures_read_exactly_the_texels_the_charts_cover(tmp_path):
    """Metallic 1 on one half of a torus: the mean over the covered texels is that half's share of
    the surface, while the filled gutters would pull a mean over the whole image elsewhere."""
    mesh = unwrap(primitive_mesh("torus"), texture_size=128)

    def material(positions):
        n = positions.shape[0]
        return {
            "kd": torch.full((n, 3), 0.5),
            "roughness": torch.full((n, 1), 0.5),
            "metallic": (positions[:, :1] > 0).float(),
            "occlusion": torch.zeros(n, 1),
            "normal_perturbation": torch.tensor([0.0, 0.0, 1.0]).expand(n, 3),
        }

    maps = bake_textures(mesh, material, size=128)
    covered = maps["mask"][..., 0] > 0
    assert torch.equal(uv_coverage(mesh.uvs, mesh.faces, 128), covered)
    texels = baked_texels(write_glb(tmp_path / "model.glb", mesh, maps))
    assert texels["metallic"].shape == (int(covered.sum()),)
    assert texels["metallic"].mean() == pytest.approx(float(maps["metallic"][..., 0][covered].mean()), abs=1e-6)
    assert abs(texels["metallic"].mean() - float(maps["metallic"].mean())) > 0.005


def test_two_pieces_and_the_cleanup_report_are_counted(tmp_path):
    cube = Placement(scale=0.6, rotation=0.4, offset=(0.0, 0.0, 0.0)).apply(primitive_mesh("cube"))
    speck = trimesh.creation.icosphere(1, radius=0.05)
    speck.apply_translation((0.0, 0.85, 0.0))
    mesh = Mesh.from_arrays(
        np.concatenate([cube.vertices.numpy(), speck.vertices]),
        np.concatenate([cube.faces.numpy(), speck.faces + cube.vertices.shape[0]]),
    )
    run = fake_run(tmp_path, "cube", "red", mesh=mesh)
    write_json(run / "report.json", {"status": "done", "mesh": {"pieces_removed": [{"faces": 24}, {"faces": 48}]}})
    score = score_run(run, "a red cube")
    assert (score.pieces, score.genus, score.topology_correct, score.pieces_removed) == (2, 0, False, 2)


def test_wrong_prompt_is_scored_wrong(tmp_path):
    score = score_run(fake_run(tmp_path, "sphere", "green"), "a blue cube")
    assert not score.shape_correct and not score.colour_correct
    assert score.predicted_shape == "sphere" and score.predicted_colour == "green"
    assert score.iou < 0.85
    assert score.delta_e == pytest.approx(delta_e(COLOURS["green"], COLOURS["blue"]), abs=1.0)
    rows = summarize([score])
    assert rows[0]["shape_accuracy"] == 0.0 and rows[0]["split"] == "held-in"
    assert "a blue cube" in markdown_table([score])


def test_colours_tilt_and_prompt_parsing():
    for name, value in COLOURS.items():
        assert nearest_colour(value) == (name, pytest.approx(0.0, abs=1e-3))
        assert delta_e(value, value) == 0.0
    assert delta_e((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)) == pytest.approx(100.0, abs=0.01)  # L* 100 vs 0
    assert normal_tilt(np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, -2.0, 0.0]])) == pytest.approx([0.0, 45.0, 90.0])
    assert [expected_genus(shape) for shape in ("sphere", "cube", "torus", "pyramid")] == [0, 0, 1, 0]
    assert parse_prompt("An orange torus, front view") == ("torus", "orange")
    with pytest.raises(ToyWorldError):
        parse_prompt("a red thing")
    with pytest.raises(ToyWorldError, match="no fixed proportions"):
        parse_prompt("a red box")


# ----- statistics on synthetic scores ----------------------------------------------------------


def synthetic(prompt, ablation, seed, iou, correct=True, delta=5.0):
    """A finished run's score with the given IoU, shape/colour/topology correctness and ΔE."""
    shape, colour = parse_prompt(prompt)
    return replace(
        failed_score(prompt, ablation, 60.0, seed),
        predicted_shape=shape if correct else "sphere",
        predicted_colour=colour if correct else "gray",
        shape_correct=correct, colour_correct=correct, topology_correct=correct,
        iou=iou, chamfer=0.01, delta_e=delta, pieces=1, genus=0, metallic=0.0, normal_tilt=3.0,
    )


PROMPTS = ["a red cube", "a green sphere", "a blue cylinder", "a purple torus", "a yellow cone"]


def test_wilson_and_bootstrap_intervals_on_known_cases():
    low, high = wilson_interval(8, 8)
    assert low == pytest.approx(8 / (8 + 1.959964**2), abs=1e-5) and high == 1.0
    # Two prompts, three seeds each, every run of one prompt 1 and of the other 0: resampling
    # prompts gives means 0, 0.5 or 1 (1/4, 1/2, 1/4), so the interval is [0, 1]; resampling the
    # six runs as if independent would give a much narrower one.
    values = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert bootstrap_mean(values, np.array(["a"] * 3 + ["b"] * 3)) == (0.5, 0.0, 1.0)
    mean, low, high = bootstrap_mean(np.full(7, 0.25), np.arange(7))
    assert (mean, low, high) == (0.25, 0.25, 0.25)
    # One prompt, its seeds differ: the seeds are resampled, so the interval is not a point. The
    # mean of 4 draws is 0.2 + 0.05 S, S the sum of 4 uniform draws from {0, 1, 2, 3}:
    # P(S <= 1) = 5/256 < 2.5 % < P(S <= 2) = 15/256, so the interval is [0.3, 0.7].
    mean, low, high = bootstrap_mean(np.array([0.2, 0.4, 0.6, 0.8]), np.zeros(4))
    assert mean == pytest.approx(0.5) and low == pytest.approx(0.3) and high == pytest.approx(0.7)
    # Unequal numbers of seeds per prompt (a prompt with one run) work the same way.
    mean, low, high = bootstrap_mean(np.array([0.3, 0.3, 0.3, 0.9]), np.array([0, 0, 0, 1]))
    assert mean == pytest.approx(0.45) and low == pytest.approx(0.3) and high == pytest.approx(0.9)
    assert sign_test(np.array([0.1, 0.2, -0.1, 0.0])) == (2, 1, 1, 1.0)
    assert sign_test(np.array([0.1, 0.2, -0.1, 0.0]), higher_is_better=False)[:3] == (1, 2, 1)
    assert sign_test(np.full(6, 0.5))[3] == pytest.approx(2 * 0.5**6)


def test_summary_over_seeds_has_means_and_intervals():
    scores = [synthetic(p, "full", seed, iou=0.5 + 0.1 * seed, correct=(seed != 2)) for seed in (0, 1, 2) for p in PROMPTS]
    (held_in, held_out) = summarize(scores)
    assert (held_in["runs"], held_in["prompts"], held_in["seeds"]) == (9, 3, [0, 1, 2])
    assert (held_out["runs"], held_out["prompts"]) == (6, 2)  # the purple torus and the yellow cone
    assert held_in["shape_accuracy"] == pytest.approx(6 / 9)
    assert held_in["shape_accuracy_ci"] == pytest.approx(list(wilson_interval(6, 9)))
    # IoU 0.5, 0.6, 0.7 for seeds 0, 1, 2 of every prompt: the interval comes from the seeds.
    assert held_in["iou"] == pytest.approx(0.6)
    ious = np.array([s.iou for s in scores if s.split == "held-in"])
    prompts = np.array([s.prompt for s in scores if s.split == "held-in"])
    assert held_in["iou_ci"] == list(bootstrap_mean(ious, prompts)[1:])
    assert 0.5 < held_in["iou_ci"][0] < 0.6 < held_in["iou_ci"][1] < 0.7
    assert held_in["flat_normal_tilt"] == 3.0 and held_out["flat_normal_tilt"] is None  # no cube in held-out
    assert held_in["metallic_ci"] == [0.0, 0.0]


def test_identical_ablations_differ_by_exactly_zero():
    scores = [
        synthetic(p, a, seed, iou=0.3 + 0.1 * i + 0.05 * seed)
        for a in ("full", "no_ama") for seed in (0, 1) for i, p in enumerate(PROMPTS)
    ]
    rows = paired_comparison(scores)
    splits = [(r["ablation"], r["split"], r["pairs"]) for r in rows]
    assert splits == [("no_ama", "held-in", 6), ("no_ama", "held-out", 4), ("no_ama", "all", 10)]
    for row in rows:
        assert row["iou_difference"] == 0.0 and row["iou_difference_ci"] == [0.0, 0.0]
        assert (row["iou_wins"], row["iou_losses"], row["iou_ties"], row["iou_p"]) == (0, 0, row["pairs"], 1.0)
        assert row["shape_accuracy_difference"] == 0.0 and row["delta_e_difference_ci"] == [0.0, 0.0]


def test_a_constant_shift_is_measured_exactly():
    full = [synthetic(p, "full", seed, iou=0.3 + 0.1 * i, delta=4.0) for seed in (0, 1, 2) for i, p in enumerate(PROMPTS)]
    worse = [replace(s, ablation="neither", iou=s.iou - 0.1, delta_e=6.5) for s in full]
    wrong = {("a red cube", 0), ("a green sphere", 1)}
    worse = [replace(s, shape_correct=False) if (s.prompt, s.seed) in wrong else s for s in worse]
    (row,) = [r for r in paired_comparison(full + worse[::-1]) if r["split"] == "all"]  # pairs match by prompt and seed
    assert row["pairs"] == 15
    assert row["iou_difference"] == pytest.approx(0.1)
    assert row["iou_difference_ci"] == pytest.approx([0.1, 0.1])
    assert (row["iou_wins"], row["iou_losses"], row["iou_ties"]) == (15, 0, 0)
    assert row["iou_p"] == pytest.approx(2 * 0.5**15)
    assert row["delta_e_difference"] == pytest.approx(-2.5)  # lower ΔE is better: full wins
    assert (row["delta_e_wins"], row["delta_e_losses"]) == (15, 0)
    assert row["shape_accuracy_difference"] == pytest.approx(2 / 15)
    assert (row["shape_accuracy_wins"], row["shape_accuracy_ties"], row["shape_accuracy_p"]) == (2, 13, 0.5)
    table = markdown_table(full + worse)
    assert "| neither | all | 15 | +0.100 [+0.100, +0.100] 15/0/0 p=6.1e-05 |" in table


def test_two_benchmarks_compare_on_their_shared_runs(tmp_path):
    """`xdreamer toy compare`: a benchmark whose every IoU is 0.1 higher than the other's, on the
    (prompt, seed) pairs both have, is measured +0.100 with a point interval and 12 wins; runs
    only one of them has are left out of every table."""
    from xdreamer.cli import main

    old = [synthetic(p, "full", seed, iou=0.3 + 0.1 * i) for seed in (0, 1, 2) for i, p in enumerate(PROMPTS[:4])]
    new = [replace(s, iou=s.iou + 0.1, seconds=50.0) for s in old] + [synthetic("a yellow cone", "full", 0, iou=0.9)]
    write_results(tmp_path / "old", old + [synthetic(p, "no_ama", 0, iou=0.2) for p in PROMPTS])
    write_results(tmp_path / "new", new)
    assert read_scores(tmp_path / "old") == old  # eval.json round trip, one ablation
    assert read_scores(tmp_path / "old" / "eval.json", "no_ama")[0].iou == 0.2
    table = comparison_table(read_scores(tmp_path / "new"), old)
    assert "| old | all | 12 | +0.100 [+0.100, +0.100] 12/0/0 p=0.00049 |" in table
    assert "| new | held-in | 9 |" in table and "| old | held-out | 3 |" in table  # the cone is not shared
    assert "yellow cone" not in table
    # Time: 10 s less per run is a win for new (lower is better).
    assert "| -10 [-10, -10] 12/0/0 p=0.00049 |" in table
    assert "| a red cube | held-in | 0,1,2 | 0.300 0.300 0.300 | 0.400 0.400 0.400 | +0.100 |" in table
    # From the command line: the same table on stdout and in --out.
    assert main(["toy", "compare", str(tmp_path / "new"), str(tmp_path / "old"), "--out", str(tmp_path / "cmp.md")]) == 0
    assert (tmp_path / "cmp.md").read_text() == table


def test_compare_errors_are_one_line(tmp_path, capsys):
    from xdreamer.cli import main

    write_results(tmp_path / "a", [synthetic("a red cube", "full", 0, iou=0.5)])
    write_results(tmp_path / "b", [synthetic("a red cube", "full", 1, iou=0.5)])
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "numbers.json").write_text('{"runs": [1, 2]}')
    old = json.loads((tmp_path / "a" / "eval.json").read_text())
    del old["runs"][0]["iou"]
    write_json(tmp_path / "old.json", old)
    cases = [
        ([str(tmp_path / "numbers.json"), str(tmp_path / "a")], "is not a benchmark's eval.json"),
        ([str(tmp_path / "old.json"), str(tmp_path / "a")], "lacks iou in its runs"),
        ([str(tmp_path / "none"), str(tmp_path / "a")], "no benchmark results at"),
        ([str(tmp_path / "bad.json"), str(tmp_path / "a")], "is not a benchmark's eval.json"),
        ([str(tmp_path / "a"), str(tmp_path / "a"), "--ablation", "no_ama"], "has no runs of ablation 'no_ama' (it has: full)"),
        ([str(tmp_path / "a"), str(tmp_path / "b")], "share no (prompt, seed) pair"),
        ([str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "missing" / "x.md")], "--out"),
        ([str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path)], "--out"),
    ]
    for args, fragment in cases:
        assert main(["toy", "compare", *args]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "missing").exists()


# ----- the benchmark loop ----------------------------------------------------------------------


def test_benchmark_scores_a_failed_run_as_a_miss_and_goes_on(tmp_path):
    """One prompt's run goes bad (status "failed"): it counts as wrong shape, wrong colour, IoU 0,
    and the next prompt is still generated and scored; rerunning regenerates only the failure."""
    calls = []
    torus = fake_run(tmp_path, "torus", "purple")

    def generate(prompt, run_dir, overrides):
        calls.append((prompt, overrides))
        run_dir.mkdir(parents=True, exist_ok=True)
        if prompt == "a red cube":
            write_json(run_dir / "report.json", {"status": "failed"})
            return 1
        shutil.copytree(torus, run_dir, dirs_exist_ok=True)
        write_json(run_dir / "report.json", {"status": "done"})
        return 0

    scores = run_benchmark(["a red cube", "a purple torus"], tmp_path / "bench", ["full"], generate)
    assert calls == [("a red cube", ["seed=0"]), ("a purple torus", ["seed=0"])]
    failed, good = scores
    assert (failed.shape_correct, failed.colour_correct, failed.iou, failed.chamfer) == (False, False, 0.0, None)
    assert (failed.pieces, failed.topology_correct, failed.metallic) == (None, False, None)
    assert good.shape_correct and good.colour_correct and good.iou >= 0.85 and good.topology_correct
    rows = summarize(scores)
    assert [(r["split"], r["shape_accuracy"]) for r in rows] == [("held-in", 0.0), ("held-out", 1.0)]
    assert rows[0]["delta_e"] is None  # the failed run has no texture to measure
    assert "(failed)" in (tmp_path / "bench" / "eval.md").read_text()

    calls.clear()
    run_benchmark(["a red cube", "a purple torus"], tmp_path / "bench", ["full"], generate)
    assert calls == [("a red cube", ["seed=0"])]  # the failed run is tried again; the finished one is only rescored


def test_benchmark_runs_every_seed_and_compares_ablations_in_pairs(tmp_path):
    calls = []
    torus = fake_run(tmp_path, "torus", "purple")

    def generate(prompt, run_dir, overrides):
        calls.append((run_dir.relative_to(tmp_path / "bench").as_posix(), overrides))
        shutil.copytree(torus, run_dir, dirs_exist_ok=True)
        write_json(run_dir / "report.json", {"status": "done", "mesh": {"pieces_removed": []}})
        return 0

    scores = run_benchmark(["a purple torus"], tmp_path / "bench", ["full", "no_ama"], generate, seeds=[0, 1])
    assert calls == [
        ("full/a_purple_torus/seed_0", ["seed=0"]),
        ("no_ama/a_purple_torus/seed_0", ["ama.enabled=false", "seed=0"]),
        ("full/a_purple_torus/seed_1", ["seed=1"]),
        ("no_ama/a_purple_torus/seed_1", ["ama.enabled=false", "seed=1"]),
    ]
    runs = [(s.ablation, s.seed, s.pieces_removed) for s in scores]
    assert runs == [("full", 0, 0), ("no_ama", 0, 0), ("full", 1, 0), ("no_ama", 1, 0)]
    results = json.loads((tmp_path / "bench" / "eval.json").read_text())
    assert set(results) == {"intervals", "summary", "paired", "runs"}
    assert [(r["ablation"], r["runs"], r["seeds"]) for r in results["summary"]] == [("full", 2, [0, 1]), ("no_ama", 2, [0, 1])]
    (paired,) = [r for r in results["paired"] if r["split"] == "all"]
    assert (paired["pairs"], paired["iou_difference"], paired["iou_ties"]) == (2, 0.0, 2)

    calls.clear()
    again = run_benchmark(["a purple torus"], tmp_path / "bench", ["full", "no_ama"], generate, seeds=[0, 1])
    assert calls == [] and [s.iou for s in again] == [s.iou for s in scores]
    with pytest.raises(ToyWorldError):
        run_benchmark(["a purple torus"], tmp_path / "bench", ["full"], generate, seeds=[0, 0])
    with pytest.raises(ToyWorldError):
        run_benchmark(["a purple torus"], tmp_path / "bench", ["full"], generate, seeds=[])


def test_front_objects_are_counted_only_where_they_apply():
    """Multi-face rate and front accuracy over the runs of objects with a front; None elsewhere;
    the held-out cube with a front lands in the held-out split."""
    fronts = {
        0: {"correct": True, "multi_face": False},
        1: {"correct": False, "multi_face": True},
        2: {"correct": False, "multi_face": False},
    }
    scores = [replace(synthetic("a red cube with a blue front", "full", seed, 0.8), front=fronts[seed]) for seed in fronts]
    scores += [synthetic("a red cube", "full", seed, 0.8) for seed in fronts]
    scores.append(replace(synthetic("a yellow cube with a red front", "full", 0, 0.8), front=fronts[1]))
    held_in, held_out = summarize(scores)
    assert (held_in["split"], held_out["split"]) == ("held-in", "held-out")
    assert held_in["front_accuracy"] == pytest.approx(1 / 3) and held_in["multi_face_rate"] == pytest.approx(1 / 3)
    assert held_out["multi_face_rate"] == 1.0 and held_in["runs"] == 6
    assert summarize(scores[3:6])[0]["multi_face_rate"] is None
    assert read_prompts("front") == FRONT_PROMPTS and len(read_prompts(None)) == 14
