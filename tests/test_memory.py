"""Memory: the VRAM estimator's meta-device accounting equals what real tensors save, and the
UNet's gradient checkpointing gives AMA the same maps and CG-LoRA the same gradients."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from xdreamer.guidance.ama import AttentionRecorder, ama_loss
from xdreamer.guidance.cg_lora import CameraGuidedLoRA, install_attention_processors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vram_estimate  # noqa: E402

TEXT_DIM = 32
UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TEXT_DIM,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
}


def _build(cls, config: dict, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        return cls(**config).requires_grad_(False).eval()


@pytest.mark.parametrize("whole_batch", [False, True])
def test_meta_unet_graph_equals_the_bytes_real_tensors_save(whole_batch):
    """The estimate runs SD 2.1-base on 'meta' (no weights); with attention saved as the flash
    kernel saves it, the count equals that of the same UNet on real CPU tensors, up to the
    recorder's 16-byte token-index copies (one per layer off the CPU, one shared on it)."""
    real, _ = vram_estimate.unet_graph(_build(UNet2DConditionModel, UNET, "cpu"), 2, whole_batch, TEXT_DIM)
    meta, lora_bytes = vram_estimate.unet_graph(_build(UNet2DConditionModel, UNET, "meta"), 2, whole_batch, TEXT_DIM)
    assert real > 0
    assert 0 <= meta - real <= 16 * 4  # the tiny UNet's 4 recorded layers
    assert lora_bytes > 0


def test_meta_vae_graph_equals_the_bytes_real_tensors_save():
    real = vram_estimate.vae_graph(_build(AutoencoderKL, VAE, "cpu"), 2, size=32)
    meta = vram_estimate.vae_graph(_build(AutoencoderKL, VAE, "meta"), 2, size=32)
    assert meta == real > 0
    # one image's graph is half of two images'
    assert vram_estimate.vae_graph(_build(AutoencoderKL, VAE, "meta"), 1, size=32) * 2 == meta


def test_the_conditional_half_saves_about_half_of_the_whole_batch():
    half, _ = vram_estimate.unet_graph(_build(UNet2DConditionModel, UNET, "meta"), 2, False, TEXT_DIM)
    whole, _ = vram_estimate.unet_graph(_build(UNet2DConditionModel, UNET, "meta"), 2, True, TEXT_DIM)
    # The recorder reads the conditional rows only, in both cases: slightly more than half.
    assert 0.5 < half / whole < 0.56


def _ama_gradients(unet: UNet2DConditionModel, layers: str, checkpointing: bool, dropout: float = 0.0):
    """AMA maps, CG-LoRA gradients and the latents' gradient for one fixed conditional batch, and
    the maps the recorder still holds after the backward pass. With `dropout` the adapters stay in
    training mode (dropout masks on), else they are in eval mode."""
    unet = copy.deepcopy(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(2)
    lora = CameraGuidedLoRA(unet, TEXT_DIM, dropout=dropout, seed=7)
    if not dropout:
        lora.eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(0.0, 0.2, generator=g)
    recorder = AttentionRecorder(variant="paper", layers=layers)
    install_attention_processors(unet, lora, recorder)
    lora.set_condition(torch.randn(2, TEXT_DIM, generator=g), torch.randn(2, 6, generator=g))
    recorder.set_token_index([5, 6])
    latents = torch.randn(2, 4, 16, 16, generator=g).requires_grad_()
    mask = (torch.rand(2, 32, 32, 1, generator=g) > 0.5).float()
    unet(latents, torch.tensor([300, 500]), torch.randn(2, 77, TEXT_DIM, generator=g))
    maps = recorder.take()
    ama_loss(maps, mask).backward()
    return maps, [p.grad for p in lora.parameters()], latents.grad, recorder.maps


@pytest.mark.parametrize("layers", ["all", "last"])
def test_gradient_checkpointing_gives_the_same_maps_and_gradients(layers):
    """Checkpointing re-runs each transformer block in the backward pass, attention processors
    included: the recorder and CG-LoRA must produce the same values the second time."""
    unet = _build(UNet2DConditionModel, UNET, "cpu")
    maps, grads, latents_grad, _ = _ama_gradients(unet, layers, checkpointing=False)
    maps_ckpt, grads_ckpt, latents_grad_ckpt, _ = _ama_gradients(unet, layers, checkpointing=True)
    assert len(maps) == len(maps_ckpt) == (4 if layers == "all" else 1)
    for a, b in zip(maps, maps_ckpt):
        assert torch.equal(a, b)
    reached = [(a, b) for a, b in zip(grads, grads_ckpt) if a is not None]
    assert len(reached) > 10 and all(b is not None for _, b in reached)
    for a, b in reached:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(latents_grad, latents_grad_ckpt, rtol=1e-6, atol=1e-9)
    assert latents_grad.abs().sum() > 0


@pytest.mark.parametrize("layers", ["all", "last"])
def test_checkpointing_with_cg_lora_dropout_and_no_maps_kept_from_the_recomputation(layers):
    """In training mode CG-LoRA's dropout masks derive from the UNet call's seed, so the
    recomputation draws the same masks; the recorder keeps nothing the backward pass records."""
    unet = _build(UNet2DConditionModel, UNET, "cpu")
    runs = {}
    for checkpointing in (False, True):
        _, grads, latents_grad, kept = _ama_gradients(unet, layers, checkpointing, dropout=0.5)
        assert kept == []
        runs[checkpointing] = grads + [latents_grad]
    for a, b in zip(runs[False], runs[True]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
