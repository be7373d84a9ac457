"""Run configuration: one small dataclass per component, merged from a preset, an optional YAML file
and dotted command-line overrides (`geometry.iters=500`) with OmegaConf."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PAPER_MODEL = "stabilityai/stable-diffusion-2-1-base"


class ConfigError(ValueError):
    """A preset, config file or override that cannot be used."""


@dataclass
class CameraConfig:
    radius: list[float] = field(default_factory=lambda: [3.0, 3.0])
    fov_deg: list[float] = field(default_factory=lambda: [25.7, 45.0])
    elevation_deg: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_deg: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    jitter: float = 0.05  # principal-point shift, NDC
    overhead_elevation: float = 60.0  # above this a view is labelled "overhead"


@dataclass
class InitConfig:
    shape: str = "ellipsoid"  # "ellipsoid" or a mesh file path
    radii: list[float] = field(default_factory=lambda: [0.56, 0.76, 0.56])
    steps: int = 400
    lr: float = 1e-3


@dataclass
class GeometryConfig:
    grid_resolution: int = 128
    grid_scale: float = 2.1
    encoding: str = "hash"  # hash | frequency
    hash_log2_table_size: int = 19
    iters: int = 3000
    lr: float = 1e-3
    render_resolution: int = 512
    # Early phase: [normal, mask] used directly as the 4 latent channels (latent models only).
    latent_phase_iters: int = 1000
    t_range_early: list[float] = field(default_factory=lambda: [0.02, 0.5])
    t_range: list[float] = field(default_factory=lambda: [0.02, 0.5])
    weighting_early: str = "sds"
    weighting: str = "fantasia3d"
    guidance_scale: float = 100.0


@dataclass
class AppearanceConfig:
    iters: int = 2000
    lr: float = 1e-2
    encoding: str = "hash"
    hash_log2_table_size: int = 19
    render_resolution: int = 512
    t_range_early: list[float] = field(default_factory=lambda: [0.1, 0.98])
    t_range: list[float] = field(default_factory=lambda: [0.1, 0.5])
    t_switch: int = 500  # step at which t_range_early gives way to t_range
    weighting: str = "fantasia3d"
    guidance_scale: float = 100.0
    metallic: str = "learned"  # learned | zero (the authors' code)
    # The occlusion output darkens shading uniformly, which SDS cannot tell from a darker kd;
    # off by default so the baked albedo stays true (appearance.occlusion=true learns it).
    occlusion: bool = False
    environment: str = ""  # .hdr/.exr path; empty: the project's procedural sky
    environment_scale: float = 2.0
    background: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


@dataclass
class CGLoRAConfig:
    enabled: bool = True
    rank: int = 4
    targets: str = "cross"  # cross (the authors' code) | all
    optimizer: str = "sgd"  # sgd (the authors': lr 1e-5, clip 5) | adamw
    lr: float = 1e-5
    grad_clip: float = 5.0


@dataclass
class AMAConfig:
    enabled: bool = True
    weight: float = 0.1
    layers: str = "all"  # all (paper) | last (what the authors' code ends up using)
    scores: str = "softmax"  # softmax (paper) | pre_softmax (the authors' code)
    norm: str = "l1"  # l1 | l2
    token: int = -1  # -1: the end-of-text token; otherwise a token index
    start_geometry: int = 1000
    start_appearance: int = 500
    visualize_every: int = 500


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["glb", "obj"])
    texture_size: int = 2048
    turntable_frames: int = 72
    turntable_resolution: int = 512
    fps: int = 24


@dataclass
class RunConfig:
    prompt: str = MISSING
    negative_prompt: str = ""
    model: str = PAPER_MODEL
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    views: int = 4  # cameras per step, azimuth-stratified
    half_precision: bool = True  # fp16 UNet on CUDA; always fp32 on CPU
    checkpoint_every: int = 100
    validate_every: int = 500
    max_nan_skips: int = 20  # consecutive skipped steps before restoring the last good checkpoint
    camera: CameraConfig = field(default_factory=CameraConfig)
    init: InitConfig = field(default_factory=InitConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    cg_lora: CGLoRAConfig = field(default_factory=CGLoRAConfig)
    ama: AMAConfig = field(default_factory=AMAConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("xdreamer.presets").iterdir() if p.name.endswith(".yaml"))


def _valid_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, DictConfig):
            keys.extend(_valid_keys(value, dotted + "."))
    return keys


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        if "not in struct" in str(exc) or "Key '" in str(exc) and "not in" in str(exc):
            nearest = difflib.get_close_matches(str(key), _valid_keys(base), n=1, cutoff=0.0)
            hint = f" (did you mean '{nearest[0]}'?)" if nearest else ""
            raise ConfigError(f"unknown config key '{key}' in {source}{hint}") from None
        message = str(exc).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' in {source}: {message}") from None


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] = (),
    **explicit,
) -> DictConfig:
    """Resolve a run config: dataclass defaults < preset < config file < explicit args < overrides.

    `explicit` holds the dedicated command-line flags (prompt, model, seed, ...); None means unset."""
    cfg = OmegaConf.structured(RunConfig)
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(f"unknown preset '{preset}' (choose from: {', '.join(preset_names())})")
        text = resources.files("xdreamer.presets").joinpath(f"{preset}.yaml").read_text()
        cfg = _merge(cfg, OmegaConf.create(text), f"preset '{preset}'")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"cannot read config file {path}: {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, loaded, str(path))
    set_flags = {k: v for k, v in explicit.items() if v is not None}
    if set_flags:
        cfg = _merge(cfg, OmegaConf.create(set_flags), "command-line flags")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            dotlist = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse override '{item}': {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, dotlist, f"override '{item}'")
    check_config(cfg)
    return cfg


_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "geometry.encoding": ("hash", "frequency"),
    "appearance.encoding": ("hash", "frequency"),
    "geometry.weighting_early": ("sds", "fantasia3d", "uniform"),
    "geometry.weighting": ("sds", "fantasia3d", "uniform"),
    "appearance.weighting": ("sds", "fantasia3d", "uniform"),
    "appearance.metallic": ("learned", "zero"),
    "cg_lora.targets": ("cross", "all"),
    "cg_lora.optimizer": ("sgd", "adamw"),
    "ama.layers": ("all", "last"),
    "ama.scores": ("softmax", "pre_softmax"),
    "ama.norm": ("l1", "l2"),
}


def check_config(cfg: DictConfig) -> None:
    """Value checks OmegaConf's types cannot express; raises ConfigError with one line."""
    if OmegaConf.is_missing(cfg, "prompt") or not str(cfg.prompt).strip():
        raise ConfigError("the prompt is empty: give a text prompt, e.g. xdreamer generate \"a red cube\"")
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
    positive = ["views", "geometry.grid_resolution", "geometry.render_resolution", "appearance.render_resolution",
                "export.texture_size", "export.turntable_frames", "export.turntable_resolution", "checkpoint_every",
                "cg_lora.rank", "export.fps"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    for key in ["geometry.iters", "appearance.iters", "init.steps", "geometry.latent_phase_iters"]:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}")
    if not 8 <= cfg.geometry.grid_resolution <= 512:
        raise ConfigError(f"geometry.grid_resolution must be in [8, 512], got {cfg.geometry.grid_resolution}")
    for key in ["geometry.t_range_early", "geometry.t_range", "appearance.t_range_early", "appearance.t_range"]:
        lo, hi = OmegaConf.select(cfg, key)
        if not 0.0 < lo <= hi < 1.0:
            raise ConfigError(f"{key} must satisfy 0 < min <= max < 1, got [{lo}, {hi}]")
    if len(cfg.init.radii) != 3 or min(cfg.init.radii) <= 0:
        raise ConfigError(f"init.radii must be three positive numbers, got {list(cfg.init.radii)}")
    for fmt in cfg.export.formats:
        if fmt not in ("glb", "obj"):
            raise ConfigError(f"export format '{fmt}' is not one of: glb, obj")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
