"""CG-LoRA: zero-initialized adapters leave SD unchanged, AMA training makes SD camera-dependent
and reaches every adapter, ablation switches remove the parts, weights round-trip."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from tiny_models import make_tiny_sd

from xdreamer.config import load_config
from xdreamer.guidance.ama import AttentionRecorder, ama_loss
from xdreamer.guidance.cg_lora import (
    CameraGuidedLoRA,
    CGLoRAError,
    CGLoRALinear,
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


def _ama_training(model_dirs, cfg, steps: int):
    """AMA-only training of CG-LoRA as a run does it: tiny SD through the loader, direction-aware
    text features, SDS with the conditional half under autograd, the adapters with the config's
    optimizer and the camera MLP with the geometry stage's AdamW. Returns the AMA loss before and
    after (adapters in eval mode: no dropout) and the adapters."""
    model = load_guidance_model(str(model_dirs["sd2"]), "cpu")
    conditioner = TextConditioner(model)
    cameras = orbit_cameras(2, elevation=20.0)
    views = conditioner.cameras("a red chair", cameras)
    c = cfg.cg_lora
    torch.manual_seed(0)
    lora = CameraGuidedLoRA(model.unet, TEXT_DIM, rank=c.rank, targets=c.targets, scale=c.scale, dropout=c.dropout)
    recorder = AttentionRecorder(variant="paper", layers=cfg.ama.layers)
    install_attention_processors(model.unet, lora, recorder)
    adapters = make_cg_lora_optimizer(lora.up_parameters(), c.optimizer, lr=c.lr, max_grad_norm=c.grad_clip)
    camera = torch.optim.AdamW(lora.camera_mlp.parameters(), lr=cfg.geometry.lr, betas=(0.9, 0.99), eps=1e-15)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 300])
    mask = disk_mask(2, 64, 0.6)
    text, camera_features = views.features_batch(), cameras.features().repeat(2, 1)

    def before_unet(rows):
        lora.set_condition(text[rows], camera_features[rows])
        recorder.set_token_index(views.cond_eot)

    def ama_step() -> tuple[torch.Tensor, torch.Tensor]:
        sds = score_distillation(
            model, latents, views.cond, views.uncond, t, noise, 50.0, unet_grad=True, before_unet=before_unet
        )
        return ama_loss(recorder.take(), mask, norm=cfg.ama.norm), sds.noise_pred_cfg

    lora.eval()
    with torch.no_grad():
        first, prediction = ama_step()
    lora.train()
    for _ in range(steps):
        adapters.zero_grad()
        camera.zero_grad()
        (cfg.ama.weight * ama_step()[0]).backward()
        adapters.step()
        camera.step()
    lora.eval()
    with torch.no_grad():
        final, trained_prediction = ama_step()
    up = max(a.up.weight.abs().max().item() for layer in lora.layers.values() for a in layer.values())
    change = ((trained_prediction - prediction).norm() / prediction.norm()).item()
    return first.item(), final.item(), up, change


def test_toy_preset_defaults_train_cg_lora_from_ama(model_dirs):
    """With the toy preset's CG-LoRA and AMA settings as they are (no optimizer overrides), 25
    AMA steps on a tiny SD pipeline lower the AMA loss by at least 20 % and change what the UNet
    predicts."""
    cfg = load_config(preset="toy", prompt="a red chair")
    first, final, up, change = _ama_training(model_dirs, cfg, steps=25)
    print(f"AMA loss {first:.4f} -> {final:.4f}, max|B| {up:.3g}, guided noise change {change:.3g}")
    assert final < 0.8 * first
    # The up matrices start at zero and each normalized step has length lr * grad_clip = 0.1
    # over all adapter tensors (about 1e5 numbers here), so a uniform spread of 25 steps would
    # give max|B| ~ 25 * 0.1 / sqrt(1e5) ~ 0.008. That they reach 10x that means the steps
    # concentrate on the entries AMA needs; and the adapted UNet's guided prediction moves by
    # more than 0.1 % (at the paper's step, 5e-5, max|B| stays 1.7e-4 and the change 3e-5).
    assert up > 0.08, up
    assert change > 1e-3, change


def test_paper_defaults_take_the_authors_normalized_step():
    """The default CG-LoRA update is the authors' effective one: a step of length lr * clip =
    5e-5 whatever the gradient's size (their GradScaler keeps the clip always active)."""
    cfg = load_config(preset="paper", prompt="a red chair")
    assert cfg.cg_lora.optimizer == "normalized_sgd" and cfg.cg_lora.lr == 1e-5 and cfg.cg_lora.grad_clip == 5.0
    for size in (1e-9, 1.0, 1e6):
        weight = torch.nn.Parameter(torch.zeros(3, 4))
        optimizer = make_cg_lora_optimizer([weight], cfg.cg_lora.optimizer, cfg.cg_lora.lr, cfg.cg_lora.grad_clip)
        weight.grad = torch.full((3, 4), size)
        optimizer.step()
        assert weight.detach().norm().item() == pytest.approx(5e-5, rel=1e-5)


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
    install_attention_processors(unet, CameraGuidedLoRA(unet, TEXT_DIM, targets="cross"), None)
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
    lora = CameraGuidedLoRA(unet, TEXT_DIM).eval()
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
    restored = CameraGuidedLoRA(unet, TEXT_DIM).eval()
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


