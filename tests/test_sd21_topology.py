"""Stable Diffusion 2.1-base's exact UNet topology at reduced width: layer naming, head counts,
CG-LoRA's adapted layers and AMA's map sizes as on the real model, attention slicing and offload
under CG-LoRA + AMA, and `xdreamer generate` end to end on it (its hub folder layout included:
tokenizer without tokenizer.json, PNDM scheduler config)."""

import collections
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import pytest
import safetensors.torch
import torch
from diffusers.models.attention_processor import Attention, SlicedAttnProcessor
from tiny_models import SD21_HEADS, SD21_TEXT_DIM, make_tiny_sd21

from xdreamer.guidance.ama import AttentionRecorder
from xdreamer.guidance.cg_lora import CameraGuidedLoRA, XDreamerAttnProcessor, install_attention_processors
from xdreamer.guidance.loader import load_guidance_model

# Cross-attention layers in UNet call order and their latent side for 64^2 latents (a 512 render):
# down 64, 64, 32, 32, 16, 16; mid 8; up 16 x3, 32 x3, 64 x3.
CALL_ORDER_SIDES = [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
HEADS_BY_BLOCK = {
    "down_blocks.0": 5, "down_blocks.1": 10, "down_blocks.2": 20, "mid_block": 20,
    "up_blocks.1": 20, "up_blocks.2": 10, "up_blocks.3": 5,
}


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    return make_tiny_sd21(tmp_path_factory.mktemp("models") / "sd21")


def _cross_attentions(unet) -> dict[str, Attention]:
    return {path: m for path, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def test_unet_has_sd21_base_topology(sd21):
    model = load_guidance_model(str(sd21), "cpu")
    config = model.unet.config
    assert list(config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert list(config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert config.layers_per_block == 2 and config.use_linear_projection
    assert list(config.attention_head_dim) == list(SD21_HEADS) and config.cross_attention_dim == SD21_TEXT_DIM
    assert model.sample_size == 64 and model.image_size == 512  # 512 renders, 64^2 latents
    assert model.text_encoder.config.hidden_size == SD21_TEXT_DIM
    cross = _cross_attentions(model.unet)
    assert len(cross) == 16 and all(path.endswith("transformer_blocks.0.attn2") for path in cross)
    for path, attention in cross.items():
        block = ".".join(path.split(".")[:2]) if path.startswith(("down", "up")) else "mid_block"
        assert attention.heads == HEADS_BY_BLOCK[block], path
        assert attention.to_k.in_features == SD21_TEXT_DIM
    counts = collections.Counter(".".join(p.split(".")[:2]) if not p.startswith("mid") else "mid_block" for p in cross)
    assert counts == {"down_blocks.0": 2, "down_blocks.1": 2, "down_blocks.2": 2, "mid_block": 1,
                      "up_blocks.1": 3, "up_blocks.2": 3, "up_blocks.3": 3}


def _adapted_unet(model, weights: dict | None = None) -> tuple[CameraGuidedLoRA, AttentionRecorder]:
    """CG-LoRA (cross targets; `weights`, or random up matrices so the adapters change the output)
    and an AMA recorder installed on `model`'s UNet."""
    lora = CameraGuidedLoRA(model.unet, SD21_TEXT_DIM, targets="cross").eval()  # eval: no dropout
    if weights is not None:
        lora.load_state_dict(weights)
    else:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, value in lora.named_parameters():
                if name.endswith("up.weight"):
                    value.normal_(generator=generator)
    recorder = AttentionRecorder(variant="paper", layers="all")
    install_attention_processors(model.unet, lora, recorder)
    return lora, recorder


def _unet_call(model, lora, recorder, eot_index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 64, 64, generator=generator)  # one view, [uncond; cond]
    context = torch.randn(2, 77, SD21_TEXT_DIM, generator=generator)
    lora.set_condition(torch.randn(2, SD21_TEXT_DIM, generator=generator), torch.randn(2, 6, generator=generator))
    recorder.set_token_index([eot_index])
    with torch.no_grad():
        return model.unet(latents, torch.tensor([500, 500]), encoder_hidden_states=context).sample


def test_cg_lora_and_ama_see_sd21s_layers_and_map_sizes_with_slicing_and_offload(sd21):
    plain = load_guidance_model(str(sd21), "cpu")
    ids = plain.tokenizer("a red cube", padding="max_length", max_length=77, truncation=True).input_ids
    eot = ids.index(plain.tokenizer.eos_token_id)
    assert plain.tokenizer.pad_token_id == 0 and ids[eot + 1 :] == [0] * (76 - eot)  # SD 2.x pads with "!"
    assert len(CameraGuidedLoRA(plain.unet, SD21_TEXT_DIM, targets="all").layer_paths) == 32

    lora, recorder = _adapted_unet(plain)
    assert set(lora.layer_paths) == set(_cross_attentions(plain.unet))
    out = _unet_call(plain, lora, recorder, eot)
    maps = recorder.take()
    assert [m.shape[-1] for m in maps] == CALL_ORDER_SIDES
    assert collections.Counter(m.shape[-1] for m in maps) == {64: 5, 32: 5, 16: 5, 8: 1}
    assert all(m.shape == (1, s, s) for m, s in zip(maps, CALL_ORDER_SIDES))

    # The loader's memory options under CG-LoRA + AMA: self-attention stays sliced, the adapted
    # cross-attention runs XDreamerAttnProcessor, the text encoder stays on the CPU; same numbers.
    sliced = load_guidance_model(str(sd21), "cpu", attention_slicing=True, cpu_offload=True)
    assert sliced.text_device.type == "cpu" and sliced.vae.use_slicing
    sliced_lora, sliced_recorder = _adapted_unet(sliced, lora.state_dict())
    processors = sliced.unet.attn_processors
    assert sum(isinstance(p, SlicedAttnProcessor) for p in processors.values()) == 16
    assert sum(isinstance(p, XDreamerAttnProcessor) for p in processors.values()) == 16
    sliced_out = _unet_call(sliced, sliced_lora, sliced_recorder, eot)
    assert (sliced_out - out).abs().max() < 1e-4 and out.abs().mean() > 0.1
    for a, b in zip(sliced_recorder.take(), maps):
        assert torch.allclose(a, b, atol=1e-6)


# One view, two steps of each stage with AMA on from the first step: the run takes about a minute.
SD21_RUN = [
    "--seed", "3", "--views", "1", "--device", "cpu",
    "init.steps=10", "geometry.grid_resolution=16", "geometry.iters=2", "geometry.latent_phase_iters=1",
    "geometry.render_resolution=64", "appearance.iters=2", "appearance.render_resolution=64", "appearance.t_switch=1",
    "cg_lora.targets=cross", "ama.layers=all", "ama.start_geometry=0", "ama.start_appearance=0", "ama.visualize_every=1",
    "checkpoint_every=1000", "validate_every=1000",
    "export.texture_size=64", "export.turntable_frames=2", "export.turntable_resolution=64",
]


def test_generate_with_cg_lora_and_ama_on_sd21_topology(sd21, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    result = subprocess.run(
        [sys.executable, "-m", "xdreamer.cli", "generate", "a red cube", "--model", str(sd21), "--preset", "toy",
         "--out", str(run), *SD21_RUN],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "done"
    assert report["final_losses"]["geometry/ama"] > 0 and report["final_losses"]["appearance/ama"] > 0
    assert (run / "export" / "model.glb").stat().st_size > 0
    lora = safetensors.torch.load_file(str(run / "checkpoints" / "cg_lora.safetensors"))
    adapted = {key.split(".")[1] for key in lora if key.startswith("layers.")}
    assert len(adapted) == 16 and all(key.endswith("attn2") for key in adapted)
    # The attention figure is render | mask | one column per recorded map: 16 maps per step.
    figures = sorted((run / "attention").glob("*.png"))
    assert {f.name.split("_")[0] for f in figures} == {"geometry", "appearance"}
    for figure in figures:
        assert iio.imread(figure).shape == (64, (2 + 16) * 64, 3)
