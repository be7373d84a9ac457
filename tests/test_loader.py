"""Loading guidance models: tiny SD 1.x / 2.x and pixel-space pipelines saved with diffusers,
one-line errors for missing models, the files real hub models ship (fp16 variants, safetensors or
.bin, SD's tokenizer layout, a PNDM scheduler config)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import diffusers
import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from tiny_models import SD21_SCHEDULER_CONFIG, make_tiny_pixel_model, make_tiny_sd, write_sd_tokenizer_layout
from transformers import CLIPTextModel, CLIPTokenizer

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


def _shift_and_save(directory: Path, model_class, subfolder: str, shift: float, **save) -> torch.nn.Module:
    """Reload a component, add `shift` to every weight and save it back with `save` options
    (a variant, .bin): which files a load read shows in the values."""
    model = model_class.from_pretrained(directory, subfolder=subfolder)
    with torch.no_grad():
        for value in model.parameters():
            value += shift
    dtype = torch.float16 if save.get("variant") == "fp16" else torch.float32
    model.to(dtype).save_pretrained(directory / subfolder, **save)
    return model


class _Records(logging.Handler):
    """The warnings and errors diffusers and transformers log (they do not propagate to root)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).removeHandler(self)


def test_weight_choice_prefers_fp16_in_half_and_safetensors_when_present():
    both = {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"}
    assert loader.weight_choice(both, "unet", torch.float16) == {"variant": "fp16", "use_safetensors": True}
    assert loader.weight_choice(both, "unet", torch.float32) == {"variant": None, "use_safetensors": True}
    plain = {"vae/diffusion_pytorch_model.safetensors"}
    assert loader.weight_choice(plain, "vae", torch.float16) == {"variant": None, "use_safetensors": True}
    legacy = {"text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors"}
    assert loader.weight_choice(legacy, "text_encoder", torch.float32) == {"variant": None, "use_safetensors": False}
    assert loader.weight_choice(legacy, "text_encoder", torch.float16) == {"variant": "fp16", "use_safetensors": True}
    sharded = {"unet/diffusion_pytorch_model.safetensors.index.fp16.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"}
    # only fp16 files: they are read whatever the dtype
    assert loader.weight_choice(sharded, "unet", torch.float32) == {"variant": "fp16", "use_safetensors": True}


def test_half_precision_reads_the_fp16_variant_else_the_default_weights(tmp_path):
    directory = make_tiny_sd(tmp_path / "sd", "sd2")
    default_unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet")
    default_vae = AutoencoderKL.from_pretrained(directory, subfolder="vae")
    fp16_unet = _shift_and_save(directory, UNet2DConditionModel, "unet", 0.5, variant="fp16")
    assert (directory / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    cpu = torch.device("cpu")
    with _Records() as records:
        half = loader._load(str(directory), True, cpu, torch.float16, cpu_offload=False)
        full = loader._load(str(directory), True, cpu, torch.float32, cpu_offload=False)
    assert records.messages == []  # no failed lookups logged on the way
    assert half.unet.dtype == torch.float16 and full.unet.dtype == torch.float32
    half_bias, fp16_bias = half.unet.conv_in.bias.float(), fp16_unet.conv_in.bias.half().float()
    assert torch.equal(half_bias, fp16_bias)  # the fp16 files, whose weights are shifted by 0.5
    assert torch.equal(full.unet.conv_in.bias, default_unet.conv_in.bias)
    # the VAE has no fp16 files: half precision casts its default weights
    assert torch.equal(half.vae.encoder.conv_in.weight, default_vae.encoder.conv_in.weight.half())


def test_safetensors_are_read_when_present_else_bin(tmp_path):
    directory = make_tiny_sd(tmp_path / "sd", "sd1")
    safe = UNet2DConditionModel.from_pretrained(directory, subfolder="unet")
    pickled = _shift_and_save(directory, UNet2DConditionModel, "unet", 0.25, safe_serialization=False)
    assert (directory / "unet" / "diffusion_pytorch_model.bin").is_file()
    text_state = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder").state_dict()
    (directory / "text_encoder" / "model.safetensors").unlink()
    torch.save({k: v + 0.125 for k, v in text_state.items()}, directory / "text_encoder" / "pytorch_model.bin")

    with _Records() as records:
        model = load_guidance_model(str(directory), "cpu")
    assert records.messages == []
    assert torch.equal(model.unet.conv_in.bias, safe.conv_in.bias)  # both present: safetensors
    for name, value in model.text_encoder.state_dict().items():
        assert torch.equal(value, text_state[name] + 0.125), name  # only .bin: the .bin
    (directory / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    model = load_guidance_model(str(directory), "cpu")
    assert torch.equal(model.unet.conv_in.bias, pickled.conv_in.bias)


def test_hub_id_reads_the_cached_fp16_variant_offline(tmp_path):
    directory = make_tiny_sd(tmp_path / "sd", "sd2")
    fp16_unet = _shift_and_save(directory, UNet2DConditionModel, "unet", 0.5, variant="fp16")
    default_unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet")
    # the HF cache's layout for a downloaded repository: refs/main names the snapshot
    repo = tmp_path / "cache" / "models--tiny-org--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(directory, repo / "snapshots" / ("0" * 40))
    script = (
        "import sys, torch\n"
        "from xdreamer.guidance import loader\n"
        "for dtype in (torch.float16, torch.float32):\n"
        "    model = loader._load('tiny-org/tiny-sd', False, torch.device('cpu'), dtype, False)\n"
        "    print(model.unet.dtype, model.unet.conv_in.bias[:4].float().tolist())\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    half_line, full_line = result.stdout.strip().splitlines()[-2:]
    assert half_line == f"torch.float16 {fp16_unet.conv_in.bias[:4].half().float().tolist()}"
    assert full_line == f"torch.float32 {default_unet.conv_in.bias[:4].tolist()}"


PROMPTS = [
    "a photo of a cat, front view",
    "an astronaut riding a horse, back view",
    "a zebra! on a hill",  # "!" is SD 2.x's pad token
    "",
    "a red chair " * 30,  # longer than 77 tokens: truncated
]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_sd_tokenizer_layout_without_tokenizer_json_tokenizes_like_the_full_layout(tmp_path, pad_token):
    directory = make_tiny_sd(tmp_path / "sd", "sd2")
    full = directory / "tokenizer"
    reference = CLIPTokenizer(vocab=str(full / "vocab.json"), merges=str(full / "merges.txt"),
                              pad_token=pad_token, model_max_length=77)
    reference.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    reference = CLIPTokenizer.from_pretrained(tmp_path / "full")
    write_sd_tokenizer_layout(full, pad_token=pad_token)
    assert sorted(p.name for p in full.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
    ]
    tokenizer = load_guidance_model(str(directory), "cpu").tokenizer
    assert len(tokenizer) == len(reference)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id
    )
    assert tokenizer.pad_token_id == (0 if pad_token == "!" else tokenizer.eos_token_id)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
        # the end-of-text index AMA and CG-LoRA read: the first end-of-text token
        assert ids.index(tokenizer.eos_token_id) == min(len(tokenizer(prompt).input_ids), 77) - 1


def test_ddpm_schedule_from_sd21s_pndm_config_without_warnings(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER_CONFIG))
    records = _Records()
    records.setLevel(logging.DEBUG)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_debug()
    try:
        with warnings.catch_warnings(record=True) as caught, records:
            warnings.simplefilter("always")
            schedule = loader.ddpm_schedule(str(tmp_path))
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    assert caught == [] and records.messages == []
    assert isinstance(schedule, DDPMScheduler) and schedule.config.prediction_type == "epsilon"
    expected = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.equal(schedule.alphas_cumprod, expected)
    v_config = dict(SD21_SCHEDULER_CONFIG, prediction_type="v_prediction")  # SD 2.1 (768)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(v_config))
    assert loader.ddpm_schedule(str(tmp_path)).config.prediction_type == "v_prediction"


def test_unreachable_hub_fails_at_once_in_one_line(monkeypatch, tmp_path, caplog):
    """Not offline, not cached and the hub unreachable: one line naming why, without the hub
    client's retries (before: 12 log lines over 30 s)."""
    from xdreamer.guidance import loader

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(loader, "_hub_reachable", lambda timeout=3.0: "huggingface.co cannot be reached (test)")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(GuidanceModelError) as info:
        load_guidance_model("some-org/some-model", "cpu")
    _assert_one_line(info.value, "some-org/some-model", "not in the local HF cache", "cannot be reached", "--model toy")
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
