"""One test per row of the README's error table: one line on stderr, exit 2, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xdreamer.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_user_error(code, err, fragment):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("xdreamer: error: ")
    assert fragment in err, err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


def test_empty_prompt(capsys, out):
    code, err = run_cli(capsys, "generate", "   ", "--out", str(out), "--model", "toy")
    assert_user_error(code, err, "prompt is empty")
    assert not out.exists()


def test_unknown_preset(capsys, out):
    code, err = run_cli(capsys, "generate", "a cube", "--preset", "quick", "--out", str(out))
    assert_user_error(code, err, "unknown preset 'quick'")
    assert not out.exists()


def test_unknown_config_key_names_nearest(capsys, out):
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "ama.wieght=0.3")
    assert_user_error(code, err, "did you mean 'ama.weight'")
    assert not out.exists()


def test_bad_value_type(capsys, out):
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "geometry.iters=lots")
    assert_user_error(code, err, "geometry.iters")
    assert not out.exists()


def test_init_mesh_missing_unreadable_empty(capsys, tmp_path, out):
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "--init", str(tmp_path / "nope.obj"))
    assert_user_error(code, err, "mesh file not found")
    garbage = tmp_path / "garbage.glb"
    garbage.write_bytes(b"\x00\x01 definitely not a glb")
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "--init", str(garbage))
    assert_user_error(code, err, "mesh")
    empty = tmp_path / "empty.obj"
    empty.write_text("# no faces\nv 0 0 0\n")
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "--init", str(empty))
    assert_user_error(code, err, "no triangles")
    assert not out.exists()


def test_bound_radius_must_not_cut_an_initial_mesh(capsys, tmp_path, out):
    tetrahedron = tmp_path / "tet.obj"
    tetrahedron.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n")
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "--init", str(tetrahedron), "geometry.bound_radius=0.9")
    assert_user_error(code, err, "geometry.bound_radius must be at least 1 with an initial mesh")
    assert not out.exists()


def test_output_not_writable(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "generate", "a cube", "--model", "toy", "--out", str(blocker / "run"))
    assert_user_error(code, err, "not writable")


def test_output_not_empty_is_not_overwritten(capsys, out):
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("keep me")
    code, err = run_cli(capsys, "generate", "a cube", "--model", "toy", "--out", str(out))
    assert_user_error(code, err, "--overwrite")
    assert keep.read_text() == "keep me"


def test_model_not_found_offline(capsys, out):
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "--model", "nonexistent-org/nonexistent-model")
    assert_user_error(code, err, "nonexistent-org/nonexistent-model")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys, out):
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(out), "--device", "cuda")
    assert_user_error(code, err, "no CUDA")
    assert not out.exists()


def test_resume_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "resume", str(tmp_path))
    assert_user_error(code, err, "not an xdreamer run")
    code, err = run_cli(capsys, "resume", str(tmp_path / "missing"))
    assert_user_error(code, err, "not a directory")


def test_render_bad_input(capsys, tmp_path):
    code, err = run_cli(capsys, "render", str(tmp_path / "none.obj"), "--out", str(tmp_path / "v"))
    assert_user_error(code, err, "mesh file not found")


def test_console_script_prints_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "xdreamer.cli", "generate", "", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    result = subprocess.run(
        [sys.executable, "-m", "xdreamer.cli", "generate", "x", "--bogus-flag"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_environment_map_missing(capsys, tmp_path, out):
    code, err = run_cli(capsys, "generate", "a cube", "--model", "toy", "--out", str(out),
                        "--environment", str(tmp_path / "sky.hdr"))
    assert_user_error(code, err, "environment map not found")
    assert not out.exists()


def test_render_bad_resolution_and_views(capsys, tmp_path):
    import trimesh

    mesh = tmp_path / "box.obj"
    trimesh.creation.box().export(mesh)
    code, err = run_cli(capsys, "render", str(mesh), "--out", str(tmp_path / "v"), "--resolution", "0")
    assert_user_error(code, err, "resolution")
    code, err = run_cli(capsys, "render", str(mesh), "--out", str(tmp_path / "v"), "--views", "-3")
    assert_user_error(code, err, "views")
    assert not (tmp_path / "v").exists()


# ----- nothing is touched before everything is checked (issue: never lose a user's data) ----------


def _finished_run(tmp_path) -> Path:
    """A folder that looks like a finished run to --overwrite (marker, config, report, outputs)."""
    run = tmp_path / "old_run"
    for name in ["export", "checkpoints", "geometry"]:
        (run / name).mkdir(parents=True)
    (run / ".xdreamer-run").write_text("xdreamer 0.1.0\n")
    (run / "config.yaml").write_text("prompt: an old cube\n")
    (run / "report.json").write_text('{"status": "done", "versions": {"xdreamer": "0.1.0"}}')
    (run / "export" / "model.glb").write_bytes(b"glTF old asset")
    return run


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--seed", "99999999999999999999"], "seed must be in [0, 2^63)"),
        (["--seed", "-1"], "seed must be in [0, 2^63)"),
        (["negative_prompt=${oops}"], "negative_prompt"),
        (["camera.radius={a: 1}"], "camera.radius"),
        (["camera.radius=[3]"], "camera.radius must be two numbers"),
        (["camera.radius=[0.1,0.1]"], "camera.radius must be more than"),
        (["camera.fov_deg=[0,0]"], "camera.fov_deg must satisfy 1 <= min"),
        (["camera.fov_deg=[1,2,3]"], "camera.fov_deg must be two numbers"),
        (["appearance.kd_range=[0.5,0.5]"], "appearance.kd_range must satisfy min < max"),
        (["appearance.kd_range=[-0.1,0.9]"], "appearance.kd_range must satisfy 0 <= min"),
        (["geometry.bound_radius=1.2"], "geometry.bound_radius must be in (0, 1.05)"),
        (["init.flat_base=null", "geometry.bound_radius=0.7"], "init.radii must be less than geometry.bound_radius (0.7)"),
        (["geometry.bound_radius=0.75"], "the initial ellipsoid cut at init.flat_base 0.5 reaches 0.758 from the centre"),
        (["init.flat_base=0.76"], "init.flat_base must be in (0, 0.76) (init.radii[1]), or empty, got 0.76"),
        (["init.flat_base=-0.1"], "init.flat_base must be in (0, 0.76)"),
        (["appearance.lr=nan"], "appearance.lr must be a finite number"),
        (["geometry.lr=0"], "geometry.lr must be positive"),
        (["export.texture_size=3"], "export.texture_size must be in [16, 8192]"),
        (["--views", "1000"], "views must be in [1, 64]"),
        (["--views", "64", "geometry.render_resolution=2048"], "use --views"),
        (["nosuch=5"], "unknown config key 'nosuch'"),
        (["ama.norm=l2"], "ama.norm='l2' is not one of"),
    ],
)
def test_overwrite_checks_everything_before_deleting(capsys, tmp_path, extra, fragment):
    run = _finished_run(tmp_path)
    before = _snapshot(run)
    code, err = run_cli(capsys, "generate", "a red cube", "--model", "toy", "--preset", "toy", "--out", str(run),
                        "--overwrite", *extra)
    assert_user_error(code, err, fragment)
    assert _snapshot(run) == before


def test_unknown_key_without_a_near_match_gets_no_misleading_suggestion(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(tmp_path / "r"), "nosuch=5")
    assert_user_error(code, err, "unknown config key 'nosuch'")
    assert "did you mean" not in err and "sections:" in err


def test_overwrite_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (project / "config.yaml").write_text("prompt: not ours\n")
    before = _snapshot(project)
    code, err = run_cli(capsys, "generate", "a red cube", "--model", "toy", "--out", str(project), "--overwrite")
    assert_user_error(code, err, "--overwrite only replaces an xdreamer run")
    assert _snapshot(project) == before


def test_overwrite_refuses_a_run_holding_foreign_files(capsys, tmp_path):
    run = _finished_run(tmp_path)
    (run / "notes.txt").write_text("my notes")
    before = _snapshot(run)
    code, err = run_cli(capsys, "generate", "a red cube", "--model", "toy", "--out", str(run), "--overwrite")
    assert_user_error(code, err, "notes.txt")
    assert _snapshot(run) == before


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("- just\n- a list\n", "must hold a mapping"),
        ("prompt: x\ngeometry:\n  itres: 5\n", "did you mean 'geometry.iters'"),
        ("prompt: x\ncamera:\n  radius: {a: 1}\n", "camera.radius"),
        ("prompt: [unclosed\n", "cannot read config file"),
    ],
)
def test_config_file_of_the_wrong_shape(capsys, tmp_path, text, fragment):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    code, err = run_cli(capsys, "generate", "a cube", "--out", str(tmp_path / "r"), "--config", str(config))
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


def test_emoji_prompts_get_distinct_folders():
    from xdreamer.rundir import slug

    assert slug("a red cube!") == "a_red_cube"
    assert slug("🚀🚀") != slug("🌵") and slug("🚀🚀").startswith("run_")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--texture-size", "-5"], "--texture-size must be in [16, 8192]"),
        (["--texture-size", "100000"], "--texture-size must be in [16, 8192]"),
        (["--texture-size", "0"], "--texture-size must be in [16, 8192]"),
        (["--format", ""], "--format is empty"),
        (["--format", "fbx"], "export format 'fbx'"),
        (["--max-faces", "-1"], "--max-faces must be 0 (no simplification) or more, got -1"),
    ],
)
def test_export_bad_options(capsys, tmp_path, argv, fragment):
    run = _finished_run(tmp_path)
    before = _snapshot(run)
    code, err = run_cli(capsys, "export", str(run), *argv)
    assert_user_error(code, err, fragment)
    assert _snapshot(run) == before


def test_render_out_is_a_file_or_unwritable(capsys, tmp_path):
    import trimesh

    mesh = tmp_path / "box.obj"
    trimesh.creation.box().export(mesh)
    existing = tmp_path / "a_file.txt"
    existing.write_text("keep")
    code, err = run_cli(capsys, "render", str(mesh), "--out", str(existing))
    assert_user_error(code, err, "is not a directory")
    assert existing.read_text() == "keep"
    code, err = run_cli(capsys, "render", str(mesh), "--out", "/proc/xdreamer_views")
    assert_user_error(code, err, "not writable")


def test_resume_after_editing_a_structural_key(capsys, tmp_path):
    run = tmp_path / "run"
    code = main(["generate", "a red cube", "--model", "toy", "--preset", "toy", "--out", str(run), "--seed", "3",
                 "init.steps=5", "geometry.grid_resolution=16", "geometry.iters=2", "geometry.render_resolution=32",
                 "appearance.iters=0", "export.texture_size=32", "export.turntable_frames=2",
                 "export.turntable_resolution=32", "ama.start_geometry=0"])
    assert code == 0
    capsys.readouterr()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("encoding: frequency", "encoding: hash", 1))
    code, err = run_cli(capsys, "resume", str(run))
    assert_user_error(code, err, "changed geometry.encoding ('frequency' -> 'hash')")


def test_toy_train_from_a_missing_model(capsys, tmp_path):
    code, err = run_cli(capsys, "toy", "train", "--out", str(tmp_path / "toy"), "--init", str(tmp_path / "nope"))
    assert_user_error(code, err, "--init")
    assert not (tmp_path / "toy").exists()
    code, err = run_cli(capsys, "toy", "train", "--out", str(tmp_path / "toy"), "--sampling", "balanced")
    assert_user_error(code, err, "--sampling balanced: use one of uniform, shapes")
    assert not (tmp_path / "toy").exists()
    for option, value, message in (
        ("--channels", "48,96", "--channels 48,96: give three block widths"),
        ("--channels", "48,x,96", "--channels 48,x,96: give three block widths"),
        ("--channels", "12,24,24", "--channels 12,24,24: give three block widths, each a multiple of 8"),
        ("--resolution", "30", "--resolution 30: must be a multiple of 4"),
        ("--device", "gpu7", "--device gpu7: not a device"),
    ):
        code, err = run_cli(capsys, "toy", "train", "--out", str(tmp_path / "toy"), option, value)
        assert_user_error(code, err, message)
        assert not (tmp_path / "toy").exists()
