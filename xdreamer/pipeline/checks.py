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

# Bytes a step holds per view and rendered pixel: the upper envelope of peak RSS over views x
# pixels measured on the CPU with the toy model and AMA on (benchmarks/bench_memory.py: 480-610 at
# 256-512, 1800 at 128 where the model's per-view share weighs more; the 1000 views at
# 128 died at 21.4 GB, 1300 per pixel).
BYTES_PER_VIEW_PIXEL = 1500
# A latent model's share per view on top: its VAE encoder graph at 512 (1.48 GiB) and the UNet's
# conditional half under autograd for AMA (1.05 GiB), SD 2.1-base in float16
# (benchmarks/vram_estimate.py).
LATENT_MODEL_BYTES_PER_VIEW = int(2.53 * 2**30)
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


SD_UNET_PARAMETERS = 865_910_724  # SD 2.1-base's UNet


def _model_size_ratio(model: str) -> float:
    """How big the guidance model is next to SD 2.1-base: 0 for the toy model (its share is in
    BYTES_PER_VIEW_PIXEL), the UNet weight file's size over SD's for a local folder, else 1."""
    if model == "toy":
        return 0.0
    unet = Path(model).expanduser() / "unet"
    files = [f for f in unet.glob("*") if f.suffix in (".safetensors", ".bin")] if unet.is_dir() else []
    if not files:
        return 1.0
    # Read as float16 weights (a float32 file counts double, erring on the safe side).
    return min(f.stat().st_size for f in files) / 2 / SD_UNET_PARAMETERS


def check_memory(cfg: DictConfig, device: torch.device) -> None:
    """Refuse a number of views whose step cannot fit in the memory free now, naming how many would.
    The estimate is deliberately rough (any model but the toy one is taken as SD-sized): it is
    there to stop runs the out-of-memory killer would end, not to plan to the last gigabyte."""
    model_bytes_per_view = int(_model_size_ratio(cfg.model) * LATENT_MODEL_BYTES_PER_VIEW)
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
