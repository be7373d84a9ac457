"""The page's runs: a queue of `xdreamer` subprocesses (one at a time per device), the checks on
what the page asks for, and what a run folder says about its state. No Gradio here."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from xdreamer.batch import error_line, read_json, run_status, start_cli
from xdreamer.rundir import slug

OUTPUT_TAIL_BYTES = 65536  # enough of a run's console output to find its error line


class AppError(ValueError):
    """A request the page cannot run (bad advanced options, a model not offered, a busy run)."""


# ----- the queue ------------------------------------------------------------------------------------


@dataclass
class Command:
    run_dir: Path
    argv: list[str]
    process: subprocess.Popen | None = None


class RunQueue:
    """`xdreamer` commands run in submission order, one at a time on each device.

    Each device has a worker thread that lives as long as the server: it starts the commands, so
    their parent-death signal (SIGTERM: the run checkpoints and stops) fires only when the server
    itself dies."""

    def __init__(self, device_envs: list[dict[str, str] | None]):
        self._changed = threading.Condition()
        self._waiting: list[Command] = []
        self._running: dict[Path, Command] = {}
        self._errors: dict[Path, str] = {}  # the last failed command's error line, per run
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(env,), daemon=True) for env in device_envs]
        for thread in self._threads:
            thread.start()

    def submit(self, run_dir: Path, argv: list[str]) -> None:
        with self._changed:
            if self.position(run_dir) is not None:
                raise AppError(f"run {run_dir.name} is already queued or running")
            self._errors.pop(run_dir, None)
            self._waiting.append(Command(run_dir, argv))
            self._changed.notify()

    def position(self, run_dir: Path) -> int | None:
        """0: running; k: k-th in line; None: neither."""
        with self._changed:
            if run_dir in self._running:
                return 0
            for index, command in enumerate(self._waiting):
                if command.run_dir == run_dir:
                    return index + 1
            return None

    def pid(self, run_dir: Path) -> int | None:
        """The process id of the command running on `run_dir`, if one is."""
        with self._changed:
            command = self._running.get(run_dir)
            return None if command is None else command.process.pid

    def waiting_names(self) -> set[str]:
        with self._changed:
            return {c.run_dir.name for c in self._waiting} | {p.name for p in self._running}

    def error(self, run_dir: Path) -> str:
        with self._changed:
            return self._errors.get(run_dir, "")

    def stop(self, run_dir: Path) -> bool:
        """SIGINT to the running command (the run checkpoints and stops) or take it out of the line."""
        with self._changed:
            if run_dir in self._running:
                self._running[run_dir].process.send_signal(signal.SIGINT)
                return True
            before = len(self._waiting)
            self._waiting = [c for c in self._waiting if c.run_dir != run_dir]
            return len(self._waiting) != before

    def close(self, timeout: float = 120.0) -> None:
        """Stop taking commands; stop the running ones cleanly and wait for their checkpoints."""
        with self._changed:
            self._closed = True
            self._waiting.clear()
            for command in self._running.values():
                command.process.send_signal(signal.SIGINT)
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _work(self, env: dict[str, str] | None) -> None:
        while True:
            with tempfile.TemporaryFile() as output:
                with self._changed:
                    while not self._waiting and not self._closed:
                        self._changed.wait()
                    if self._closed:
                        return
                    command = self._waiting.pop(0)
                    command.process = start_cli(
                        command.argv, output, signal.SIGTERM, None if env is None else {**os.environ, **env}
                    )
                    self._running[command.run_dir] = command
                code = command.process.wait()
                output.seek(max(0, output.seek(0, os.SEEK_END) - OUTPUT_TAIL_BYTES))
                printed = output.read().decode("utf-8", errors="replace")
            with self._changed:
                del self._running[command.run_dir]
                # A stop: the run's own exit codes after a signal, or the signal itself when it came
                # before the run could catch it (still starting up).
                if code not in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
                    self._errors[command.run_dir] = error_line(printed, code)


def device_envs() -> list[dict[str, str] | None]:
    """One environment per CUDA device (the run sees only its device), or [None]: the CPU."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": i} for i in ids] or [None]


# ----- requests and run folders -----------------------------------------------------------------------


def check_request(
    prompt: str, model: str, preset: str, seed, views, advanced: str, models: list[str]
) -> list[str]:
    """Validate the form with the CLI's config code; returns the advanced overrides.
    Raises ConfigError or AppError with one line."""
    from xdreamer.config import load_config

    try:
        words = shlex.split(advanced or "")
    except ValueError as exc:
        raise AppError(f"advanced options: {exc}") from None
    not_overrides = [w for w in words if "=" not in w or w.startswith("-")]
    if not_overrides:
        raise AppError(f"advanced options are KEY=VALUE words, e.g. geometry.iters=500; got {not_overrides[0]!r}")
    if model not in models:
        raise AppError(f"model {model!r} is not offered here (choose from: {', '.join(models)})")
    cfg = load_config(
        preset=preset, overrides=words, prompt=prompt, model=model,
        seed=None if seed is None else int(seed), views=None if views is None else int(views),
    )
    if cfg.model not in models:
        raise AppError(f"model {cfg.model!r} is not offered here (choose from: {', '.join(models)})")
    if cfg.init.shape != "ellipsoid" or cfg.appearance.environment:
        raise AppError("init.shape and appearance.environment name files, which the page does not use: "
                       "run xdreamer generate for those")
    return words


