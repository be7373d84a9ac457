"""CG-LoRA: zero-initialized adapters leave SD unchanged, AMA training makes SD camera-dependent
and reaches every adapter, ablation switches remove the parts, weights round-trip."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from tiny_models import make_tiny_sd

from xdreamer.guidance.ama import AttentionRecorder, ama_loss
from xdreamer.guidance.cg_lora import (
    CameraGuidedLoRA,
    CGLoRAError,
    XDreamerAttnProcessor,
    install_attention_processors,
    make_cg_lora_optimizer,
    remove_attention_processors,
)
from xdreamer.guidance.loader import load_guidance_model
from xdreamer.guidance.prompts import TextConditioner
from xdreamer.guidance.sds import score_distillation
from xdreamer.render.camera import orbit_cameras, spherical_cameras

TEXT_DIM = 32  # tiny_models' text width


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cg_lora_models")
    return {variant: make_tiny_sd(root / variant, variant) for variant in ("sd1", "sd2")}


def fresh_unet(model_dirs, variant="sd1") -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(model_dirs[variant] / "unet").eval()


def unet_inputs(batch: int, seed: int = 0):
    """A fixed UNet call of `batch` samples: latents (N, 4, 8, 8), timesteps, context (N, 77, 32)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.full((batch,), 400),
        torch.randn(batch, 77, TEXT_DIM, generator=g),
    )


