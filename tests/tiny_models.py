"""Tiny random diffusion models in diffusers' on-disk format, for tests and benchmarks.

They have the shapes of the real ones (Stable Diffusion 1.x / 2.x, or a pixel-space model like
DeepFloyd IF and the project's toy model) but a few thousand parameters, so they build, save and
load in about a second and go through the same `load_guidance_model` path as a real model.
`make_tiny_sd21` keeps Stable Diffusion 2.1-base's exact UNet topology and its hub folder layout
(tokenizer without tokenizer.json, PNDM scheduler config) at a reduced width.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from xdreamer.guidance.loader import PIXEL_MODEL_INDEX
from xdreamer.guidance.tokenizer import build_clip_tokenizer

TEXT_DIM = 32
WORDS = [
    "a photo of a cat, front view",
    "side view",
    "back view",
    "overhead view",
    "a red chair",
    "a wooden table",
    "an astronaut riding a horse",
    "a DSLR photo of a corgi",
]


def _vae(block_out_channels: tuple[int, ...], sample_size: int) -> AutoencoderKL:
    """SD's VAE layout (4 down/up blocks, 4 latent channels, scaling 0.18215) at the given widths."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=0.18215,
    ).eval()


def _scheduler() -> DDPMScheduler:
    # Stable Diffusion's noise schedule.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )


def _text_encoder(tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(config).eval()


def _unet(in_channels: int, sample_size: int, variant: str) -> UNet2DConditionModel:
    heads = 2 if variant == "sd1" else (2, 4)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=heads,
        use_linear_projection=variant == "sd2",
        norm_num_groups=8,
    ).eval()


def make_tiny_sd(directory: str | Path, variant: str = "sd1", seed: int = 0) -> Path:
    """A tiny random latent diffusion model shaped like SD 1.x ("sd1": conv projections, one head
    size) or SD 2.x ("sd2": linear projections, per-block head sizes), saved to `directory`.

    Latents are (4, 8, 8) (images 64x64); the text context is 77 tokens of width 32."""
    if variant not in ("sd1", "sd2"):
        raise ValueError(f"variant must be 'sd1' or 'sd2', got {variant!r}")
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(directory / "tokenizer", WORDS)
    vae = _vae((8, 8, 16, 16), 64)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(4, 8, variant),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return directory


def make_tiny_pixel_model(directory: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    """A tiny random pixel-space model (no VAE, 3 channels, images `sample_size`²), saved in
    diffusers' folder layout with unet/, text_encoder/, tokenizer/, scheduler/."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(directory / "tokenizer", WORDS)
    _text_encoder(tokenizer).save_pretrained(directory / "text_encoder")
    _unet(3, sample_size, "sd1").save_pretrained(directory / "unet")
    _scheduler().save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(PIXEL_MODEL_INDEX, indent=2))
    return directory


# stabilityai/stable-diffusion-2-1-base's scheduler/scheduler_config.json: a sampler's config
# (PNDM), with settings DDPMScheduler does not take.
SD21_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_HEADS = (5, 10, 20, 20)  # attention heads per UNet level (diffusers calls it attention_head_dim)
SD21_TEXT_DIM = 1024  # OpenCLIP ViT-H/14's width


def write_sd_tokenizer_layout(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Turn a saved CLIP tokenizer folder into the layout SD's hub repositories ship: vocab.json,
    merges.txt, special_tokens_map.json and an old-style tokenizer_config.json (AddedToken
    dicts), no tokenizer.json. SD 1.x pads with <|endoftext|>, SD 2.x with "!" (token 0)."""
    folder = Path(folder)

    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    (folder / "tokenizer.json").unlink(missing_ok=True)
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **added("<|startoftext|>")},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **added("<|endoftext|>")},
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **added("<|endoftext|>")},
    }
    special = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "pad_token": pad_token,
        "unk_token": added("<|endoftext|>"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def sd21_unet(head_dim: int = 2, sample_size: int = 64) -> UNet2DConditionModel:
    """Stable Diffusion 2.1-base's UNet topology with `head_dim` channels per head (64 on the real
    model): CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D +
    CrossAttnUpBlock2D x3, 2 layers per block (16 cross-attentions), 5/10/20/20 heads, linear
    projections, 1024-wide text context. Latents 64^2 give attention at 64, 32, 16 and 8."""
    channels = tuple(heads * head_dim for heads in SD21_HEADS)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=SD21_TEXT_DIM,
        attention_head_dim=SD21_HEADS,
        use_linear_projection=True,
        norm_num_groups=math.gcd(*channels) // head_dim,
    ).eval()


def make_tiny_sd21(directory: str | Path, head_dim: int = 2, seed: int = 0) -> Path:
    """A random model with Stable Diffusion 2.1-base's topology and hub layout at reduced width,
    saved to `directory`: `sd21_unet(head_dim)`, a 1-layer CLIP text encoder of width 1024, a
    4-level VAE (512^2 images <-> 64^2 latents), the SD 2.x tokenizer layout (pad "!", no
    tokenizer.json) and SD 2.1-base's PNDM scheduler config."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(directory / "tokenizer", WORDS)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=SD21_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
        projection_dim=SD21_TEXT_DIM,
    )
    vae = _vae((4, 8, 8, 8), 512)
    scheduler = PNDMScheduler(
        **{k: v for k, v in SD21_SCHEDULER_CONFIG.items() if not k.startswith("_") and k != "clip_sample"}
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=sd21_unet(head_dim),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER_CONFIG, indent=2))
    write_sd_tokenizer_layout(directory / "tokenizer", pad_token="!")
    return directory