def test_optimizer_kinds_clip_normalize_and_skip_zero_gradients():
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = make_cg_lora_optimizer([weight], "sgd")
    weight.grad = torch.full((3, 4), 10.0)  # norm 10 * sqrt(12)
    norm = optimizer.step()
    assert norm == pytest.approx(10.0 * 12**0.5, rel=1e-6)
    assert weight.detach().norm().item() == pytest.approx(1e-5 * 5.0, rel=1e-5)
    assert optimizer.param_groups[0]["lr"] == 1e-5
    weight.grad = torch.full((3, 4), 1e-3)  # below the clip: plain SGD
    before = weight.detach().clone()
    optimizer.step()
    assert (before - weight.detach()).norm().item() == pytest.approx(1e-5 * 1e-3 * 12**0.5, rel=1e-5)
    weight.grad = torch.zeros(3, 4)
    before = weight.detach().clone()
    assert make_cg_lora_optimizer([weight]).step() == 0.0
    assert torch.equal(weight.detach(), before)
    assert make_cg_lora_optimizer([weight], "adamw").param_groups[0]["lr"] == 1e-4
    with pytest.raises(CGLoRAError):
        make_cg_lora_optimizer([weight], "lion")
    with pytest.raises(CGLoRAError, match="max_grad_norm"):
        make_cg_lora_optimizer([weight], "normalized_sgd", max_grad_norm=None)


def test_adapted_linear_equals_the_method_einsum():
    """METHOD: A (d_in x r) = reshape of concat(P_t f_t, P_c f_c); output W0 x + scale B (A^T x).
    A hand-written einsum over known weights equals the adapter's output (dropout off)."""
    d_in, d_out, feature, rank = 6, 5, 3, 4
    adapter = CGLoRALinear(d_in, d_out, feature, rank=rank, scale=0.1, dropout=0.1).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    w0 = torch.nn.Linear(d_in, d_out)
    x = torch.randn(2, 7, d_in, generator=g)
    f_t, f_c = torch.randn(2, feature, generator=g), torch.randn(2, feature, generator=g)
    p_t = adapter.text_projection[1].weight @ adapter.text_projection[0].weight  # (d_in r / 2, D)
    p_c = adapter.camera_projection[1].weight @ adapter.camera_projection[0].weight
    concat = torch.cat([f_t @ p_t.T, f_c @ p_c.T], dim=-1)  # (N, d_in r)
    a = concat.reshape(2, d_in, rank)  # row-major: the text fills input channels 0 .. d_in/2 - 1
    b = adapter.up.weight  # (d_out, r)
    expected = w0(x) + 0.1 * torch.einsum("or,nir,nli->nlo", b, a, x)
    with torch.no_grad():
        assert torch.allclose(w0(x) + adapter(x, f_t, f_c), expected, atol=1e-5, rtol=1e-5)
    # The text half of A sits in the first half of the input channels.
    assert torch.allclose(adapter.down(f_t, f_c)[:, : d_in // 2].reshape(2, -1), f_t @ p_t.T, atol=1e-6)


def test_dropout_masks_come_from_the_call_seed_only():
    """The same call seed gives the same mask (a checkpointed recomputation draws what the forward
    drew); torch's global stream is never touched."""
    adapter = CGLoRALinear(8, 8, 4, dropout=0.5)
    with torch.no_grad():
        adapter.up.weight.fill_(1.0)
    x, f = torch.ones(1, 3, 8), torch.ones(1, 4)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    a, b, c = adapter(x, f, f, 5), adapter(x, f, f, 5), adapter(x, f, f, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a == 0).any() and (a != 0).any()
    assert torch.equal(torch.get_rng_state(), global_state)
    with pytest.raises(CGLoRAError, match="seed"):
        adapter(x, f, f, None)


def test_adapters_on_query_and_key_only(model_dirs):
    """projections=(to_q, to_k): no value/output adapters, zero-initialized output unchanged, and
    a trained q/k adapter changes the output only through the attention weights."""
    unet = fresh_unet(model_dirs)
    latents, t, context = unet_inputs(2)
    with torch.no_grad():
        plain = unet(latents, t, context).sample
    lora = CameraGuidedLoRA(unet, TEXT_DIM, targets="cross", projections=("to_q", "to_k")).eval()
    assert all(set(layer) == {"to_q", "to_k"} for layer in lora.layers.values())
    install_attention_processors(unet, lora, None)
    lora.set_condition(torch.randn(2, TEXT_DIM), torch.randn(2, 6))
    with torch.no_grad():
        assert torch.equal(unet(latents, t, context).sample, plain)
        for layer in lora.layers.values():
            layer["to_q"].up.weight.normal_(0.0, 1.0)
        assert not torch.equal(unet(latents, t, context).sample, plain)
    with pytest.raises(CGLoRAError, match="projections"):
        CameraGuidedLoRA(unet, TEXT_DIM, projections=("to_x",))
