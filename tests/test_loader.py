"""Loading guidance models: tiny SD 1.x / 2.x and pixel-space pipelines saved with diffusers,
one-line errors for missing models."""

import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from tiny_models import make_tiny_pixel_model, make_tiny_sd

import xdreamer.toy
from xdreamer.guidance import loader
from xdreamer.guidance.loader import GuidanceModelError, load_guidance_model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "sd1": make_tiny_sd(root / "sd1", "sd1"),
        "sd2": make_tiny_sd(root / "sd2", "sd2"),
        "pixel": make_tiny_pixel_model(root / "pixel"),
    }


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_latent_model_loads_frozen_with_sd_schedule(tiny_dirs, variant):
    model = load_guidance_model(str(tiny_dirs[variant]), "cpu")
    assert model.is_latent and model.channels == 4 and model.sample_size == 8 and model.image_size == 64
    assert model.scaling_factor == pytest.approx(0.18215)
    assert model.dtype == torch.float32
    assert model.unet.config.use_linear_projection == (variant == "sd2")
    for module in (model.unet, model.vae, model.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert all(isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values())
    expected = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert model.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(model.alphas_cumprod, expected, rtol=0, atol=0)
    assert model.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)


def test_latent_encode_is_scaled_vae_mean(tiny_dirs):
    model = load_guidance_model(str(tiny_dirs["sd1"]), "cpu")
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    latents = model.encode_images(images)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    x = F.interpolate(images.detach().permute(0, 3, 1, 2), size=64, mode="bilinear", antialias=True) * 2 - 1
    expected = model.vae.encode(x).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    latents.square().sum().backward()
    assert images.grad.abs().sum() > 0


def test_pixel_model_loads_and_maps_images_to_unit_range(tiny_dirs):
    model = load_guidance_model(str(tiny_dirs["pixel"]), "cpu")
    assert not model.is_latent and model.vae is None
    assert model.channels == 3 and model.sample_size == 16 and model.image_size == 16
    grey = torch.full((1, 32, 32, 3), 0.5)
    assert torch.equal(model.encode_images(grey), torch.zeros(1, 3, 16, 16))
    ramp = torch.linspace(0, 1, 16).view(1, 16, 1, 1).expand(1, 16, 16, 3)
    torch.testing.assert_close(model.encode_images(ramp)[0, 0, :, 0], torch.linspace(-1, 1, 16))


def test_attention_slicing_matches_sdpa(tiny_dirs):
    plain = load_guidance_model(str(tiny_dirs["sd2"]), "cpu")
    sliced = load_guidance_model(str(tiny_dirs["sd2"]), "cpu", attention_slicing=True)
    assert any(isinstance(p, SlicedAttnProcessor) for p in sliced.unet.attn_processors.values())
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        a = plain.unet(x, t, encoder_hidden_states=context).sample
        b = sliced.unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_keeps_float32_and_offload_keeps_text_encoder_on_cpu(tiny_dirs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_guidance_model(str(tiny_dirs["sd1"]), "cpu", dtype=torch.bfloat16, cpu_offload=True)
    assert model.dtype == torch.float32 and model.unet.dtype == torch.float32
    assert any("float32" in str(w.message) for w in caught)
    assert model.text_device.type == "cpu" and model.text_encoder.device.type == "cpu"
    model.release_text_encoder()
    assert model.text_encoder is None


def _assert_one_line(error: GuidanceModelError, *words: str) -> None:
    message = str(error)
    assert "\n" not in message and message
    for word in words:
        assert word in message


def test_offline_hub_id_raises_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GuidanceModelError) as info:
        load_guidance_model("nonexistent-org/nonexistent-model", "cpu")
    _assert_one_line(info.value, "nonexistent-org/nonexistent-model", "HF_HUB_OFFLINE", "--model toy")
    assert isinstance(info.value, ValueError)


def test_missing_paths_raise_one_line(tmp_path, monkeypatch, tiny_dirs):
    with pytest.raises(GuidanceModelError) as info:
        load_guidance_model(str(tmp_path / "no" / "such" / "model"), "cpu")
    _assert_one_line(info.value, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GuidanceModelError) as info:
        load_guidance_model(str(tmp_path / "empty"), "cpu")
    _assert_one_line(info.value, "no unet/")
    with pytest.raises(GuidanceModelError) as info:
        load_guidance_model(str(tiny_dirs["sd1"] / "model_index.json"), "cpu")
    _assert_one_line(info.value, "not a diffusers directory")
    monkeypatch.setattr(loader, "toy_model_dir", lambda: tmp_path / "toy" / "model")
    with pytest.raises(GuidanceModelError) as info:
        load_guidance_model("toy", "cpu")
    _assert_one_line(info.value, "toy model is not installed")


def test_toy_resolves_to_package_directory(tmp_path, monkeypatch):
    assert loader.toy_model_dir() == Path(xdreamer.toy.__file__).parent / "model"
    target = make_tiny_pixel_model(tmp_path / "toy" / "model")
    monkeypatch.setattr(loader, "toy_model_dir", lambda: target)
    model = load_guidance_model("toy", "cpu")
    assert model.source == str(target) and not model.is_latent


def test_broken_component_raises_one_line(tmp_path):
    directory = make_tiny_sd(tmp_path / "broken", "sd1")
    (directory / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(GuidanceModelError) as info:
        load_guidance_model(str(directory), "cpu")
    _assert_one_line(info.value, "could not load guidance model from local directory")
