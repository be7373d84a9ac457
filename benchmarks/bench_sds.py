"""Time of one SDS step, split into render / encode / UNet / backward, as a markdown table.

CPU: the tiny test models (tests/tiny_models.py), latent (SD-shaped) and pixel-space, 1 and 4
views; the render is simulated by one differentiable tensor op on a (B, 64, 64, 3) parameter.
CUDA (when available): a UNet with Stable Diffusion 2.1-base's configuration and random weights
at 64x64 latents in float16, 1 and 4 views, standard SDS and with the UNet graph kept (AMA):
step time and peak memory.

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_sds.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import make_tiny_pixel_model, make_tiny_sd  # noqa: E402

from xdreamer.guidance.loader import GuidanceModel, load_guidance_model  # noqa: E402
from xdreamer.guidance.sds import score_distillation  # noqa: E402

REPEATS = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def bench_tiny(model: GuidanceModel, views: int, generator: torch.Generator) -> dict[str, float]:
    """Median milliseconds of each phase of one SDS step on the CPU."""
    texture = torch.rand(views, 64, 64, 3, generator=generator).requires_grad_()
    context = torch.randn(2, views, 77, 32, generator=generator)
    phases: dict[str, list[float]] = {"render": [], "encode": [], "unet": [], "backward": []}
    for repeat in range(REPEATS + 2):
        clock = [time.perf_counter()]
        image = torch.sigmoid(texture * 4.0 - 2.0)  # stands in for the differentiable render
        clock.append(time.perf_counter())
        x = model.encode_images(image)
        clock.append(time.perf_counter())
        t = torch.randint(20, 500, (views,), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        out = score_distillation(model, x, context[0], context[1], t, noise, guidance_scale=50.0)
        clock.append(time.perf_counter())
        texture.grad = None
        out.loss.backward()
        clock.append(time.perf_counter())
        if repeat >= 2:  # the first calls warm up allocators and kernels
            for name, start, end in zip(phases, clock, clock[1:]):
                phases[name].append(end - start)
    return {name: _median_ms(values) for name, values in phases.items()}


def bench_sd21_unet(views: int, unet_grad: bool) -> tuple[float, float]:
    """(median step ms, peak GiB) for SD 2.1-base's UNet in float16 at 64x64 latents on CUDA."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = torch.device("cuda")
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    ).to(device, torch.float16)
    unet.requires_grad_(False).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    model = GuidanceModel(unet, None, None, None, scheduler.alphas_cumprod.to(device), 4, 64, 0.18215,
                          device, torch.float16)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(views, 4, 64, 64, device=device, generator=generator).requires_grad_()
    cond = torch.randn(views, 77, 1024, device=device, generator=generator)
    uncond = torch.randn(views, 77, 1024, device=device, generator=generator)
    outputs: list[torch.Tensor] = []
    unet.register_forward_hook(lambda module, args, output: outputs.append(output.sample))
    times = []
    torch.cuda.reset_peak_memory_stats()
    for repeat in range(REPEATS + 2):
        _sync(device)
        start = time.perf_counter()
        t = torch.randint(20, 500, (views,), device=device, generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        out = score_distillation(model, latents, cond, uncond, t, noise, 100.0, unet_grad=unet_grad)
        loss = out.loss
        if unet_grad:  # stands in for AMA: a loss through the UNet's graph back to the latents
            loss = loss + outputs[-1].float().mean()
        outputs.clear()
        latents.grad = None
        loss.backward()
        _sync(device)
        if repeat >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del unet, model
    torch.cuda.empty_cache()
    return _median_ms(times), peak


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    generator = torch.Generator().manual_seed(0)
    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| model (CPU, tiny) | views | render ms | encode ms | UNet+CFG ms | backward ms | step ms |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        models = {
            "latent (SD-shaped, VAE)": load_guidance_model(str(make_tiny_sd(Path(root) / "sd", "sd2")), "cpu"),
            "pixel-space": load_guidance_model(str(make_tiny_pixel_model(Path(root) / "pixel")), "cpu"),
        }
        for name, model in models.items():
            for views in (1, 4):
                ms = bench_tiny(model, views, generator)
                total = sum(ms.values())
                print(
                    f"| {name} | {views} | {ms['render']:.2f} | {ms['encode']:.2f} | {ms['unet']:.2f} "
                    f"| {ms['backward']:.2f} | {total:.2f} |"
                )
    if not torch.cuda.is_available():
        print("\nCUDA not available: SD 2.1-base-sized UNet rows skipped.")
        return
    print(f"\n{torch.cuda.get_device_name()}, SD 2.1-base UNet (random weights), float16, 64x64 latents\n")
    print("| views | UNet graph | step ms | peak GiB |")
    print("|---|---|---|---|")
    for unet_grad in (False, True):
        for views in (1, 4):
            ms, peak = bench_sd21_unet(views, unet_grad)
            label = "kept (AMA)" if unet_grad else "no (SDS)"
            print(f"| {views} | {label} | {ms:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
