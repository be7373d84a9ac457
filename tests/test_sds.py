"""Score distillation: exact gradient, classifier-free guidance, batch order, NaN guard, clipping,
normal+mask latents, pixel-space models, descent on a denoiser with a known optimum, and the
differentiated conditional half (unet_grad): equal outputs, half the saved memory, rows for the
attention processors."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from tiny_models import make_tiny_pixel_model, make_tiny_sd

from xdreamer.guidance.ama import AttentionRecorder, ama_loss
from xdreamer.guidance.cg_lora import CameraGuidedLoRA, install_attention_processors, remove_attention_processors
from xdreamer.guidance.loader import GuidanceModel, load_guidance_model
from xdreamer.guidance.sds import (
    GuidanceConfigError,
    TimestepSchedule,
    normal_mask_latents,
    predict_noise,
    score_distillation,
    sds_weight,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "sd1": load_guidance_model(str(make_tiny_sd(root / "sd1", "sd1")), "cpu"),
        "sd2": load_guidance_model(str(make_tiny_sd(root / "sd2", "sd2")), "cpu"),
        "pixel": load_guidance_model(str(make_tiny_pixel_model(root / "pixel")), "cpu"),
    }


def _inputs(batch=2, channels=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, channels, size, size, generator=g).requires_grad_()
    noise = torch.randn(batch, channels, size, size, generator=g)
    cond = torch.randn(batch, 77, 32, generator=g)
    uncond = torch.randn(batch, 77, 32, generator=g)
    return latents, noise, cond, uncond


def _manual_predictions(model, latents, noise, cond, uncond, t):
    """ε̂_u, ε̂_c from our own UNet call on the documented batch [uncond; cond] (the same batch
    makes the kernels, hence the rounding, identical; separate calls agree to ~1e-6)."""
    alpha = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents.detach() + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        eps = model.unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                         encoder_hidden_states=torch.cat([uncond, cond])).sample
        separate = model.unet(noisy, t, encoder_hidden_states=cond).sample
    eps_u, eps_c = eps.chunk(2)
    torch.testing.assert_close(separate, eps_c, rtol=1e-4, atol=1e-5)
    return eps_u, eps_c


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("weighting", ["sds", "fantasia3d", "uniform"])
def test_gradient_is_weighted_guided_residual(models, variant, weighting):
    model = models[variant]
    latents, noise, cond, uncond = _inputs()
    t = torch.tensor([50, 600])
    out = score_distillation(model, latents, cond, uncond, t, noise, guidance_scale=7.5, weighting=weighting)
    eps_u, eps_c = _manual_predictions(model, latents, noise, cond, uncond, t)
    alpha = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    weight = {"sds": 1 - alpha, "fantasia3d": alpha.sqrt() * (1 - alpha), "uniform": torch.ones_like(alpha)}[weighting]
    expected = weight * (eps_u + 7.5 * (eps_c - eps_u) - noise)
    assert not out.skipped
    torch.testing.assert_close(out.grad, expected, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    assert torch.equal(latents.grad, out.grad / 2)  # exactly the mean of the views' gradients
    assert out.loss.item() == pytest.approx(0.5 * out.grad.square().sum().item() / 2, rel=1e-6)


def test_guidance_scale_one_is_the_conditional_prediction(models):
    model = models["sd2"]
    latents, noise, cond, uncond = _inputs(seed=3)
    t = torch.tensor([200, 900])
    out = score_distillation(model, latents, cond, uncond, t, noise, guidance_scale=1.0)
    _, eps_c = _manual_predictions(model, latents, noise, cond, uncond, t)
    torch.testing.assert_close(out.noise_pred_cfg, eps_c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("unet_grad", [False, True])
def test_guidance_scale_one_skips_the_unconditional_half(models, unet_grad):
    """At scale 1 ε̂_cfg = ε̂_c: unless keep_uncond, one UNet call on the conditional rows only,
    the same gradient as the full batch (to the kernels' rounding), and no ε̂_u to return."""
    model = models["sd1"]
    latents, noise, cond, uncond = _inputs(batch=3, seed=6)
    t = torch.tensor([100, 400, 800])
    seen, rows = [], []
    handle = model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        full = score_distillation(model, latents, cond, uncond, t, noise, 1.0, unet_grad=unet_grad, keep_uncond=True)
        calls_full = len(seen)
        seen.clear()
        skipped = score_distillation(model, latents, cond, uncond, t, noise, 1.0, unet_grad=unet_grad,
                                     before_unet=rows.append)
    finally:
        handle.remove()
    assert calls_full == (2 if unet_grad else 1)
    assert len(seen) == 1 and rows == [slice(3, 6)]
    args, kwargs = seen[0]
    assert args[0].shape[0] == 3 and torch.equal(kwargs["encoder_hidden_states"], cond)
    assert full.noise_uncond is not None and skipped.noise_uncond is None
    torch.testing.assert_close(skipped.noise_cond, full.noise_cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(skipped.grad, full.grad, rtol=1e-4, atol=1e-5)
    # Any other scale still evaluates both halves, keep_uncond or not.
    seen.clear()
    handle = model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
    try:
        other = score_distillation(model, latents, cond, uncond, t, noise, 1.5)
    finally:
        handle.remove()
    assert seen == [6] and other.noise_uncond is not None


def test_unet_sees_uncond_then_cond_in_one_call(models):
    model = models["sd1"]
    latents, noise, cond, uncond = _inputs(batch=3, seed=4)
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        score_distillation(model, latents, cond, uncond, torch.tensor([10, 20, 30]), noise, 10.0)
    finally:
        handle.remove()
    assert len(seen) == 1
    args, kwargs = seen[0]
    context = kwargs["encoder_hidden_states"]
    assert torch.equal(context[:3], uncond) and torch.equal(context[3:], cond)
    assert torch.equal(args[1], torch.tensor([10, 20, 30, 10, 20, 30]))
    assert torch.equal(args[0][:3], args[0][3:])


def test_unet_grad_keeps_graph_of_the_conditional_half_only(models):
    model = models["sd1"]
    outputs = []
    handle = model.unet.register_forward_hook(lambda m, i, o: outputs.append(o.sample))
    try:
        latents, noise, cond, uncond = _inputs(seed=5)
        t = torch.tensor([300, 400])
        plain = score_distillation(model, latents, cond, uncond, t, noise, 20.0)
        tracked = score_distillation(model, latents, cond, uncond, t, noise, 20.0, unet_grad=True)
    finally:
        handle.remove()
    # plain: one call of 2B without graph; tracked: uncond B without graph, then cond B with it
    assert [o.shape[0] for o in outputs] == [4, 2, 2]
    assert [o.requires_grad for o in outputs] == [False, False, True]
    # Two calls of B instead of one of 2B: the same predictions up to the kernels' rounding.
    torch.testing.assert_close(outputs[1], outputs[0][:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[0][2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tracked.grad, plain.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tracked.noise_pred_cfg, plain.noise_pred_cfg, rtol=1e-4, atol=1e-4)
    tracked.loss.backward(retain_graph=True)
    assert torch.equal(latents.grad, tracked.grad / 2)  # the SDS target stays detached
    # A loss on the UNet's own output (as AMA takes on its attention) reaches the input.
    latents.grad = None
    outputs[2].square().mean().backward()
    assert latents.grad.abs().sum() > 0


def _saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs, leaving out
    the storages of `exclude` (the frozen weights, kept anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


def test_unet_grad_saves_half_the_activations_of_differentiating_the_whole_batch(models):
    model = models["sd2"]
    latents, noise, cond, uncond = _inputs(batch=4, seed=13)
    t = torch.tensor([100, 300, 500, 700])
    weights = list(model.unet.parameters()) + list(model.unet.buffers())
    split = _saved_bytes(
        lambda: score_distillation(model, latents, cond, uncond, t, noise, 7.5, unet_grad=True), weights
    )
    alpha = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    # What unet_grad did before: the whole [uncond; cond] batch under autograd.
    whole = _saved_bytes(
        lambda: predict_noise(model, torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([uncond, cond])), weights
    )
    print(f"saved for backward: whole batch {whole / 2**20:.2f} MiB, conditional half {split / 2**20:.2f} MiB")
    assert split > 0
    assert 0.45 < split / whole < 0.55


def test_before_unet_gives_cg_lora_and_the_recorder_their_rows(models):
    """The pipeline's recipe: the condition of the whole [uncond; cond] batch is sliced to each
    call's rows, and the recorder keeps only what the last call (the conditional half) records.
    Maps and CG-LoRA gradients equal those of one differentiated call of 2B."""
    model = models["sd2"]
    latents, noise, cond, uncond = _inputs(batch=2, seed=14)
    t = torch.tensor([200, 600])
    g = torch.Generator().manual_seed(15)
    text_features = torch.randn(4, 32, generator=g)
    camera_features = torch.randn(4, 6, generator=g)
    mask = (torch.rand(2, 64, 64, 1, generator=g) > 0.5).float()
    lora = CameraGuidedLoRA(model.unet, 32).eval()  # eval: the adapters' dropout is off
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("up.weight"):  # non-zero updates, so a wrong row would show
                p.normal_(0.0, 0.2, generator=g)
    recorder = AttentionRecorder(variant="paper", layers="all")
    install_attention_processors(model.unet, lora, recorder)
    up = [p for name, p in lora.named_parameters() if name.endswith("up.weight")]
    try:
        # Reference: one call of 2B under autograd, condition of the whole batch.
        lora.set_condition(text_features, camera_features)
        recorder.set_token_index([5, 6])
        alpha = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        predict_noise(model, torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([uncond, cond]))
        reference_maps = recorder.take()
        ama_loss(reference_maps, mask).backward()
        # Adapters after the last recorded attention do not reach the maps: no gradient.
        reference_grads = [None if p.grad is None else p.grad.clone() for p in up]
        lora.zero_grad(set_to_none=True)

        calls = []

        def before_unet(rows: slice) -> None:
            calls.append((rows.start, rows.stop))
            lora.set_condition(text_features[rows], camera_features[rows])
            recorder.reset()

        recorder.set_token_index([5, 6])
        score_distillation(model, latents, cond, uncond, t, noise, 7.5, unet_grad=True, before_unet=before_unet)
        maps = recorder.take()
        ama_loss(maps, mask).backward()
    finally:
        remove_attention_processors(model.unet)
    assert calls == [(0, 2), (2, 4)]
    assert len(maps) == len(reference_maps) == 4  # the tiny UNet's cross-attentions: down, mid, 2 up
    for got, expected in zip(maps, reference_maps):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert sum(g.abs().sum() for g in reference_grads if g is not None) > 0
    for p, expected in zip(up, reference_grads):
        if expected is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-6)

    seen = []
    score_distillation(model, latents, cond, uncond, t, noise, 7.5, before_unet=lambda rows: seen.append(rows))
    assert seen == [slice(0, 4)]  # standard SDS: one call of 2B


def test_non_finite_gradient_is_skipped_with_zero_loss(models):
    model = models["sd1"]
    latents, noise, cond, uncond = _inputs(seed=6)
    poison = lambda m, i, o: UNet2DConditionOutput(sample=o.sample * float("nan"))  # noqa: E731
    handle = model.unet.register_forward_hook(poison)
    try:
        out = score_distillation(model, latents, cond, uncond, torch.tensor([100, 100]), noise, 7.5)
    finally:
        handle.remove()
    assert out.skipped and out.loss.item() == 0.0
    assert torch.equal(out.grad, torch.zeros_like(latents))
    out.loss.backward()
    assert torch.equal(latents.grad, torch.zeros_like(latents))


def test_gradient_clipping_by_value_and_by_norm(models):
    model = models["sd1"]
    latents, noise, cond, uncond = _inputs(seed=7)
    t = torch.tensor([500, 800])
    free = score_distillation(model, latents, cond, uncond, t, noise, 100.0)
    assert free.grad.abs().max() > 0.05
    by_value = score_distillation(model, latents, cond, uncond, t, noise, 100.0, grad_clip=0.05)
    assert by_value.grad.abs().max().item() == pytest.approx(0.05)
    torch.testing.assert_close(by_value.grad, free.grad.clamp(-0.05, 0.05))
    norms = free.grad.flatten(1).norm(dim=1)
    clip = norms.min().item() * 0.5
    by_norm = score_distillation(model, latents, cond, uncond, t, noise, 100.0, grad_clip=clip, grad_clip_mode="norm")
    torch.testing.assert_close(by_norm.grad.flatten(1).norm(dim=1), torch.full((2,), clip))
    cosine = torch.nn.functional.cosine_similarity(by_norm.grad.flatten(1), free.grad.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(2))
    with pytest.raises(GuidanceConfigError):
        score_distillation(model, latents, cond, uncond, t, noise, 100.0, grad_clip=1.0, grad_clip_mode="max")


def test_normal_mask_latents_reach_the_render(models):
    model = models["sd2"]
    g = torch.Generator().manual_seed(8)
    normal = (torch.rand(2, 32, 32, 3, generator=g) * 2 - 1).requires_grad_()
    mask = torch.rand(2, 32, 32, 1, generator=g).requires_grad_()
    latents = normal_mask_latents(normal, mask, size=8)
    assert latents.shape == (2, 4, 8, 8)
    flat = normal_mask_latents(torch.full((1, 32, 32, 3), 0.25), torch.ones(1, 32, 32, 1), size=8)
    torch.testing.assert_close(flat[0, :, 3, 5], torch.tensor([0.25, 0.25, 0.25, 1.0]))
    _, noise, cond, uncond = _inputs(seed=9)
    out = score_distillation(model, latents, cond, uncond, torch.tensor([100, 300]), noise, 50.0, weighting="sds")
    out.loss.backward()
    # Antialiased 4x downsampling spreads each latent's gradient over all the pixels it covers.
    assert (normal.grad != 0).all() and (mask.grad != 0).all()
    assert normal.grad.abs().sum() > 0 and torch.isfinite(mask.grad).all()


def test_pixel_space_model_runs_sds_on_the_image(models):
    model = models["pixel"]
    g = torch.Generator().manual_seed(10)
    image = torch.rand(2, 32, 32, 3, generator=g).requires_grad_()
    x = model.encode_images(image)
    assert x.shape == (2, 3, 16, 16)
    noise = torch.randn(2, 3, 16, 16, generator=g)
    cond, uncond = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    out = score_distillation(model, x, cond, uncond, torch.tensor([100, 700]), noise, 20.0)
    eps_u, eps_c = _manual_predictions(model, x, noise, cond, uncond, torch.tensor([100, 700]))
    alpha = model.alphas_cumprod[torch.tensor([100, 700])].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, (1 - alpha) * (eps_u + 20 * (eps_c - eps_u) - noise), rtol=1e-6, atol=1e-7)
    out.loss.backward()
    assert image.grad.abs().sum() > 0 and torch.isfinite(image.grad).all()


class GaussianDenoiser(torch.nn.Module):
    """The exact ε-predictor for data x ~ N(μ, s² I), μ = context[:, 0, 0] x target: a fixed
    conditional model whose denoising error SDS must lower."""

    def __init__(self, alphas_cumprod, target, spread=0.1):
        super().__init__()
        self.alphas_cumprod, self.target, self.spread = alphas_cumprod, target, spread

    def forward(self, x, t, encoder_hidden_states):
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        mean = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1) * self.target
        sigma = (1 - alpha).sqrt()
        return SimpleNamespace(sample=sigma * (x - alpha.sqrt() * mean) / (alpha * self.spread**2 + sigma**2))


def test_sds_descent_lowers_denoising_error(models):
    alphas = models["sd1"].alphas_cumprod
    g = torch.Generator().manual_seed(11)
    target = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    model = GuidanceModel(GaussianDenoiser(alphas, target), None, None, None, alphas, 3, 8, 1.0,
                          torch.device("cpu"), torch.float32)
    cond, uncond = torch.ones(1, 77, 32), torch.zeros(1, 77, 32)
    probe_t = torch.linspace(20, 980, 16).long()
    probe_noise = torch.randn(16, 3, 8, 8, generator=g)

    def denoising_error(x):
        alpha = alphas[probe_t].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * x + (1 - alpha).sqrt() * probe_noise
        eps = predict_noise(model, noisy, probe_t, cond.expand(16, -1, -1))
        return (eps - probe_noise).square().mean().item()

    x = torch.zeros(1, 3, 8, 8, requires_grad=True)
    before = denoising_error(x.detach())
    optimizer = torch.optim.SGD([x], lr=0.5)
    schedule = TimestepSchedule(0.02, 0.98)
    for step in range(200):
        optimizer.zero_grad()
        t = schedule.sample(1, g, step=step)
        noise = torch.randn(1, 3, 8, 8, generator=g)
        score_distillation(model, x, cond, uncond, t, noise, guidance_scale=1.0).loss.backward()
        optimizer.step()
    after = denoising_error(x.detach())
    assert after < 0.5 * before
    assert (x.detach() - target).abs().mean() < 0.5 * target.abs().mean()


def test_timestep_schedule_ranges_and_switch():
    g = torch.Generator().manual_seed(12)
    schedule = TimestepSchedule(0.02, 0.5, later=(0.1, 0.3), later_step=100)
    early = schedule.sample(20000, g, step=99)
    assert early.dtype == torch.int64 and early.min() == 20 and early.max() == 500
    late = schedule.sample(20000, g, step=100)
    assert late.min() == 100 and late.max() == 300
    assert abs(late.float().mean().item() - 200) < 2
    top = TimestepSchedule(0.1, 1.0).sample(1000, g)
    assert top.max() == 999
    assert torch.equal(TimestepSchedule().sample(8, torch.Generator().manual_seed(1)),
                       TimestepSchedule().sample(8, torch.Generator().manual_seed(1)))
    for bad in [(0.5, 0.2), (-0.1, 0.5), (0.1, 1.5)]:
        with pytest.raises(GuidanceConfigError):
            TimestepSchedule(*bad)


def test_weightings_values(models):
    alphas = models["sd1"].alphas_cumprod
    t = torch.tensor([0, 500, 999])
    a = alphas[t]
    torch.testing.assert_close(sds_weight(alphas, t, "sds"), 1 - a)
    torch.testing.assert_close(sds_weight(alphas, t, "fantasia3d"), a.sqrt() * (1 - a))
    assert torch.equal(sds_weight(alphas, t, "uniform"), torch.ones(3))
    assert sds_weight(alphas, torch.tensor([0]), "sds").item() == pytest.approx(0.00085, rel=1e-4)
    with pytest.raises(GuidanceConfigError):
        sds_weight(alphas, t, "dreamfusion")


def test_v_prediction_and_learned_variance_become_epsilon(models):
    alphas = models["sd1"].alphas_cumprod
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([100, 800])
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    velocity = a.sqrt() * eps - (1 - a).sqrt() * x0
    extra = torch.randn(2, 3, 4, 4)

    def oracle(x, t, encoder_hidden_states):
        return SimpleNamespace(sample=torch.cat([velocity, extra], dim=1))

    model = GuidanceModel(oracle, None, None, None, alphas, 3, 4, 1.0, torch.device("cpu"), torch.float32,
                          prediction_type="v_prediction")
    torch.testing.assert_close(predict_noise(model, noisy, t, torch.zeros(2, 77, 32)), eps, rtol=1e-5, atol=1e-5)
