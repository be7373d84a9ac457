"""`xdreamer batch`: the prompts file, run names, and real batches on a local Ray with the toy model:
a bad prompt fails alone, a killed driver's batch finishes on rerun without redoing finished runs,
and a killed run is retried from its checkpoint."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xdreamer.batch import BatchError, Job, error_line, read_jobs, run_names
from xdreamer.rundir import slug
from xdreamer.cli import main
from xdreamer.config import ConfigError, load_config
from xdreamer.toy.world import FRONT_SHAPES, SHAPES

# A toy run of a few seconds.
TINY = [
    "views=2", "device=cpu", "init.steps=20", "geometry.grid_resolution=16", "geometry.iters=6",
    "geometry.render_resolution=64", "appearance.iters=4", "appearance.render_resolution=64", "appearance.t_switch=2",
    "ama.start_geometry=2", "ama.start_appearance=1", "ama.visualize_every=2", "checkpoint_every=2",
    "validate_every=3", "export.texture_size=64", "export.turntable_frames=4", "export.turntable_resolution=64",
]
BAD = "geometry.grid_resolution=4"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----- the prompts file ---------------------------------------------------------------------------


def test_read_jobs_takes_plain_lines_and_json_lines(tmp_path):
    path = write(tmp_path / "prompts.txt", "\n".join([
        "a red cube",
        "",
        "# not a prompt",
        '{"prompt": "a red cube", "seed": 2, "overrides": ["geometry.iters=9"]}',
        '{"prompt": " a green sphere ", "overrides": {"ama.enabled": false, "negative_prompt": "blurry"}}',
    ]))
    assert read_jobs(path) == [
        Job("a red cube", None, (), 1),
        Job("a red cube", 2, ("geometry.iters=9",), 4),
        Job("a green sphere", None, ("ama.enabled=false", "negative_prompt=blurry"), 5),
    ]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"prompt": "a cube",', "prompts.txt:2: not valid JSON"),
        ('{"prompt": "a cube", "sed": 1}', "prompts.txt:2: unknown field 'sed'"),
        ('{"prompt": "a cube", "seed": "one"}', 'prompts.txt:2: "seed" must be an integer'),
        ('{"prompt": "a cube", "seed": true}', 'prompts.txt:2: "seed" must be an integer'),
        ('{"prompt": ""}', 'prompts.txt:2: "prompt" must be a non-empty string'),
        ('{"prompt": "a cube", "overrides": "geometry.iters=5"}', 'prompts.txt:2: "overrides" must be a list'),
        ('{"prompt": "a cube", "overrides": ["seed=4"]}', 'prompts.txt:2: give the seed as the "seed" field'),
    ],
)
def test_read_jobs_names_the_bad_line(tmp_path, line, fragment):
    path = write(tmp_path / "prompts.txt", f"a sphere\n{line}\n")
    with pytest.raises(BatchError) as caught:
        read_jobs(path)
    assert fragment in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_read_jobs_refuses_a_missing_or_empty_file(tmp_path):
    with pytest.raises(BatchError, match="prompts file not found"):
        read_jobs(tmp_path / "nope.txt")
    with pytest.raises(BatchError, match="has no prompts"):
        read_jobs(write(tmp_path / "empty.txt", "\n# only a comment\n"))


def test_run_names_add_the_seed_only_when_a_prompt_repeats(tmp_path):
    jobs = [Job("A red cube!", 0, (), 1), Job("a red cube", 1, (), 2), Job("a green sphere", 0, (), 3)]
    assert run_names(jobs, tmp_path / "p.txt") == ["a_red_cube_seed0", "a_red_cube_seed1", "a_green_sphere"]
    with pytest.raises(BatchError, match="lines 1 and 2 would both be run 'a_red_cube_seed0'"):
        run_names([Job("a red cube", 0, (), 1), Job("A red cube.", 0, (), 2)], tmp_path / "p.txt")
    assert slug("../../etc/passwd") == "etc_passwd"


def test_error_line_is_the_cli_message_or_the_last_words():
    assert error_line("loading\rstep 3\nxdreamer: error: the prompt is empty\n", 2) == "the prompt is empty"
    traceback = "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"
    assert error_line(traceback, 1) == "exit code 1: RuntimeError: boom"
    assert error_line("geometry: 40%|", -9) == "killed by SIGKILL"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_options_fail_before_anything_is_written(tmp_path, capsys):
    prompts = write(tmp_path / "prompts.txt", "a red cube\n")
    out = tmp_path / "out"
    for argv, fragment in [
        ([str(prompts), "--out", str(out), "--model", "toy", "geometry.nope=1"], "unknown config key 'geometry.nope'"),
        ([str(prompts), "--out", str(out), "--model", "toy", "seed=3"], "give the seed with --seed"),
        ([str(prompts), "--out", str(out), "--retries", "-1"], "--retries must be >= 0"),
        ([str(tmp_path / "nope.txt"), "--out", str(out)], "prompts file not found"),
        ([str(prompts), "--out", str(out), "--model", "toy", "--address", f"127.0.0.1:{_closed_port()}"],
         "cannot reach the Ray cluster at 127.0.0.1:"),
    ]:
        assert main(["batch", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("xdreamer: error: ") and fragment in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ----- batches on a local Ray ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    # A local Ray of two CPUs (Ray's resource override), so two runs of one core at a time.
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_OVERRIDE_RESOURCES='{"CPU": 2}')


def batch_argv(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xdreamer.cli", "batch", str(prompts), "--out", str(out), "--model", "toy",
            "--preset", "toy", *extra, *TINY]


def _wait(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _summary(out: Path) -> dict[str, dict]:
    try:
        return {row["name"]: row for row in json.loads((out / "summary.json").read_text())["runs"]}
    except FileNotFoundError:
        return {}


def _files(run: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.rglob("*")) if p.is_file()}


def _runs_of(out: Path):
    """The xdreamer generate/resume processes working in `out`."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "xdreamer.cli" in cmdline and any(word.startswith(str(out) + os.sep) for word in cmdline):
            found.append(process)
    return found


