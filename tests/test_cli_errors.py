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
