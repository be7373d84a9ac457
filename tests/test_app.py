"""`xdreamer app`: the checks on what the page asks for, the run queue, what the page says about a
run folder, and the page itself in headless Chromium (a toy run from the prompt to the 3D viewer)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from xdreamer.app.runs import (
    AppError,
    RunQueue,
    check_request,
    describe,
    latest_image,
    list_runs,
    new_run_name,
    obj_zip,
    run_state,
)
from xdreamer.config import ConfigError

MODELS = ["toy", "stabilityai/stable-diffusion-2-1-base"]
# A toy run of a few seconds, typed into the page's advanced box.
TINY = (
    "views=2 device=cpu init.steps=20 geometry.grid_resolution=16 geometry.iters=6 geometry.render_resolution=64 "
    "appearance.iters=4 appearance.render_resolution=64 appearance.t_switch=2 ama.start_geometry=2 "
    "ama.start_appearance=1 ama.visualize_every=2 checkpoint_every=2 validate_every=3 export.texture_size=64 "
    "export.turntable_frames=4 export.turntable_resolution=64"
)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# ----- what the page accepts -------------------------------------------------------------------------


def test_check_request_returns_the_overrides_of_a_good_form():
    words = check_request("a red cube", "toy", "toy", 3, 2, 'geometry.iters=7 negative_prompt="blurry, dark"', MODELS)
    assert words == ["geometry.iters=7", "negative_prompt=blurry, dark"]


@pytest.mark.parametrize(
    "model, advanced, error, fragment",
    [
        ("toy", "geometry.nope=1", ConfigError, "unknown config key 'geometry.nope'"),
        ("toy", "geometry.iters=many", ConfigError, "bad value for 'geometry.iters'"),
        ("toy", "views=0", ConfigError, "views must be"),
        ("toy", "--overwrite", AppError, "KEY=VALUE"),
        ("toy", 'negative_prompt="open', AppError, "advanced options"),
        ("/data/my_model", "", AppError, "not offered here"),
        ("toy", "model=/data/my_model", AppError, "not offered here"),
        ("toy", "init.shape=/etc/passwd", AppError, "name files"),
        ("toy", "appearance.environment=/etc/sky.hdr", AppError, "name files"),
    ],
)
def test_check_request_refuses_with_one_line(model, advanced, error, fragment):
    with pytest.raises(error) as caught:
        check_request("a red cube", model, "toy", 0, None, advanced, MODELS)
    message = str(caught.value)
    assert fragment in message and len(message.splitlines()) == 1


def test_empty_prompt_is_refused():
    with pytest.raises(ConfigError, match="the prompt is empty"):
        check_request("   ", "toy", "toy", 0, None, "", MODELS)


def test_run_names_stay_inside_the_runs_folder(tmp_path):
    (tmp_path / "a_red_cube").mkdir()
    assert new_run_name(tmp_path, "A red cube!", set()) == "a_red_cube_2"
    assert new_run_name(tmp_path, "a red cube", {"a_red_cube_2"}) == "a_red_cube_3"
    assert new_run_name(tmp_path, "../../etc/passwd", set()) == "etc_passwd"
    assert new_run_name(tmp_path, "/", set()).startswith("run_")


# ----- the queue ---------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def sleeper(ready: Path) -> list[str]:
    """A command that sleeps until SIGINT, then exits 130 like a stopped run; `ready` once it listens."""
    return _python(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )


def _wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_queue_runs_one_at_a_time_in_order_and_stops(tmp_path):
    queue = RunQueue([None])
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    try:
        queue.submit(a, sleeper(tmp_path / "a_ready"))
        queue.submit(b, sleeper(tmp_path / "b_ready"))
        queue.submit(c, _python("print('xdreamer: error: the prompt is empty'); raise SystemExit(2)"))
        assert _wait(lambda: (tmp_path / "a_ready").is_file())
        assert (queue.position(a), queue.position(b), queue.position(c)) == (0, 1, 2)
        with pytest.raises(AppError, match="already queued"):
            queue.submit(b, sleeper(tmp_path / "b_ready"))
        assert queue.stop(b)  # a waiting command just leaves the line
        assert queue.position(b) is None and queue.position(c) == 1
        assert queue.stop(a)  # the running one gets SIGINT and exits 130: a clean stop, no error
        assert _wait(lambda: queue.position(c) is None)
        assert not (tmp_path / "b_ready").exists()
        assert queue.error(a) == "" and queue.error(b) == ""
        assert queue.error(c) == "the prompt is empty"
        assert not queue.stop(a)
    finally:
        queue.close()


def test_two_devices_run_two_commands_at_once(tmp_path):
    queue = RunQueue([{"XD_DEVICE": "0"}, {"XD_DEVICE": "1"}])
    seen = tmp_path / "seen"
    seen.mkdir()
    script = _python(
        "import os, pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
        f"pathlib.Path({str(seen)!r}, os.environ['XD_DEVICE']).touch()\n"
        "time.sleep(60)\n"
    )
    try:
        queue.submit(tmp_path / "a", script)
        queue.submit(tmp_path / "b", script)
        assert _wait(lambda: queue.position(tmp_path / "a") == 0 and queue.position(tmp_path / "b") == 0)
        assert _wait(lambda: sorted(p.name for p in seen.iterdir()) == ["0", "1"])
    finally:
        queue.close()
    assert queue.position(tmp_path / "a") is None and queue.position(tmp_path / "b") is None


# ----- what the page says about a run folder -----------------------------------------------------------


def _run_folder(root: Path, name: str, report: dict | None = None, progress: dict | None = None) -> Path:
    run = root / name
    (run / "geometry").mkdir(parents=True)
    (run / "config.yaml").write_text(f"prompt: {name.replace('_', ' ')}\n")
    if report is not None:
        (run / "report.json").write_text(json.dumps({"prompt": name.replace("_", " "), **report}))
    if progress is not None:
        (run / "progress.json").write_text(json.dumps(progress))
    return run


def test_describe_each_state(tmp_path):
    queue = RunQueue([])  # no device: whatever is submitted waits
    try:
        live = _run_folder(tmp_path, "live", {"status": "running", "stage": "geometry", "step": 120}, {
            "status": "running", "stage": "geometry", "step": 120, "total": 150, "losses": {"sds": 93.71, "ama": 0.327},
            "elapsed_s": 75.0, "eta_s": 19.0, "image": "geometry/validation_00100.png", "pid": os.getpid(),
            "updated": time.time(),
        })
        done = _run_folder(tmp_path, "done", {"status": "done", "stage": "done", "step": 0,
                                              "timings_s": {"init": 1.5, "geometry": 40.0, "appearance": 20.0}})
        stopped = _run_folder(tmp_path, "stopped", {"status": "stopped", "stage": "appearance", "step": 40})
        dead_pid = subprocess.run(_python("import os; print(os.getpid())"), capture_output=True, text=True).stdout
        orphan = _run_folder(tmp_path, "orphan", {"status": "running", "stage": "geometry", "step": 8},
                             {"status": "running", "stage": "geometry", "step": 9, "total": 150, "losses": {},
                              "elapsed_s": 3.0, "eta_s": None, "image": None, "pid": int(dead_pid), "updated": 0})
        for age, run in enumerate([orphan, stopped, done, live]):
            os.utime(run / "config.yaml", (1e9 - age, 1e9 - age))
        waiting = tmp_path / "waiting"
        queue.submit(waiting, sleeper(tmp_path / "ready"))

        assert describe(live, queue) == (
            "**Running** — geometry step 120 / 150 · sds 93.71 · ama 0.327 · 1 min 15 s elapsed · ETA 19 s"
        )
        assert describe(done, queue) == "**Done** in 1 min 02 s — run folder `done`"
        assert describe(stopped, queue).startswith("**Stopped** at appearance step 40")
        assert run_state(orphan, queue) == "interrupted"
        # Resumed: until the new process writes progress.json, the old file says nothing about it.
        resumed = RunQueue([None])
        try:
            resumed.submit(orphan, sleeper(tmp_path / "orphan_ready"))
            assert _wait(lambda: (tmp_path / "orphan_ready").is_file())
            assert describe(orphan, resumed) == "**Starting** — loading the model"
        finally:
            resumed.close()
        assert describe(orphan, queue).startswith("**Interrupted** at geometry step 8")
        assert describe(waiting, queue).startswith("**Queued** — position 1 in line")
        assert [p.name for p in list_runs(tmp_path)] == ["orphan", "stopped", "done", "live"]
    finally:
        queue.close()


def test_latest_image_stays_inside_the_run(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    run = _run_folder(tmp_path, "run", progress={"image": "../secret.png"})
    assert latest_image(run) is None
    (run / "geometry" / "validation_00003.png").write_bytes(b"png")
    (run / "progress.json").write_text(json.dumps({"image": "geometry/validation_00003.png"}))
    assert latest_image(run) == (run / "geometry" / "validation_00003.png").resolve()


def test_obj_zip_holds_the_obj_its_mtl_and_textures_and_follows_a_reexport(tmp_path):
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    for name in ["model.obj", "model.mtl", "model_basecolor.png", "model_normal.png", "model.glb"]:
        (export / name).write_bytes(name.encode())
    target = obj_zip(tmp_path / "run")
    with zipfile.ZipFile(target) as archive:
        assert sorted(archive.namelist()) == ["model.mtl", "model.obj", "model_basecolor.png", "model_normal.png"]
        assert archive.read("model.obj") == b"model.obj"
    (export / "model.obj").write_bytes(b"re-exported")
    os.utime(export / "model.obj", (time.time() + 5, time.time() + 5))
    with zipfile.ZipFile(obj_zip(tmp_path / "run")) as archive:
        assert archive.read("model.obj") == b"re-exported"


def test_a_taken_port_is_one_line(tmp_path, capsys):
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install 'xdreamer[app]'")
    from xdreamer.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--runs", str(tmp_path / "runs"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xdreamer: error: cannot serve on 127.0.0.1:{port} (") and len(err.splitlines()) == 1
    assert err.endswith("): choose another --port or --host")


# ----- the page in a browser -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install 'xdreamer[app]'")
    runs = tmp_path_factory.mktemp("app") / "runs"
    port = _free_port()
    log = open(runs.parent / "server.log", "wb")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "xdreamer.cli", "app", "--runs", str(runs), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    try:
        assert _wait(up, timeout=120) and process.poll() is None, (runs.parent / "server.log").read_text()[-3000:]
        yield url, runs
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        # Debian's Chromium, never a browser playwright would download.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    """A fresh page of the app, recording console errors and any request leaving this machine."""
    url, _ = server
    context = browser.new_context(viewport={"width": 1400, "height": 1200})
    # No GPU adapter here: Babylon.js (the viewer) would log an error trying WebGPU before it
    # falls back to WebGL, so the page sees a browser without WebGPU.
    context.add_init_script("delete Navigator.prototype.gpu")
    opened = context.new_page()
    opened.errors, opened.remote = [], []
    opened.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
    opened.on("pageerror", lambda e: opened.errors.append(str(e)))
    local = ("http://127.0.0.1", "data:", "blob:")
    opened.on("request", lambda r: None if r.url.startswith(local) else opened.remote.append(r.url))
    opened.goto(url)
    opened.locator("#prompt textarea").wait_for()
    yield opened
    context.close()


def _fill_form(page, prompt: str, advanced: str) -> None:
    page.locator("#prompt textarea").fill(prompt)
    if not page.locator("#advanced textarea").is_visible():
        page.locator("#advanced-accordion").get_by_text("Advanced: KEY=VALUE overrides").click()
    page.locator("#advanced textarea").fill(advanced)


def _wait_for_end(page) -> None:
    """Until the run is done (or failed: then the page's status line is the test's message)."""
    page.locator("#status").get_by_text(re.compile("Done|Failed")).wait_for(timeout=150_000)
    status = page.locator("#status").inner_text()
    assert "Done" in status, status


def test_page_refuses_a_bad_override_with_its_message(page, server):
    _, runs = server
    _fill_form(page, "a red cube", "geometry.nope=1")
    page.locator("#generate").click()
    message = page.locator("#message")
    message.get_by_text("unknown config key 'geometry.nope'").wait_for(timeout=30_000)
    assert "Traceback" not in message.inner_text()
    assert not list_runs(runs)
    assert page.errors == [] and page.remote == []


def _canvas_variance(page, shot: Path) -> float:
    """Pixel variance of the middle of the viewer's canvas (away from the label and buttons on it)."""
    import imageio.v3 as iio

    page.locator("#viewer canvas").screenshot(path=str(shot))
    pixels = iio.imread(shot)[..., :3].astype(np.float64)
    h, w = pixels.shape[:2]
    return float(pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].var(axis=(0, 1)).sum())