def disk_mask(batch: int, size: int = 32, radius: float = 0.5) -> torch.Tensor:
    """(B, size, size, 1) antialiased-free disk centred in the image."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return ((x.square() + y.square()) < radius**2).float()[None, :, :, None].expand(batch, -1, -1, -1)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("targets", ["cross", "all"])
def test_zero_initialized_cg_lora_leaves_unet_output_unchanged(model_dirs, variant, targets):
    unet = fresh_unet(model_dirs, variant)
    latents, t, context = unet_inputs(4)
    with torch.no_grad():
        plain = unet(latents, t, context).sample
    lora = CameraGuidedLoRA(unet, TEXT_DIM, targets=targets)
    recorder = AttentionRecorder()
    recorder.set_token_index([3, 4])
    install_attention_processors(unet, lora, recorder)
    lora.set_condition(torch.randn(4, TEXT_DIM), torch.randn(4, 6))
    with torch.no_grad():
        adapted = unet(latents, t, context).sample
    assert (adapted - plain).abs().max().item() <= 1e-6
    assert torch.equal(adapted, plain)  # adding B (A^T x) with B = 0 adds exact zeros
    cross = sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))
    assert len(lora.layer_paths) == (cross if targets == "cross" else len(unet.attn_processors))
    assert len(recorder.maps) == cross


def test_adapters_are_not_unet_parameters_and_unet_is_frozen(model_dirs):
    unet = fresh_unet(model_dirs)
    count = sum(p.numel() for p in unet.parameters())
    lora = CameraGuidedLoRA(unet, TEXT_DIM, rank=4)
    install_attention_processors(unet, lora, None)
    assert sum(p.numel() for p in unet.parameters()) == count
    assert not any(p.requires_grad for p in unet.parameters())
    # camera MLP 6 -> 512 -> 32, and per projection P_t, P_c (D -> 4 -> d_in r/2) and B (r -> d_out)
    expected = 6 * 512 + 512 + 512 * TEXT_DIM + TEXT_DIM
    for path in lora.layer_paths:
        attn = unet.get_submodule(path)
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            expected += 2 * (TEXT_DIM * 4 + 4 * linear.in_features * 2) + 4 * linear.out_features
    assert sum(p.numel() for p in lora.parameters()) == expected
    assert all(p.requires_grad for p in lora.parameters())


def _grad_norms(lora: CameraGuidedLoRA) -> dict[str, float]:
    norms = {"camera_mlp": sum(p.grad.norm().item() for p in lora.camera_mlp.parameters())}
    for key, layer in lora.layers.items():
        for name, adapter in layer.items():
            for part in ("text_projection", "camera_projection", "up"):
                grads = [p.grad for p in getattr(adapter, part).parameters()]
                norms[f"{key}.{name}.{part}"] = sum(0.0 if g is None else g.norm().item() for g in grads)
    return norms


def test_ama_gradients_reach_every_cg_lora_part_and_make_output_camera_dependent(model_dirs):
    unet = fresh_unet(model_dirs)
    lora = CameraGuidedLoRA(unet, TEXT_DIM)
    recorder = AttentionRecorder()
    install_attention_processors(unet, lora, recorder)
    latents, t, context = unet_inputs(1)
    text = torch.randn(1, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    cameras = spherical_cameras(
        elevation=torch.tensor([10.0, 30.0]),
        azimuth=torch.tensor([0.0, 120.0]),
        radius=torch.tensor([3.0, 3.0]),
        fov_y=torch.deg2rad(torch.tensor([40.0, 30.0])),
    )
    camera_features = cameras.features()

    def run(batch_latents, batch_context, batch_text, batch_camera):
        recorder.set_token_index([5] * batch_latents.shape[0])
        lora.set_condition(batch_text, batch_camera)
        return unet(batch_latents, t.expand(batch_latents.shape[0]), batch_context).sample

    # The same prompt and latents seen from the two cameras: a batch of 2.
    pair = (latents.expand(2, -1, -1, -1), context.expand(2, -1, -1), text.expand(2, -1), camera_features)
    with torch.no_grad():
        before = run(*pair)
    assert torch.equal(before[0], before[1])

    optimizer = make_cg_lora_optimizer(lora.parameters(), "adamw", lr=1e-2)
    mask = disk_mask(2)
    last = lora.layer_paths["up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    for step in range(3):
        optimizer.zero_grad()
        run(*pair)
        ama_loss(recorder.take(), mask).backward()
        norms = _grad_norms(lora)
        if step == 0:
            # B = 0: only the up matrices learn at first; A's generators and the camera MLP see no gradient.
            assert norms["camera_mlp"] == 0.0
            assert all(v == 0.0 for k, v in norms.items() if k.endswith("projection"))
            assert all(v > 0.0 for k, v in norms.items() if k.endswith(("to_q.up", "to_k.up")))
        optimizer.step()
    assert norms["camera_mlp"] > 0.0
    for key, value in norms.items():
        # The last recorded layer's value and output projections act after its map: no AMA signal.
        disconnected = key.startswith(f"{last}.to_v") or key.startswith(f"{last}.to_out")
        assert (value == 0.0) if disconnected else (value > 0.0), key
    with torch.no_grad():
        after = run(*pair)
    camera_gap = (after[0] - after[1]).abs().max().item()
    assert camera_gap > 1e-4
    assert (after - before).abs().max().item() > camera_gap / 10


def test_ama_alone_trains_cg_lora_to_lower_the_ama_loss(model_dirs):
    """The integration path: tiny SD loaded by the loader, direction-aware text features, camera
    features, SDS with the UNet under autograd; CG-LoRA learns from AMA only."""
    model = load_guidance_model(str(model_dirs["sd1"]), "cpu")
    conditioner = TextConditioner(model)
    cameras = orbit_cameras(2, elevation=20.0)
    views = conditioner.cameras("a red chair", cameras)
    lora = CameraGuidedLoRA(model.unet, TEXT_DIM)
    recorder = AttentionRecorder(variant="paper", layers="all")
    install_attention_processors(model.unet, lora, recorder)
    optimizer = make_cg_lora_optimizer(lora.parameters(), "adamw", lr=3e-3)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 300])
    mask = disk_mask(2, 64, 0.6)

    def ama_step() -> torch.Tensor:
        lora.set_condition(views.features_batch(), cameras.features().repeat(2, 1))
        recorder.set_token_index(views.cond_eot)
        score_distillation(model, latents, views.cond, views.uncond, t, noise, 50.0, unet_grad=True)
        return ama_loss(recorder.take(), mask)

    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = ama_step()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = ama_step().item()
    print(f"AMA loss over a fixed batch: {losses[0]:.4f} -> {final:.4f} after 25 AdamW steps")
    assert final < 0.8 * losses[0]


def test_ablation_switches_remove_the_parts(model_dirs):
    latents, t, context = unet_inputs(2)

    # CG-LoRA and AMA both off: the UNet keeps its own processor objects.
    unet = fresh_unet(model_dirs)
    original = unet.attn_processors
    install_attention_processors(unet, None, None)
    assert all(unet.attn_processors[name] is processor for name, processor in original.items())

    # AMA without CG-LoRA: no adapter anywhere, maps still recorded, output unchanged.
    with torch.no_grad():
        plain = unet(latents, t, context).sample
    recorder = AttentionRecorder()
    recorder.set_token_index([2])
    install_attention_processors(unet, None, recorder)
    ours = [p for p in unet.attn_processors.values() if isinstance(p, XDreamerAttnProcessor)]
    assert len(ours) == 4 and all(p.adapters is None and p.lora is None for p in ours)
    with torch.no_grad():
        assert torch.equal(unet(latents, t, context).sample, plain)
    assert len(recorder.maps) == 4

    # CG-LoRA without AMA: no recorder reaches the processors, so an unplugged recorder stays empty.
    unplugged = AttentionRecorder()
    unplugged.set_token_index([2])
    lora = CameraGuidedLoRA(unet, TEXT_DIM)
    install_attention_processors(unet, lora, None)
    lora.set_condition(torch.randn(2, TEXT_DIM), torch.randn(2, 6))
    with torch.no_grad():
        unet(latents, t, context)
    assert all(p.recorder is None for p in unet.attn_processors.values() if isinstance(p, XDreamerAttnProcessor))
    assert unplugged.maps == []


def test_reinstalling_keeps_untouched_processors_and_undoes_earlier_installs(model_dirs):
    unet = fresh_unet(model_dirs)
    unet.set_attn_processor(SlicedAttnProcessor(1))  # the loader's attention slicing
    install_attention_processors(unet, CameraGuidedLoRA(unet, TEXT_DIM, targets="all"), AttentionRecorder())
    assert all(isinstance(p, XDreamerAttnProcessor) for p in unet.attn_processors.values())
    install_attention_processors(unet, None, AttentionRecorder())
    kinds = {name.split(".")[-2]: type(p) for name, p in unet.attn_processors.items()}
    assert kinds == {"attn1": AttnProcessor2_0, "attn2": XDreamerAttnProcessor}
    unet.set_attn_processor({n: SlicedAttnProcessor(1) if "attn1" in n else p for n, p in unet.attn_processors.items()})
    install_attention_processors(unet, CameraGuidedLoRA(unet, TEXT_DIM), None)
    remove_attention_processors(unet)
    kinds = {name.split(".")[-2]: type(p) for name, p in unet.attn_processors.items()}
    assert kinds == {"attn1": SlicedAttnProcessor, "attn2": AttnProcessor2_0}


def test_condition_must_match_the_unet_call(model_dirs):
    unet = fresh_unet(model_dirs)
    lora = CameraGuidedLoRA(unet, TEXT_DIM)
    install_attention_processors(unet, lora, None)
    latents, t, context = unet_inputs(4)
    with pytest.raises(CGLoRAError, match="set_condition"):
        unet(latents, t, context)
    lora.set_condition(torch.randn(2, TEXT_DIM), torch.randn(2, 6))
    with pytest.raises(CGLoRAError, match="2 samples but the UNet call has 4"):
        unet(latents, t, context)
    with pytest.raises(CGLoRAError, match="camera features"):
        lora.set_condition(torch.randn(4, TEXT_DIM), torch.randn(3, 6))
    with pytest.raises(CGLoRAError, match="even"):
        CameraGuidedLoRA(unet, TEXT_DIM, rank=3)
    other = CameraGuidedLoRA(fresh_unet(model_dirs, "sd1"), TEXT_DIM, targets="all")
    with pytest.raises(CGLoRAError, match="another UNet"):
        install_attention_processors(UNet2DConditionModel(**{**unet.config, "block_out_channels": (16, 32)}), other)


def test_lora_weights_round_trip_through_safetensors(model_dirs, tmp_path):
    unet = fresh_unet(model_dirs)
    lora = CameraGuidedLoRA(unet, TEXT_DIM)
    with torch.no_grad():
        for layer in lora.layers.values():
            for adapter in layer.values():
                adapter.up.weight.normal_(0.0, 0.1)
    install_attention_processors(unet, lora, None)
    latents, t, context = unet_inputs(2)
    condition = (torch.randn(2, TEXT_DIM), torch.randn(2, 6))
    lora.set_condition(*condition)
    with torch.no_grad():
        reference = unet(latents, t, context).sample
    path = lora.save(tmp_path / "cg_lora.safetensors")

    torch.manual_seed(123)  # a differently initialized copy
    restored = CameraGuidedLoRA(unet, TEXT_DIM)
    install_attention_processors(unet, restored, None)
    restored.set_condition(*condition)
    with torch.no_grad():
        assert not torch.equal(unet(latents, t, context).sample, reference)
    restored.load(path)
    with torch.no_grad():
        assert torch.equal(unet(latents, t, context).sample, reference)
    smaller = CameraGuidedLoRA(unet, TEXT_DIM, rank=2)
    with pytest.raises(CGLoRAError, match="shape"):
        smaller.load(path)


def test_sgd_optimizer_clips_the_gradient_norm_at_five():
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = make_cg_lora_optimizer([weight], "sgd")
    weight.grad = torch.full((3, 4), 10.0)  # norm 10 * sqrt(12)
    norm = optimizer.step()
    assert norm == pytest.approx(10.0 * 12**0.5, rel=1e-6)
    assert weight.detach().norm().item() == pytest.approx(1e-5 * 5.0, rel=1e-5)
    assert optimizer.param_groups[0]["lr"] == 1e-5
    assert make_cg_lora_optimizer([weight], "adamw").param_groups[0]["lr"] == 1e-4
    with pytest.raises(CGLoRAError):
        make_cg_lora_optimizer([weight], "lion")
