"""Run configuration: one small dataclass per component, merged from a preset, an optional YAML file
and dotted command-line overrides (`geometry.iters=500`) with OmegaConf."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PAPER_MODEL = "stabilityai/stable-diffusion-2-1-base"


class ConfigError(ValueError):
    """A preset, config file or override that cannot be used."""


@dataclass
class CameraConfig:
    radius: list[float] = field(default_factory=lambda: [3.0, 3.0])
    fov_deg: list[float] = field(default_factory=lambda: [25.7, 45.0])
    elevation_deg: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    # The share of views drawn from overhead_elevation_deg instead (0: none, as in the paper).
    # A torus' hole is seen through only from above about 34 degrees, and the toy model learned
    # its overhead views at 60-80 degrees.
    overhead_fraction: float = 0.0
    overhead_elevation_deg: list[float] = field(default_factory=lambda: [60.0, 80.0])
    azimuth_deg: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    jitter: float = 0.05  # principal-point shift, NDC
    overhead_elevation: float = 60.0  # above this a view is labelled "overhead" (at most overhead_elevation_deg[0])


@dataclass
class InitConfig:
    shape: str = "ellipsoid"  # "ellipsoid" or a mesh file path
    radii: list[float] = field(default_factory=lambda: [0.56, 0.76, 0.56])
    # Cut the ellipsoid flat this far below its centre (world units, less than radii[1]) and centre
    # what is left; empty: the whole ellipsoid (the paper's). Like radii, unused with a mesh.
    # Views stop 10 degrees below the horizon, so little reshapes the underside it starts with: on
    # the toy world 0.5 gives cones and pyramids their base and spheres a flat bottom
    # (docs/benchmarks.md, "A flat base under the initial ellipsoid").
    flat_base: float | None = None
    steps: int = 400
    lr: float = 1e-3


@dataclass
class GeometryConfig:
    grid_resolution: int = 128
    grid_scale: float = 2.1
    encoding: str = "hash"  # hash | frequency
    hash_log2_table_size: int = 19
    frequency_count: int = 6  # sin/cos octaves of the frequency encoding
    # Largest vertex offset in world units; empty: 1 / grid_resolution, the authors' bound (about
    # half a cell at scale 2.1). On this project's Kuhn grid a tetrahedron can invert beyond 1/6
    # of a cell per axis: grid_scale / (6 * grid_resolution) rules that out.
    max_offset: float | None = None
    # The shape is intersected with the ball of this radius (world units) about the grid's centre,
    # so a shape that keeps growing stays closed instead of being cut open by the grid's faces
    # (empty: the whole grid, as in the authors' code).
    bound_radius: float | None = None
    iters: int = 3000
    lr: float = 1e-3
    render_resolution: int = 512
    # Early phase: [normal, mask] used directly as the 4 latent channels (latent models only).
    latent_phase_iters: int = 1000
    t_range_early: list[float] = field(default_factory=lambda: [0.02, 0.5])
    t_range: list[float] = field(default_factory=lambda: [0.02, 0.5])
    # A final phase: from step t_final_from on, t is drawn from t_range_final instead (empty: no
    # final phase). Lower noise there refines what the model sees only at low t, such as edges.
    t_range_final: list[float] | None = None
    t_final_from: int = 0
    weighting_early: str = "sds"
    weighting: str = "fantasia3d"
    guidance_scale: float = 100.0
    # Appended to the prompt for the normal-map renders of this stage (", normal map" for the toy
    # model, which was trained with it; SD keeps the prompt as it is).
    prompt_suffix: str = ""
    # With direction_prompts, whether this stage's prompts carry the view word too ("..., front
    # view"); false: the geometry stage is prompted without it and only the appearance stage
    # names the camera's side.
    direction_prompts: bool = True
    # Regularizers (0 = off, as in the authors' code): mesh normal consistency, uniform Laplacian
    # smoothness, and nvdiffrec's SDF sign regularizer on the grid edges that cross the surface.
    normal_consistency_weight: float = 0.0
    laplacian_weight: float = 0.0
    sdf_weight: float = 0.0
    # Weight of the silhouette's pull on the vertices against the shading's: the gradient that
    # reaches them through the antialiased edge pixels is scaled by it (1 = the renderer's own, as
    # nvdiffrast gives it; the rendered images are the same whatever it is).
    silhouette_weight: float = 1.0
    # The silhouette weight of the first silhouette_switch steps (empty: silhouette_weight from
    # the start): a stronger pull while the topology forms, the plain one while the shape settles.
    silhouette_weight_early: float | None = None
    silhouette_switch: int = 0
    # Silhouette carving (xdreamer/geometry/carving.py; 0 = off, as in the paper): where the
    # guidance's denoised image shows background inside the silhouette, push the SDF outward
    # along those pixels' rays, so holes (a torus, a handle) can open. The denoised image is
    # predicted at carve_guidance_scale (the stage's own scale exaggerates colours into black
    # specks); pixel values below carve_threshold count as background.
    carve_weight: float = 0.0
    carve_guidance_scale: float = 4.0
    carve_threshold: float = 0.1
    # Steps a carved ray stays carved (1: only the step whose denoised image showed the hole),
    # once holes were shown on carve_confirm of those steps. The guidance shows a hole on few
    # steps and SDS fills it back between them; a memory keeps it open, the confirmation keeps
    # a lone dark patch from drilling a tunnel (geometry/carving.py, CarvedRays).
    carve_memory: int = 1
    carve_confirm: int = 2
    # The stage counts as collapsed (and goes back to its last good checkpoint with half the
    # learning rate) when the mesh's area falls below this fraction of the initial shape's: on
    # the way to nothing SDS can leave slivers that never recover (a white pyramid, 0.10).
    collapse_fraction: float = 0.05
    # Loose pieces with less than this fraction of the largest piece's area are dropped from the
    # stage's final mesh, and so are cavities, enclosed pockets that no viewer can see (0 keeps
    # everything); see xdreamer/geometry/cleanup.py for the choice.
    min_piece_fraction: float = 0.02


@dataclass
class AppearanceConfig:
    iters: int = 2000
    lr: float = 1e-2
    encoding: str = "hash"
    hash_log2_table_size: int = 19
    frequency_count: int = 8  # sin/cos octaves of the frequency encoding
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
    # Linear base colour bounds (Fantasia3D's and the authors' [0.03, 0.97], i.e. 0.19-0.99 sRGB).
    kd_range: list[float] = field(default_factory=lambda: [0.03, 0.97])
    # Largest tilt of the learned normal perturbation from the surface normal, degrees
    # (METHOD's xy in [-1, 1], z in [0, 1] allows 90).
    max_normal_tilt_deg: float = 90.0
    environment: str = ""  # .hdr/.exr path; empty: the project's procedural sky
    environment_scale: float = 2.0
    background: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


@dataclass
class CGLoRAConfig:
    enabled: bool = True
    rank: int = 4
    targets: str = "all"  # all (the paper: every attention's linear embeddings) | cross (the authors' code)
    scale: float = 0.1  # the update's scale (the authors'; the paper's formula: 1)
    dropout: float = 0.1  # on the update (the authors'; the paper's formula: 0)
    # normalized_sgd: SGD on the gradient rescaled to norm grad_clip, a step of length lr * grad_clip
    # (5e-5 with the defaults) -- what the authors' SGD(1e-5) + clip(5) does to gradients still
    # multiplied by their GradScaler (x65536). sgd: that optimizer on unscaled gradients (barely
    # moves). adamw: AdamW with the same clip.
    optimizer: str = "normalized_sgd"
    lr: float = 1e-5
    grad_clip: float = 5.0
    # Fresh adapters and camera MLP for the appearance stage, as in the authors' code (its two
    # stages are separate runs); false carries the geometry stage's on (the paper does not say).
    per_stage: bool = True
    # Which projections of each targeted attention get adapters (the paper and the authors' code:
    # all four). [to_q, to_k] lets AMA move the attention maps without changing what they write.
    projections: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out"])


@dataclass
class AMAConfig:
    enabled: bool = True
    weight: float = 0.1
    # all: every cross-attention layer, mean over layers (the paper). last: only the last
    # highest-resolution map, still divided by the number of layers -- what the authors' code
    # computes (an assignment in its loop keeps the last term, then divides by 7), so with
    # weight 0.1 its effective weight is 0.1/7 on that one map.
    layers: str = "all"
    scores: str = "softmax"  # softmax (paper) | pre_softmax (the authors' code)
    norm: str = "l1"  # l1: mean |A - mask| (the authors') | mse: mean (A - mask)^2
    normalize: str = "sample"  # min-max per view (paper) | batch: over the whole batch (the authors')
    # eot: the end-of-text column. eot_pair: the mean of the prompt's and the empty prompt's
    # end-of-text columns (what the authors' indexing computes). An integer: that token's column.
    token: str = "eot"
    start_geometry: int = 1000
    start_appearance: int = 500
    visualize_every: int = 500
    # Every this many steps the attention-mask alignment (IoU of the thresholded maps with the
    # mask, per map resolution) is measured and recorded, with AMA on or off (0: never).
    diagnose_every: int = 10


@dataclass
class RenderConfig:
    backend: str = "auto"  # auto (nvdiffrast when a CUDA context can be made, else torch) | torch | nvdiffrast


@dataclass
class GuidanceConfig:
    attention_slicing: bool = False  # sliced attention in the UNet and VAE: less memory, slower
    cpu_offload: bool = False  # the text encoder stays on the CPU (it runs once per prompt)
    gradient_checkpointing: bool = False  # recompute UNet activations in AMA's backward: less memory
    loss_scaling: bool = True  # dynamic loss scaling of the backward through a half-precision UNet


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["glb", "obj"])
    texture_size: int = 2048
    # The exported mesh is simplified (quadric edge collapses, topology kept) to at most this many
    # faces, its normal map baked from the full mesh; 0: export marching tetrahedra's mesh as it is
    # (155 k faces for a sphere of radius 0.6 at grid 128).
    max_faces: int = 100000
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
    direction_prompts: bool = True  # "{prompt}, front view" etc. per camera; false: the prompt alone
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
    render: RenderConfig = field(default_factory=RenderConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("xdreamer.presets").iterdir() if p.name.endswith(".yaml"))


def _valid_keys(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema, read from the dataclasses (no values touched)."""
    keys = []
    for f in dataclasses.fields(schema):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in _SECTIONS):
            keys.extend(_valid_keys(_SECTIONS[f.type] if isinstance(f.type, str) else f.type, dotted + "."))
    return keys


