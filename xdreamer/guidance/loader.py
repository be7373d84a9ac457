"""Loading the frozen diffusion model that guides optimization.

`load_guidance_model` takes a hub id ("stabilityai/stable-diffusion-2-1-base"), a local diffusers
directory, or "toy" (the small pixel-space model shipped in `xdreamer/toy/model/`), and returns a
`GuidanceModel`: the UNet, the VAE (None for pixel-space models), the CLIP text encoder and
tokenizer, and the noise schedule ᾱ_t. Everything is frozen and in eval mode.

Weights are read as users' models ship them: in half precision the "fp16" variant files first
(`unet/diffusion_pytorch_model.fp16.safetensors`, half the download) and the default files when a
repository has none; safetensors wherever present, .bin otherwise. The tokenizer folder may be
SD's own layout (vocab.json + merges.txt + configs, no tokenizer.json), and the noise schedule is
read from whichever scheduler config the model ships (SD 2.1-base: a PNDMScheduler's).
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FIX = "pass a local diffusers directory, download the model once with network access into the HF cache, or use --model toy"


# model_index.json of a pixel-space model (no VAE) in diffusers' folder layout: how the toy model
# and the tests' tiny pixel models are saved so that this loader reads them like SD.
PIXEL_MODEL_INDEX = {
    "_class_name": "DiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}


class GuidanceModelError(ValueError):
    """The guidance model could not be found or loaded (one-line message)."""


@dataclass
class GuidanceModel:
    """A frozen text-conditioned diffusion model.

    unet: UNet2DConditionModel-like, called as unet(x, t, encoder_hidden_states=...).sample;
    vae: AutoencoderKL, or None for a pixel-space model; text_encoder / tokenizer: CLIP;
    alphas_cumprod: (T,) float32 on `device`; sample_size: latent (or pixel) resolution;
    text_device: where the text encoder runs (the CPU under `cpu_offload`)."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: object
    alphas_cumprod: torch.Tensor
    channels: int
    sample_size: int
    scaling_factor: float
    device: torch.device
    dtype: torch.dtype
    prediction_type: str = "epsilon"
    shift_factor: float = 0.0
    text_device: torch.device | None = None
    source: str = ""

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def image_size(self) -> int:
        """Resolution of the images the model sees (sample_size x the VAE's downsampling)."""
        if self.vae is None:
            return self.sample_size
        return self.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> model input (B, C, h, w) float32, differentiable.

        Latent models: resize to `image_size`, VAE-encode (posterior mean, or a sample when a
        generator is given), scale by `scaling_factor`. Pixel models: resize to `sample_size`
        and map to [-1, 1]."""
        x = images.permute(0, 3, 1, 2)
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x * 2.0 - 1.0
        if self.vae is None:
            return x.float()
        posterior = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        return ((latents - self.shift_factor) * self.scaling_factor).float()

    def decode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (B, C, h, w) -> images (B, H, W, 3) in [0, 1] at `image_size`, the
        inverse of `encode_images` (a VAE decode for latent models), without gradients."""
        with torch.no_grad():
            if self.vae is None:
                images = (x.float() + 1.0) / 2.0
            else:
                latents = (x / self.scaling_factor + self.shift_factor).to(self.device, self.dtype)
                images = (self.vae.decode(latents).sample.float() + 1.0) / 2.0
        return images.clamp(0, 1).permute(0, 2, 3, 1)

    def release_text_encoder(self) -> None:
        """Drop the text encoder once all prompts are embedded, to free its memory."""
        self.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def toy_model_dir() -> Path:
    """The package directory of the shipped toy model."""
    return Path(str(importlib.resources.files("xdreamer.toy"))) / "model"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _resolve(model: str) -> tuple[str, bool]:
    """(path or hub id, is_local); raises for a missing local path or the missing toy model."""
    if model == "toy":
        path = toy_model_dir()
        if not (path / "unet").is_dir():
            raise GuidanceModelError(
                f"the toy model is not installed at {path}; reinstall xdreamer with its toy model "
                "or pass --model with a hub id or a local diffusers directory"
            )
        return str(path), True
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise GuidanceModelError(f"guidance model {model!r} is a file, not a diffusers directory; {FIX}")
    if not HUB_ID.match(model) or model.startswith((".", "~")):
        raise GuidanceModelError(f"guidance model directory {model!r} does not exist; {FIX}")
    return model, False