def test_page_generates_a_red_cube_and_shows_it_in_3d(page, server, tmp_path):
    _, runs = server
    _fill_form(page, "a red cube", TINY)
    page.locator("#generate").click()
    with page.expect_response(lambda r: r.url.endswith("/model.glb"), timeout=150_000) as glb:
        _wait_for_end(page)
    assert glb.value.status == 200

    run = runs / "a_red_cube"
    assert json.loads((run / "report.json").read_text())["status"] == "done"
    assert glb.value.body() == (run / "export" / "model.glb").read_bytes()
    page.locator("#viewer canvas").wait_for(timeout=30_000)
    # The viewer has drawn the asset once the middle of its canvas is no longer one flat colour.
    assert _wait(lambda: _canvas_variance(page, tmp_path / "viewer.png") > 50.0, timeout=30), "blank 3D viewer"
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    # Downloads: the GLB as written, and the OBJ with its MTL and textures in one zip.
    with page.expect_download() as download:
        page.locator("#download-glb").click()
    assert Path(download.value.path()).read_bytes() == (run / "export" / "model.glb").read_bytes()
    with page.expect_download() as download:
        page.locator("#download-obj").click()
    with zipfile.ZipFile(download.value.path()) as archive:
        assert {"model.obj", "model.mtl", "model_basecolor.png"} <= set(archive.namelist())
        assert archive.read("model.obj") == (run / "export" / "model.obj").read_bytes()
    page.locator("#runs").get_by_text("a red cube — done").wait_for(timeout=10_000)
    assert page.errors == [] and page.remote == []


def test_page_stops_a_run_and_resumes_it(page, server):
    _, runs = server
    _fill_form(page, "a green sphere", TINY + " geometry.iters=40 checkpoint_every=10 validate_every=20")
    page.locator("#generate").click()
    run = runs / "a_green_sphere"
    assert _wait(lambda: (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()), timeout=120)
    page.locator("#stop").click()
    page.locator("#status").get_by_text("Stopped").wait_for(timeout=60_000)
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "stopped" and report["stage"] in ("init", "geometry")
    stopped_at = report["step"]
    assert stopped_at < 40

    page.locator("#resume").click()
    _wait_for_end(page)
    assert json.loads((run / "report.json").read_text())["status"] == "done"
    assert page.errors == [] and page.remote == []
