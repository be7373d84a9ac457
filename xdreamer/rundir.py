"""The run directory: its name, its layout, the lock that gives it to one process, checkpoints without pickle,
the report and progress files, replacing exports as one unit, and stopping cleanly on signals.

Nothing here deletes a file it did not write: `--overwrite` only ever clears a folder that is an
xdreamer run (its marker file, or a run made before the marker existed) holding nothing but the
entries a run writes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xdreamer.atomic import atomic_path, write_json

MARKER = ".xdreamer-run"
LOCK = ".lock"
CHECKPOINT_FORMAT = 1
# Every entry a run writes in its folder; `--overwrite` refuses a folder holding anything else.
RUN_ENTRIES = frozenset(
    {MARKER, LOCK, "config.yaml", "report.json", "progress.json", "run.log", "checkpoints", "geometry",
     "appearance", "attention", "export", "turntable.mp4", "export.old"}
)
_TEMPORARY = re.compile(r"^\..+\.tmp\d+(\..*)?$|^export\.tmp\d+$")


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
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def good_checkpoint(self) -> Path:
        """The latest regular checkpoint: where a run goes back to when it goes bad."""
        return self.checkpoints / "good.safetensors"

    @property
    def previous_checkpoint(self) -> Path:
        """The regular checkpoint before `good_checkpoint`, kept in case that one is damaged."""
        return self.checkpoints / "previous.safetensors"

    @property
    def next_checkpoint(self) -> Path:
        """A regular checkpoint being written, renamed to `good_checkpoint` once complete."""
        return self.checkpoints / "next.safetensors"

    @property
    def stop_checkpoint(self) -> Path:
        """Written when a signal stops the run between regular checkpoints; never restored to."""
        return self.checkpoints / "stop.safetensors"

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


def slug(prompt: str) -> str:
    """A run folder name from a prompt: lower-case ASCII words joined by "_" ("A red cube!" ->
    "a_red_cube"); a prompt without such letters or digits (emoji, punctuation) gets "run_" and a
    short hash of it, so two such prompts get two folders."""
    text = "".join(c if c.isascii() and c.isalnum() else "_" for c in prompt.strip().lower())
    text = "_".join(filter(None, text.split("_")))[:60]
    return text or "run_" + hashlib.sha256(prompt.encode()).hexdigest()[:8]


# ----- which folders may be written or replaced ---------------------------------------------------


def is_run(root: Path) -> bool:
    """A folder an xdreamer run made: its marker, or (runs from before the marker) a config.yaml
    beside a report.json whose versions name xdreamer."""
    if (root / MARKER).is_file():
        return True
    try:
        report = json.loads((root / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return (root / "config.yaml").is_file() and isinstance(report, dict) and "xdreamer" in report.get("versions", {})


def _locked_by(root: Path) -> int | None:
    """The pid holding the run's lock, 0 if held but unreadable, None if nobody holds it.
    Opens the lock file read-only, so it changes nothing."""
    path = root / LOCK
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def _in_use(root: Path) -> RunError:
    pid = _locked_by(root)
    return RunError(f"{root} is in use by another xdreamer process{f' (pid {pid})' if pid else ''}; wait for it or stop it")


def check_output_dir(root: Path, overwrite: bool) -> None:
    """Refuse what `generate --out root` must not touch: a non-empty folder (unless `overwrite`),
    with `overwrite` a folder that is not an xdreamer run or holds files a run did not write, a run
    in use by another process, and a folder we cannot write to. Writes nothing."""
    if root.exists() and not root.is_dir():
        raise RunError(f"--out {root} exists and is not a directory")
    if root.is_dir() and _locked_by(root) is not None:
        raise _in_use(root)
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            hint = f"xdreamer resume {root}" if is_run(root) else "choose another --out"
            raise RunError(f"output directory {root} is not empty: pass --overwrite to replace it, or {hint}")
        if not is_run(root):
            raise RunError(f"--overwrite only replaces an xdreamer run, and {root} is not one: choose another --out")
        foreign = sorted(p.name for p in root.iterdir() if p.name not in RUN_ENTRIES and not _TEMPORARY.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise RunError(f"{root} holds files that are not part of an xdreamer run ({shown}): move them or choose another --out")
    check_writable(root)


def check_writable(root: Path) -> None:
    """Refuse an output folder that is a file or that cannot be written (read-only, /proc, ...).
    Writes nothing that stays."""
    if root.exists() and not root.is_dir():
        raise RunError(f"output {root} exists and is not a directory")
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


def clear_run(root: Path) -> None:
    """Delete what a run wrote in `root` (not its lock, which the caller holds). `check_output_dir`
    has made sure nothing else is there."""
    for child in root.iterdir():
        if child.name == LOCK:
            continue
        if child.name not in RUN_ENTRIES and not _TEMPORARY.match(child.name):
            raise RunError(f"refusing to delete {child}: not written by an xdreamer run")
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


class RunLock:
    """An exclusive lock on a run directory for the life of this process (flock on `.lock`): the
    kernel drops it when the process ends, however it ends, so a kill -9 leaves no stale lock."""

    def __init__(self, root: Path):
        self.root = root
        self._file = None

    def acquire(self) -> RunLock:
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / LOCK, "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise _in_use(self.root) from None
        f.truncate(0)
        f.write(str(os.getpid()).encode())
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_temporaries(root: Path) -> list[Path]:
    """Delete the leftovers of writes a kill -9 interrupted (`.name.tmpPID.ext` files, `export.tmpPID`
    folders) and put back an export a swap left as `export.old`. Call with the lock held."""
    removed = []
    for path in sorted(root.rglob("*"), reverse=True):
        if _TEMPORARY.match(path.name) and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    old, export = root / "export.old", root / "export"
    if old.is_dir():
        if export.is_dir():
            shutil.rmtree(old)
        else:
            old.rename(export)
    return removed


def replace_folder(tmp: Path, target: Path) -> None:
    """Swap the finished folder `tmp` in for `target`: the old one is renamed away first and only
    deleted once the new one is in place, so an interruption leaves one whole set of files
    (`remove_temporaries` completes a swap cut short)."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