def _model_index(source: str) -> dict:
    index = Path(source) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text())
    return {name: None for name in ("unet", "vae") if (Path(source) / name).is_dir()}


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub's endpoint answers a TCP connection within `timeout`, else why not (one
    line). A closed network then fails in seconds, not after the hub client's retries."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _hub_snapshot(source: str, dtype: torch.dtype) -> str:
    """A local folder holding the hub model: the cached snapshot when there is one (no network
    at all), else a download of the files a guidance model needs (the fp16 variant in float16)."""
    from huggingface_hub import constants, list_repo_files, snapshot_download

    try:
        return snapshot_download(source, local_files_only=True)
    except Exception:
        if constants.HF_HUB_OFFLINE:
            raise GuidanceModelError(
                f"hub id {source!r} is not in the local HF cache and HF_HUB_OFFLINE is set; {FIX}"
            ) from None
    unreachable = _hub_reachable()
    if unreachable:
        raise GuidanceModelError(f"hub id {source!r} is not in the local HF cache and {unreachable}; {FIX}")
    files = set(list_repo_files(source))
    patterns = ["model_index.json"]
    for component in COMPONENTS:
        names = [f for f in files if f.startswith(component + "/")]
        choice = weight_choice(files, component, dtype)
        for name in names:
            weight = name.endswith((".safetensors", ".bin")) or (".index." in name and name.endswith(".json"))
            if not weight:
                patterns.append(name)
            elif bool(FP16_FILE.search(name)) == (choice["variant"] == "fp16") and (
                choice["use_safetensors"] is None or name.endswith(".safetensors") == choice["use_safetensors"]
                or name.endswith(".json")
            ):
                patterns.append(name)
    return snapshot_download(source, allow_patterns=patterns)


def _pick_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if device.type != "cuda":
        if dtype not in (None, torch.float32):
            warnings.warn(f"{dtype} is slow or unsupported on {device.type}; using float32", stacklevel=3)
        return torch.float32
    return torch.float16 if dtype is None else dtype


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


FP16_FILE = re.compile(r"\.fp16[.-]")  # model.fp16.safetensors, ...fp16-00001-of-00002..., ...index.fp16.json


def _repo_files(root: str) -> set[str]:
    """Every file of a model folder as a path relative to its root ("unet/config.json")."""
    return {path.relative_to(root).as_posix() for path in Path(root).rglob("*") if path.is_file()}


def weight_choice(files: set[str], subfolder: str, dtype: torch.dtype) -> dict:
    """`from_pretrained`'s variant and use_safetensors for one component, from the model's files.

    The "fp16" variant when loading in float16 and the folder has it (or when it has nothing
    else); safetensors when the chosen weights exist as safetensors, .bin otherwise. Choosing
    from the listing spares the libraries' failed lookups, each a logged error."""
    names = [f[len(subfolder) + 1 :] for f in files if f.startswith(subfolder + "/")]
    weights = [n for n in names if n.endswith((".safetensors", ".bin")) or (".index." in n and n.endswith(".json"))]
    fp16 = [n for n in weights if FP16_FILE.search(n)]
    default = [n for n in weights if not FP16_FILE.search(n)]
    variant = "fp16" if fp16 and (dtype == torch.float16 or not default) else None
    chosen = fp16 if variant else default
    # no weights found: the library's own lookup says what is missing
    safetensors = any(n.endswith(".safetensors") for n in chosen) if chosen else None
    return {"variant": variant, "use_safetensors": safetensors}