@pytest.fixture
def reap():
    """Kills, after the test, what a kill -9'd driver left behind (Ray's agents outlive it)."""
    import psutil

    left: list[psutil.Process] = []
    yield left
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_driver_killed_then_rerun_finishes_without_redoing_runs(tmp_path, reap):
    pytest.importorskip("ray", reason="the batch extra is not installed: pip install 'xdreamer[batch]'")
    import psutil

    prompts = write(tmp_path / "prompts.jsonl", "\n".join([
        "a red cube",
        '{"prompt": "a green sphere", "seed": 1}',
        f'{{"prompt": "a blue cylinder", "overrides": ["{BAD}"]}}',
        # Longer than the others, so it is still running when the driver is killed.
        '{"prompt": "a shiny teapot", "overrides": ["geometry.iters=40", "checkpoint_every=10", "validate_every=20"]}',
    ]))
    out = tmp_path / "out"
    driver = subprocess.Popen(batch_argv(prompts, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    teapot = out / "a_shiny_teapot"

    def mid_batch() -> bool:
        done = [name for name, row in _summary(out).items() if row["status"] == "done"]
        return len(done) >= 2 and (teapot / "config.yaml").is_file() and any((teapot / "checkpoints").glob("*"))

    assert _wait(mid_batch, timeout=240) and driver.poll() is None, f"not mid-batch: {_summary(out)}"
    reap.extend(psutil.Process(driver.pid).children(recursive=True))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # The runs die with their workers: none keeps working into the rerun.
    assert _wait(lambda: not _runs_of(out), timeout=60), [p.info["cmdline"] for p in _runs_of(out)]
    before = _summary(out)
    finished = sorted(name for name, row in before.items() if row["status"] == "done")
    assert {"a_red_cube", "a_green_sphere"} <= set(finished) and before["a_shiny_teapot"]["status"] == "running"
    untouched = {name: _files(out / name) for name in finished}

    rerun = subprocess.run(batch_argv(prompts, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr[-3000:]  # one run failed
    assert "batch of 4: 3 done, 1 failed" in rerun.stdout

    rows = _summary(out)
    assert [rows[n]["status"] for n in ["a_red_cube", "a_green_sphere", "a_blue_cylinder", "a_shiny_teapot"]] == [
        "done", "done", "failed", "done"]
    with pytest.raises(ConfigError) as expected:
        load_config(preset="toy", overrides=TINY + [BAD], prompt="a blue cylinder", model="toy")
    assert rows["a_blue_cylinder"]["error"] == str(expected.value)
    assert rows["a_blue_cylinder"]["attempts"] == 2  # once per invocation: a user error is not retried
    assert not (out / "a_blue_cylinder").exists()
    # Finished runs were skipped, to the byte and the mtime; the killed run was resumed, not restarted.
    for name in finished:
        assert _files(out / name) == untouched[name], name
        assert rows[name]["attempts"] == 1
    assert rows["a_shiny_teapot"]["attempts"] == 2
    assert f"xdreamer resume {teapot}" in (out / "logs" / "a_shiny_teapot.log").read_text()
    assert json.loads((teapot / "report.json").read_text())["status"] == "done"

    assert rows["a_green_sphere"]["seed"] == 1 and rows["a_red_cube"]["seed"] == 0
    for name in ["a_red_cube", "a_green_sphere", "a_shiny_teapot"]:
        assert rows[name]["glb"] == f"{name}/export/model.glb" and (out / rows[name]["glb"]).is_file()
        assert rows[name]["turntable"] == f"{name}/turntable.mp4" and rows[name]["wall_s"] > 0
    # Toy-world prompts are scored; the teapot is not one.
    for name in ["a_red_cube", "a_green_sphere"]:
        assert 0.0 <= rows[name]["iou"] <= 1.0 and rows[name]["predicted_shape"] in SHAPES + FRONT_SHAPES
    assert rows["a_shiny_teapot"]["iou"] is None
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == list(rows)
    assert [r["status"] for r in table] == [row["status"] for row in rows.values()]
    assert table[2]["error"] == rows["a_blue_cylinder"]["error"] and table[3]["iou"] == ""
    assert json.loads((out / "summary.json").read_text())["counts"] == {"done": 3, "failed": 1}


def test_a_killed_run_is_retried_from_its_checkpoint(tmp_path):
    pytest.importorskip("ray", reason="the batch extra is not installed: pip install 'xdreamer[batch]'")
    prompts = write(tmp_path / "prompts.txt", "a red cube\n")
    out = tmp_path / "out"
    run = out / "a_red_cube"
    driver = subprocess.Popen(
        batch_argv(prompts, out, "--retries", "1") + ["geometry.iters=20", "checkpoint_every=10", "validate_every=20"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert _wait(lambda: (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("*")) and _runs_of(out),
                 timeout=240)
    for process in _runs_of(out):
        process.kill()
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr[-3000:]
    assert "retrying 'a red cube': killed by SIGKILL" in stderr
    row = _summary(out)["a_red_cube"]
    assert (row["status"], row["attempts"], row["error"]) == ("done", 2, "")
    log = (out / "logs" / "a_red_cube.log").read_text()
    assert log.count("\n=== ") == 2 and f"xdreamer resume {run}" in log
