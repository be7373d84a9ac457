"""What is checked before a run touches a single file: the device, the input files, and whether the
asked-for batch of views can fit in memory (a run that the out-of-memory killer ends after minutes
loses the user's time and says nothing)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from xdreamer.config import ConfigError
from xdreamer.mesh import load_mesh
from xdreamer.render.light import read_hdr_image

# Bytes a step holds per view per rendered pixel, measured with the torch rasterizer (the largest
# of the geometry and appearance steps, forward and backward, toy preset; see
# benchmarks/bench_memory.py), with the guidance model's share on top (`_model_bytes_per_view`).
BYTES_PER_VIEW_PIXEL = 2600
MEMORY_HEADROOM = 0.8  # use at most this share of the memory that is free when the run starts


class DeviceError(ValueError):
    """A device the machine does not have."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but this machine has no CUDA GPU (use --device cpu or auto)")
    return torch.device(name)


def check_inputs(cfg: DictConfig) -> None:
    """Input files are read now, not when their stage comes hours later; their paths become
    absolute so the saved config still finds them from another working directory."""
    if cfg.appearance.environment:
        read_hdr_image(cfg.appearance.environment)  # raises EnvironmentMapError (one line)
        cfg.appearance.environment = str(Path(cfg.appearance.environment).resolve())
    if cfg.init.shape != "ellipsoid":
        mesh = load_mesh(cfg.init.shape)  # raises MeshError (one line) when missing/unreadable/empty
        if float(mesh.vertices.norm(dim=-1).max()) == 0.0:
            raise ConfigError(f"init mesh {cfg.init.shape} is degenerate (all vertices at one point)")
        cfg.init.shape = str(Path(cfg.init.shape).resolve())


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run on `device` now (GPU memory on CUDA, MemAvailable on a Linux CPU),
    None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def step_memory(cfg: DictConfig, views: int, model_bytes_per_view: int = 0) -> int:
    """Estimated bytes one optimization step holds for `views` views: the renders and their
    backward at the larger of the two stages' resolutions, plus the guidance model's activations."""
    pixels = max(cfg.geometry.render_resolution, cfg.appearance.render_resolution) ** 2
    return views * (pixels * BYTES_PER_VIEW_PIXEL + model_bytes_per_view)


def check_memory(cfg: DictConfig, device: torch.device, model_bytes_per_view: int = 0) -> None:
    """Refuse a number of views whose step cannot fit in the memory free now, naming how many would."""
    free = available_memory(device)
    if free is None:
        return
    budget = MEMORY_HEADROOM * free
    need = step_memory(cfg, cfg.views, model_bytes_per_view)
    if need > budget:
        fits = max(0, int(budget // max(1, step_memory(cfg, 1, model_bytes_per_view))))
        resolution = max(cfg.geometry.render_resolution, cfg.appearance.render_resolution)
        raise ConfigError(
            f"--views {cfg.views} at {resolution}x{resolution} needs about {need / 2**30:.1f} GiB but "
            f"{free / 2**30:.1f} GiB is free on {device.type}; use --views {fits} or fewer, or a smaller render_resolution"
        )