def ddpm_schedule(source: str):
    """The DDPMScheduler of the model's training noise (betas, ᾱ, prediction type), built from its
    `scheduler/scheduler_config.json` whatever scheduler class that names. Only the settings
    DDPMScheduler takes are passed on, so a sampler's own (SD 2.1-base ships a PNDMScheduler
    config: skip_prk_steps, set_alpha_to_one) make no warning or log line."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(source, subfolder="scheduler")
    accepted = inspect.signature(DDPMScheduler.__init__).parameters
    return DDPMScheduler(**{key: value for key, value in config.items() if key in accepted})


def _load(source: str, local: bool, device: torch.device, dtype: torch.dtype, cpu_offload: bool) -> GuidanceModel:
    """Load from a local folder, or from the hub id's local snapshot (see `_hub_snapshot`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTokenizer

    hub_id = None if local else source
    if not local:
        source = _hub_snapshot(source, dtype)
    index = _model_index(source)
    if not (Path(source) / "unet").is_dir():
        raise GuidanceModelError(f"guidance model directory {source!r} has no unet/ folder; {FIX}")
    files = _repo_files(source)

    def component(model_class, subfolder: str, component_dtype: torch.dtype):
        choice = weight_choice(files, subfolder, component_dtype)
        return model_class.from_pretrained(source, subfolder=subfolder, torch_dtype=component_dtype, **choice)

    unet = component(UNet2DConditionModel, "unet", dtype)
    vae = None
    if "vae" in index:
        vae = _freeze(component(AutoencoderKL, "vae", dtype).to(device))
        vae.set_attn_processor(AttnProcessor2_0())
    # The text encoder runs once per distinct prompt, so under offload it stays on the CPU.
    text_device = torch.device("cpu") if cpu_offload else device
    text_dtype = torch.float32 if text_device.type == "cpu" else dtype
    text_encoder = component(CLIPTextModel, "text_encoder", text_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = ddpm_schedule(source)

    unet = _freeze(unet.to(device))
    unet.set_attn_processor(AttnProcessor2_0())
    channels = unet.config.in_channels
    scaling = vae.config.scaling_factor if vae is not None else 1.0
    shift = (vae.config.get("shift_factor") or 0.0) if vae is not None else 0.0
    return GuidanceModel(
        unet=unet,
        vae=vae,
        text_encoder=_freeze(text_encoder.to(text_device)),
        tokenizer=tokenizer,
        alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
        channels=channels,
        sample_size=int(unet.config.sample_size),
        scaling_factor=float(scaling),
        device=device,
        dtype=dtype,
        prediction_type=scheduler.config.prediction_type,
        shift_factor=float(shift),
        text_device=text_device,
        source=hub_id or source,
    )


def load_guidance_model(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention_slicing: bool = False,
    cpu_offload: bool = False,
) -> GuidanceModel:
    """Load a frozen diffusion model from a hub id, a local diffusers directory, or "toy".

    dtype defaults to float16 on CUDA and is always float32 on the CPU. Attention uses PyTorch's
    scaled_dot_product_attention; `attention_slicing` trades speed for memory on small GPUs
    (sliced attention in the UNet, one image at a time in the VAE), `cpu_offload` keeps the text
    encoder on the CPU. Raises GuidanceModelError (one line) when the model cannot be loaded."""
    device = torch.device(device)
    dtype = _pick_dtype(device, dtype)
    source, local = _resolve(model)
    try:
        guidance = _load(source, local, device, dtype, cpu_offload)
    except GuidanceModelError:
        raise
    except Exception as error:  # any hub, file or format failure becomes one actionable line
        from huggingface_hub import constants

        if local:
            tried = f"local directory {source!r}"
        else:
            tried = f"hub id {source!r}" + (
                " in the local HF cache only (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            )
        reason = _one_line(error).split(". ")[0][:200]
        raise GuidanceModelError(f"could not load guidance model from {tried}: {reason}; {FIX}") from None
    if attention_slicing:
        guidance.unet.set_attention_slice("auto")
        if guidance.vae is not None:
            guidance.vae.enable_slicing()
    return guidance
