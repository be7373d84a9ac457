"""Stable Diffusion 2.1-base's architecture, without its weights: the exact configs of
stabilityai/stable-diffusion-2-1-base (unet/, vae/, text_encoder/config.json), builders of
random-weight models of that size, and a diffusers folder of one for end-to-end runs.

The UNet has 865.9M parameters, the VAE 83.7M, the text encoder (OpenCLIP ViT-H/14's text tower,
23 layers) 340.4M. The benchmarks build the text encoder at the real width (1024: the CG-LoRA
feature size and cross-attention input) but fewer layers: it runs once per prompt and is
released before the first step, so its depth changes no step time and no step memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

TEXT_ENCODER_CONFIG = {
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "projection_dim": 512,
    "vocab_size": 49408,
}

# SD 2.1-base's noise schedule (its scheduler_config.json is PNDM's; the betas are what matter).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

TEXT_LAYERS = 2  # the benchmarks' text encoder depth (see the module docstring)

# A few-thousand-parameter model of the same kind, for CPU smoke runs of the benchmarks:
# 8x8 latents (64x64 images), 32-wide text.
TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
TINY_VAE_CONFIG = dict(
    VAE_CONFIG, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64
)
TINY_TEXT_ENCODER_CONFIG = dict(
    TEXT_ENCODER_CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32
)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # .half() casts every weight, as loading with torch_dtype=float16 does, without the warning
    # diffusers' .to(dtype) gives about modules it would rather keep in float32 (none here).
    model = model.half() if dtype == torch.float16 else model.to(dtype)
    return model.requires_grad_(False).eval()


def build_unet(device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, tiny: bool = False):
    """SD 2.1-base's UNet with random weights (none at all on 'meta'), frozen, in eval mode."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else UNET_CONFIG))
    return _cast(unet, dtype)


def build_vae(device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, tiny: bool = False):
    """SD 2.1-base's VAE with random weights, frozen, in eval mode."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else VAE_CONFIG))
    return _cast(vae, dtype)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def save_random_model(
    directory: str | Path, device: str | torch.device, dtype: torch.dtype = torch.float16, tiny: bool = False
) -> Path:
    """A diffusers folder with SD 2.1-base's UNet and VAE (random weights, `dtype`), a text
    encoder of its width and TEXT_LAYERS layers, and a small local CLIP tokenizer; loadable by
    `load_guidance_model` like the real model. Weights are drawn on `device` (fast on a GPU).
    tiny: the TINY_* configs instead (seconds on a CPU)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from xdreamer.guidance.tokenizer import build_clip_tokenizer

    directory = Path(directory)
    words = ["a", "photo", "of", "red", "chair", "cube", "front", "side", "back", "overhead", "view"]
    tokenizer = build_clip_tokenizer(directory / "tokenizer", words)
    text = TINY_TEXT_ENCODER_CONFIG if tiny else TEXT_ENCODER_CONFIG
    config = dict(text, num_hidden_layers=TEXT_LAYERS, vocab_size=len(tokenizer))
    text_config = CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(device):
        text_encoder = CLIPTextModel(text_config)
    pipeline = StableDiffusionPipeline(
        vae=build_vae(device, dtype, tiny),
        text_encoder=_cast(text_encoder, dtype),
        tokenizer=tokenizer,
        unet=build_unet(device, dtype, tiny),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return directory
