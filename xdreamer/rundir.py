"""The run directory: its layout, atomic checkpoints, the report, and stopping cleanly on signals."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from xdreamer.atomic import atomic_path, write_json

CHECKPOINT_NAME = "last.pt"


class RunError(ValueError):
    """A run directory that cannot be used (not a run, not writable, already taken)."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / CHECKPOINT_NAME

    @property
    def geometry(self) -> Path:
        return self.root / "geometry"

    @property
    def appearance(self) -> Path:
        return self.root / "appearance"

    @property
    def attention(self) -> Path:
        return self.root / "attention"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def turntable(self) -> Path:
        return self.root / "turntable.mp4"

    def make(self) -> None:
        for folder in (self.checkpoints, self.geometry, self.appearance, self.attention, self.export):
            folder.mkdir(parents=True, exist_ok=True)


def check_output_dir(root: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless `overwrite`, and a folder we cannot write to. Writes nothing."""
    if root.exists() and not root.is_dir():
        raise RunError(f"--out {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        hint = f"xdreamer resume {root}" if (root / "config.yaml").is_file() else "choose another --out"
        raise RunError(f"output directory {root} is not empty: pass --overwrite to replace it, or {hint}")
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"output directory {root} is not writable (no write permission on {probe})")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise RunError(f"output directory {root} is not writable: {exc.strerror}") from None


def clear_dir(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def open_run(root: Path) -> RunPaths:
    paths = RunPaths(root)
    if not root.is_dir():
        raise RunError(f"{root} is not a directory, so not an xdreamer run")
    if not paths.config.is_file():
        raise RunError(f"{root} is not an xdreamer run (no config.yaml); start one with xdreamer generate")
    return paths


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RunError(f"checkpoint {path} is unreadable: {type(exc).__name__}") from None


def write_report(paths: RunPaths, report: dict) -> None:
    write_json(paths.report, report)


def file_logger(paths: RunPaths, enabled: bool = True) -> logging.Logger:
    """A logger writing to the run's log file (append: resumed runs keep their history); with
    `enabled` false (data-parallel ranks other than 0) it writes nothing."""
    logger = logging.getLogger(f"xdreamer.run.{paths.root.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not enabled:
        logger.disabled = True
    elif not logger.handlers:
        handler = logging.FileHandler(paths.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the training loop checks between steps, so a stop always
    writes a checkpoint first. A second signal stops at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or 0)
