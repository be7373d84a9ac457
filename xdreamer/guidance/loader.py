"""Loading the frozen diffusion model that guides optimization.

`load_guidance_model` takes a hub id ("stabilityai/stable-diffusion-2-1-base"), a local diffusers
directory, or "toy" (the small pixel-space model shipped in `xdreamer/toy/model/`), and returns a
`GuidanceModel`: the UNet, the VAE (None for pixel-space models), the CLIP text encoder and
tokenizer, and the noise schedule ᾱ_t. Everything is frozen and in eval mode.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

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


def _model_index(source: str, local: bool) -> dict:
    if local:
        index = Path(source) / "model_index.json"
        if index.is_file():
            return json.loads(index.read_text())
        return {name: None for name in ("unet", "vae") if (Path(source) / name).is_dir()}
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())


def _pick_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if device.type != "cuda":
        if dtype not in (None, torch.float32):
            warnings.warn(f"{dtype} is slow or unsupported on {device.type}; using float32", stacklevel=3)
        return torch.float32
    return torch.float16 if dtype is None else dtype


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _load(source: str, local: bool, device: torch.device, dtype: torch.dtype, cpu_offload: bool) -> GuidanceModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTokenizer

    index = _model_index(source, local)
    if local and not (Path(source) / "unet").is_dir():
        raise GuidanceModelError(f"guidance model directory {source!r} has no unet/ folder; {FIX}")
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    vae = None
    if "vae" in index:
        vae = _freeze(AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype).to(device))
        vae.set_attn_processor(AttnProcessor2_0())
    # The text encoder runs once per distinct prompt, so under offload it stays on the CPU.
    text_device = torch.device("cpu") if cpu_offload else device
    text_dtype = torch.float32 if text_device.type == "cpu" else dtype
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=text_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")

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
        source=source,
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