def _nearest_key(key: str) -> str | None:
    """The valid key a typo most likely meant, or None when nothing is close."""
    valid = _valid_keys()
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    return leaves[match[0]] if match else None


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", None) or "")
        if "not in struct" in str(exc) or "Key '" in str(exc) and "not in" in str(exc):
            nearest = _nearest_key(key)
            hint = f" (did you mean '{nearest}'?)" if nearest else f" (sections: {', '.join(_SECTIONS_ORDER)})"
            raise ConfigError(f"unknown config key '{key}' in {source}{hint}") from None
        message = str(exc).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' in {source}: {message}") from None
    except (ValueError, TypeError, AttributeError) as exc:
        key = _mismatched_key(base, other)
        where = f"for '{key}' " if key else ""
        raise ConfigError(f"bad value {where}in {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _mismatched_key(base, other, prefix: str = "") -> str | None:
    """The first dotted key where `other` puts a mapping, a list or a scalar where `base` has
    another kind of value (OmegaConf's own error does not name it)."""
    if not isinstance(other, (dict, DictConfig)):
        return None
    for key in other:
        dotted = f"{prefix}{key}"
        if not isinstance(base, DictConfig) or key not in base:
            continue
        mine, theirs = base._get_node(key), other[key]
        kinds = [
            "map" if isinstance(v, (dict, DictConfig)) else "list" if isinstance(v, (list, ListConfig)) else "value"
            for v in (mine, theirs)
        ]
        if kinds[0] != kinds[1]:
            return dotted
        if kinds[0] == "map":
            found = _mismatched_key(mine, theirs, dotted + ".")
            if found:
                return found
    return None


def _resolved(cfg: DictConfig, source: str) -> DictConfig:
    """The config with every ${...} interpolation resolved, or a one-line error naming the key."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", None) or "")
        raise ConfigError(f"bad value for '{key}' in {source}: {str(exc).splitlines()[0]}") from None
    return _merge(OmegaConf.structured(RunConfig), container, source)


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] = (),
    **explicit,
) -> DictConfig:
    """Resolve a run config: dataclass defaults < preset < config file < explicit args < overrides.

    `explicit` holds the dedicated command-line flags (prompt, model, seed, ...); None means unset.
    The result has no interpolations left and passes `check_config`; every problem is a one-line
    ConfigError."""
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
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping of keys (like a run's config.yaml), not a {type(loaded).__name__}")
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
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            # A value YAML cannot read (the shell ate its quotes: geometry.prompt_suffix=, normal map)
            # is taken as the plain string it was typed as.
            try:
                dotlist = OmegaConf.from_dotlist([f"{key}=x"])
                OmegaConf.update(dotlist, key, value, force_add=True)
            except OmegaConfBaseException:
                raise ConfigError(f"cannot parse override '{item}': {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, dotlist, f"override '{item}'")
    cfg = _resolved(cfg, "the config")
    check_config(cfg)
    return cfg


_SECTIONS = {
    "CameraConfig": CameraConfig, "InitConfig": InitConfig, "GeometryConfig": GeometryConfig,
    "AppearanceConfig": AppearanceConfig, "CGLoRAConfig": CGLoRAConfig, "AMAConfig": AMAConfig,
    "RenderConfig": RenderConfig, "GuidanceConfig": GuidanceConfig, "ExportConfig": ExportConfig,
}
_SECTIONS_ORDER = [f.name for f in dataclasses.fields(RunConfig) if isinstance(f.type, str) and f.type in _SECTIONS]

_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "geometry.encoding": ("hash", "frequency"),
    "appearance.encoding": ("hash", "frequency"),
    "geometry.weighting_early": ("sds", "fantasia3d", "uniform"),
    "geometry.weighting": ("sds", "fantasia3d", "uniform"),
    "appearance.weighting": ("sds", "fantasia3d", "uniform"),
    "appearance.metallic": ("learned", "zero"),
    "cg_lora.targets": ("all", "cross"),
    "cg_lora.optimizer": ("normalized_sgd", "sgd", "adamw"),
    "ama.layers": ("all", "last"),
    "ama.scores": ("softmax", "pre_softmax"),
    "ama.norm": ("l1", "mse"),
    "ama.normalize": ("sample", "batch"),
    "render.backend": ("auto", "torch", "nvdiffrast"),
}
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a 64-bit integer
# (key, low, high): inclusive bounds of sizes that a run would otherwise fail on late or run out of memory with.
_INT_BOUNDS = [
    ("views", 1, 64),
    ("geometry.grid_resolution", 8, 512),
    ("geometry.render_resolution", 16, 2048),
    ("appearance.render_resolution", 16, 2048),
    ("export.texture_size", 16, 8192),
    ("export.turntable_frames", 1, 3600),
    ("export.turntable_resolution", 16, 4096),
    ("export.fps", 1, 240),
    ("checkpoint_every", 1, 10**9),
    ("max_nan_skips", 1, 10**6),
    ("cg_lora.rank", 2, 256),
    ("geometry.hash_log2_table_size", 10, 24),
    ("appearance.hash_log2_table_size", 10, 24),
    ("geometry.frequency_count", 1, 16),
    ("geometry.carve_memory", 1, 10**6),
    ("geometry.carve_confirm", 1, 10**6),
    ("appearance.frequency_count", 1, 16),
]
_NON_NEGATIVE_INTS = ["export.max_faces", "geometry.iters", "appearance.iters", "init.steps", "geometry.latent_phase_iters",
                      "appearance.t_switch", "geometry.t_final_from", "geometry.silhouette_switch", "validate_every", "ama.start_geometry",
                      "ama.start_appearance", "ama.visualize_every", "ama.diagnose_every"]
_POSITIVE = ["init.lr", "geometry.lr", "appearance.lr", "cg_lora.lr", "geometry.grid_scale",
             "appearance.environment_scale"]
_NON_NEGATIVE = ["ama.weight", "geometry.guidance_scale", "appearance.guidance_scale", "camera.jitter",
                 "cg_lora.grad_clip", "cg_lora.scale", "geometry.normal_consistency_weight",
                 "geometry.laplacian_weight", "geometry.sdf_weight", "geometry.min_piece_fraction",
                 "geometry.carve_weight", "geometry.carve_guidance_scale", "geometry.carve_threshold",
                 "geometry.silhouette_weight", "geometry.silhouette_weight_early"]

# (key, closed): shares that must lie in [0, 1], or in [0, 1) where closed is False (a dropout of 1
# would drop every update, a jitter of 1 shift the principal point onto the image's edge).
_FRACTIONS = [
    ("camera.overhead_fraction", True),
    ("camera.jitter", False),
    ("cg_lora.dropout", False),
    ("geometry.collapse_fraction", False),
    ("geometry.min_piece_fraction", False),
]


def _floats(node, prefix: str = ""):
    """(dotted key, value) of every float in the config, lists included."""
    for key in node:
        value = node[key]
        dotted = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            yield from _floats(value, dotted + ".")
        elif isinstance(value, ListConfig):
            yield from ((dotted, v) for v in value if isinstance(v, float))
        elif isinstance(value, float):
            yield dotted, value


def _range(cfg: DictConfig, key: str, low: float, high: float) -> tuple[float, float]:
    """A [min, max] pair of numbers within [low, high]."""
    value = list(OmegaConf.select(cfg, key))
    if len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"{key} must be two numbers [min, max], got {value}")
    lo, hi = float(value[0]), float(value[1])
    if not low <= lo <= hi <= high:
        raise ConfigError(f"{key} must satisfy {low:g} <= min <= max <= {high:g}, got [{lo:g}, {hi:g}]")
    return lo, hi


def check_config(cfg: DictConfig) -> None:
    """Value checks OmegaConf's types cannot express; raises ConfigError with one line. Everything
    a run would otherwise trip over later (after hours, or after deleting an old run) fails here."""
    if OmegaConf.is_missing(cfg, "prompt") or not str(cfg.prompt).strip():
        raise ConfigError("the prompt is empty: give a text prompt, e.g. xdreamer generate \"a red cube\"")
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError(f"seed must be in [0, 2^63), got {cfg.seed}")
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    for key, low, high in _INT_BOUNDS:
        value = OmegaConf.select(cfg, key)
        if not low <= value <= high:
            raise ConfigError(f"{key} must be in [{low}, {high}], got {value}")
    for key in _NON_NEGATIVE_INTS:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in _POSITIVE:
        if not OmegaConf.select(cfg, key) > 0:
            raise ConfigError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    for key in _NON_NEGATIVE:  # an optional key may be empty
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, closed in _FRACTIONS:
        value = OmegaConf.select(cfg, key)
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            raise ConfigError(f"{key} must be in [0, 1{']' if closed else ')'}, got {value}")
    lo, hi = _range(cfg, "appearance.kd_range", 0.0, 1.0)
    if not lo < hi:
        raise ConfigError(f"appearance.kd_range must satisfy min < max, got [{lo:g}, {hi:g}]")
    for key in ["geometry.t_range_early", "geometry.t_range", "geometry.t_range_final", "appearance.t_range_early",
                "appearance.t_range"]:
        if OmegaConf.select(cfg, key) is None:  # only t_range_final may be empty: no final phase
            continue
        lo, hi = _range(cfg, key, 0.0, 1.0)
        if not 0.0 < lo <= hi < 1.0:
            raise ConfigError(f"{key} must satisfy 0 < min <= max < 1, got [{lo:g}, {hi:g}]")
    # The camera must stay outside the grid's box, or it renders the object from inside.
    outside = cfg.geometry.grid_scale * math.sqrt(3) / 2
    lo, _ = _range(cfg, "camera.radius", 0.0, 1000.0)
    if lo <= outside:
        raise ConfigError(
            f"camera.radius must be more than {outside:.2f} (outside the grid of scale {cfg.geometry.grid_scale:g}), got {lo:g}"
        )
    _range(cfg, "camera.fov_deg", 1.0, 170.0)
    _range(cfg, "camera.elevation_deg", -90.0, 90.0)
    overhead_lo, _ = _range(cfg, "camera.overhead_elevation_deg", -90.0, 90.0)
    if cfg.camera.overhead_fraction > 0 and cfg.direction_prompts and overhead_lo < cfg.camera.overhead_elevation:
        # the views drawn as overhead views would otherwise be prompted as front/side/back views
        raise ConfigError(
            f"camera.overhead_elevation_deg starts at {overhead_lo:g}, below camera.overhead_elevation "
            f"({cfg.camera.overhead_elevation:g}), above which views are prompted as overhead: lower that too"
        )
    lo, hi = _range(cfg, "camera.azimuth_deg", -360.0, 360.0)
    if hi - lo > 360.0:
        raise ConfigError(f"camera.azimuth_deg spans more than 360 degrees: [{lo:g}, {hi:g}]")
    radii = list(cfg.init.radii)
    if len(radii) != 3 or min(radii) <= 0 or max(radii) >= cfg.geometry.grid_scale / 2:
        raise ConfigError(
            f"init.radii must be three numbers in (0, {cfg.geometry.grid_scale / 2:g}) (inside the grid), got {radii}"
        )
    if cfg.init.flat_base is not None and not 0 < cfg.init.flat_base < radii[1]:
        raise ConfigError(f"init.flat_base must be in (0, {radii[1]:g}) (init.radii[1]), or empty, got {cfg.init.flat_base}")
    if len(cfg.appearance.background) != 3:
        raise ConfigError(f"appearance.background must be three numbers (RGB), got {list(cfg.appearance.background)}")
    if not 0.0 < cfg.appearance.max_normal_tilt_deg <= 90.0:
        raise ConfigError(f"appearance.max_normal_tilt_deg must be in (0, 90], got {cfg.appearance.max_normal_tilt_deg}")
    if not cfg.cg_lora.projections or not set(cfg.cg_lora.projections) <= {"to_q", "to_k", "to_v", "to_out"}:
        raise ConfigError(f"cg_lora.projections must be some of to_q, to_k, to_v, to_out, got {list(cfg.cg_lora.projections)}")
    if cfg.cg_lora.rank % 2:
        raise ConfigError(f"cg_lora.rank must be even (text and camera halves), got {cfg.cg_lora.rank}")
    if cfg.cg_lora.optimizer == "normalized_sgd" and not cfg.cg_lora.grad_clip > 0:
        raise ConfigError("cg_lora.grad_clip must be positive with the normalized_sgd optimizer (it is the step length / lr)")
    if cfg.ama.token not in ("eot", "eot_pair") and not str(cfg.ama.token).isdigit():
        raise ConfigError(f"ama.token must be eot, eot_pair or a token index, got {cfg.ama.token!r}")
    bound = cfg.geometry.bound_radius
    if bound is not None:
        if not 0 < bound < cfg.geometry.grid_scale / 2:
            raise ConfigError(
                f"geometry.bound_radius must be in (0, {cfg.geometry.grid_scale / 2:g}) (inside the grid), or empty, got {bound}"
            )
        if cfg.init.shape == "ellipsoid":
            from xdreamer.geometry.init import ellipsoid_reach

            reach = ellipsoid_reach(list(cfg.init.radii), cfg.init.flat_base)
            if reach >= bound:
                if cfg.init.flat_base is None:
                    raise ConfigError(f"init.radii must be less than geometry.bound_radius ({bound:g}), got {list(cfg.init.radii)}")
                raise ConfigError(
                    f"the initial ellipsoid cut at init.flat_base {cfg.init.flat_base:g} reaches {reach:.3g} from the "
                    f"centre, beyond geometry.bound_radius ({bound:g})"
                )
        if cfg.init.shape != "ellipsoid" and bound < 1.0:
            raise ConfigError(f"geometry.bound_radius must be at least 1 with an initial mesh (it is scaled to radius 1), got {bound:g}")
    if cfg.geometry.max_offset is not None and not cfg.geometry.max_offset > 0:
        raise ConfigError(f"geometry.max_offset must be positive (or empty for the authors' bound), got {cfg.geometry.max_offset}")
    if not cfg.export.formats:
        raise ConfigError("export.formats is empty: give at least one of glb, obj")
    for fmt in cfg.export.formats:
        if fmt not in ("glb", "obj"):
            raise ConfigError(f"export format '{fmt}' is not one of: glb, obj")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