# ----- checkpoints: safetensors for tensors, JSON for the rest, a checksum over both --------------


def _flatten(value, tensors: dict, prefix: str):
    """Replace every tensor in a nested structure by a reference into `tensors` (JSON-able result)."""
    import torch

    if isinstance(value, torch.Tensor):
        key = prefix or "tensor"
        # A copy: safetensors refuses tensors that share storage (views of one buffer).
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint keys must be str or int at {prefix!r}")
        return {
            "__dict__": [[k, _flatten(v, tensors, f"{prefix}/{k}")] for k, v in value.items()]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint (at {prefix!r})")


def _unflatten(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def _checksum(tensors: dict, skeleton: str) -> str:
    import torch

    digest = hashlib.sha256(skeleton.encode())
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_checkpoint(path: Path, state: dict) -> None:
    """Save a nested state (dicts, lists, tuples, numbers, strings, tensors) atomically as one
    safetensors file: the tensors, plus the rest as JSON and a SHA-256 of both in its metadata."""
    import safetensors.torch

    tensors: dict = {}
    skeleton = json.dumps(_flatten(state, tensors, ""))
    metadata = {"format": str(CHECKPOINT_FORMAT), "state": skeleton, "sha256": _checksum(tensors, skeleton)}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)


def read_checkpoint(path: Path) -> dict:
    """Load what `write_checkpoint` saved; a damaged file (any flipped bit) raises RunError."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:
        raise RunError(f"checkpoint {path} is unreadable: {type(exc).__name__}") from None
    skeleton = metadata.get("state")
    if metadata.get("format") != str(CHECKPOINT_FORMAT) or skeleton is None:
        raise RunError(f"checkpoint {path} is not an xdreamer checkpoint of format {CHECKPOINT_FORMAT}")
    if _checksum(tensors, skeleton) != metadata.get("sha256"):
        raise RunError(f"checkpoint {path} is damaged (its checksum does not match)")
    try:
        return _unflatten(json.loads(skeleton), tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"checkpoint {path} is damaged: {type(exc).__name__}") from None


def write_report(paths: RunPaths, report: dict) -> None:
    write_json(paths.report, report)


def write_progress(paths: RunPaths, progress: dict) -> None:
    write_json(paths.progress, progress)


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


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


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
