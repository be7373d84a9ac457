"""Tiny random diffusion models in diffusers' on-disk format, for tests and benchmarks.

They have the shapes of the real ones (Stable Diffusion 1.x / 2.x, or a pixel-space model like
DeepFloyd IF and the project's toy model) but a few thousand parameters, so they build, save and
load in about a second and go through the same `load_guidance_model` path as a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()
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