def new_run_name(runs: Path, prompt: str, taken: set[str]) -> str:
    """The prompt's slug, or slug_2, slug_3, ... when that folder exists or is queued."""
    base = slug(prompt)
    name, index = base, 1
    while (runs / name).exists() or name in taken:
        index += 1
        name = f"{base}_{index}"
    return name


def list_runs(runs: Path) -> list[Path]:
    """Run folders directly in `runs`, newest first."""
    found = [p for p in runs.iterdir() if not p.name.startswith(".") and (p / "config.yaml").is_file()]
    return sorted(found, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)


def find_run(runs: Path, name: str | None) -> Path | None:
    """A run folder of the listing by its name; None for any other name."""
    return next((p for p in list_runs(runs) if p.name == name), None)


def thumbnail(run_dir: Path) -> Path | None:
    """The latest validation image, appearance before geometry."""
    for stage in ("appearance", "geometry"):
        images = sorted((run_dir / stage).glob("validation_*.png"), key=lambda p: p.stat().st_mtime)
        if images:
            return images[-1]
    return None


def obj_zip(run_dir: Path) -> Path:
    """export/model_obj.zip: the OBJ, its MTL and textures, rebuilt when any of them is newer."""
    from xdreamer.atomic import atomic_path

    export = run_dir / "export"
    files = [export / "model.obj", export / "model.mtl", *sorted(export.glob("model_*.png"))]
    files = [f for f in files if f.is_file()]
    target = export / "model_obj.zip"
    if not target.is_file() or target.stat().st_mtime < max(f.stat().st_mtime for f in files):
        with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for f in files:
                archive.write(f, arcname=f.name)
    return target


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def run_state(run_dir: Path, queue: RunQueue) -> str:
    """queued | running | done | stopped | failed | interrupted (a run no process works on)."""
    position = queue.position(run_dir)
    if position is not None:
        return "queued" if position else "running"
    status = run_status(run_dir)
    if queue.error(run_dir) or status == "failed":
        return "failed"
    if status in ("done", "stopped"):
        return status
    progress = read_json(run_dir / "progress.json") or {}
    return "running" if _pid_alive(progress.get("pid")) else "interrupted"


def describe(run_dir: Path, queue: RunQueue) -> str:
    """The status line of a run, in markdown."""
    state = run_state(run_dir, queue)
    report = read_json(run_dir / "report.json") or {}
    where = f"{report.get('stage', 'init')} step {report.get('step', 0)}"
    if state == "queued":
        return f"**Queued** — position {queue.position(run_dir)} in line (runs go one at a time per device)"
    if state == "running":
        progress = read_json(run_dir / "progress.json")
        # Until our command writes its own progress, the file is an earlier process's.
        if progress is None or queue.pid(run_dir) not in (None, progress["pid"]):
            return "**Starting** — loading the model"
        losses = " · ".join(f"{k} {v:.4g}" for k, v in progress["losses"].items())
        eta = "" if progress["eta_s"] is None else f" · ETA {_duration(progress['eta_s'])}"
        return (
            f"**Running** — {progress['stage']} step {progress['step']} / {progress['total']}"
            f"{' · ' + losses if losses else ''} · {_duration(progress['elapsed_s'])} elapsed{eta}"
        )
    if state == "done":
        return f"**Done** in {_duration(sum(report.get('timings_s', {}).values()))} — run folder `{run_dir.name}`"
    if state == "stopped":
        return f"**Stopped** at {where} — **Resume** continues from its checkpoint"
    if state == "failed":
        return f"**Failed** at {where}: {queue.error(run_dir) or report.get('error', 'see run.log in ' + run_dir.name)}"
    return f"**Interrupted** at {where} (the server stopped) — **Resume** continues from its last checkpoint"


def latest_image(run_dir: Path) -> Path | None:
    """The validation image progress.json points at (inside the run folder), else the thumbnail."""
    progress = read_json(run_dir / "progress.json") or {}
    if progress.get("image"):
        image = (run_dir / progress["image"]).resolve()
        if image.is_relative_to(run_dir.resolve()) and image.is_file():
            return image
    return thumbnail(run_dir)


def run_prompt(run_dir: Path) -> str:
    report = read_json(run_dir / "report.json")
    if report is not None:
        return report["prompt"]
    from omegaconf import OmegaConf

    return str(OmegaConf.load(run_dir / "config.yaml").prompt)
