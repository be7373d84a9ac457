"""Cost of CG-LoRA and AMA on one guidance step: plain SDS vs SDS + CG-LoRA vs SDS + CG-LoRA + AMA.

A step is the UNet call on [uncond; cond] (2B samples) plus the backward pass to the latents (and,
with AMA, to the adapters through the UNet). Memory is the size of the tensors autograd saves for
the backward pass (deduplicated by storage), plus the CUDA peak when run on a GPU. The UNets are
random, built from configs: "tiny" is the tests' SD1-shaped toy, "small" a 3-level SD-like UNet
on 16x16 latents (cross-attention at 16x16 and 8x8, 4 heads, 77 text tokens of 256). Times are
medians over `--steps` steps.

    python benchmarks/bench_cg_lora_ama.py [--device cuda] [--steps 5] [--unets tiny small]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from xdreamer.guidance.ama import AttentionRecorder, ama_loss
from xdreamer.guidance.cg_lora import (
    CameraGuidedLoRA,
    install_attention_processors,
    make_cg_lora_optimizer,
    remove_attention_processors,
)
from xdreamer.guidance.loader import GuidanceModel
from xdreamer.guidance.sds import score_distillation

UNETS = {
    "tiny": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    ),
    "small": dict(
        sample_size=16,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=4,
        norm_num_groups=32,
    ),
}
MODES = ("SDS", "SDS + CG-LoRA", "SDS + AMA", "SDS + CG-LoRA + AMA")


def build_model(name: str, device: torch.device) -> GuidanceModel:
    torch.manual_seed(0)
    config = UNETS[name]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=1, **config).to(device).eval()
    unet.requires_grad_(False)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return GuidanceModel(
        unet=unet,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        alphas_cumprod=scheduler.alphas_cumprod.to(device),
        channels=4,
        sample_size=config["sample_size"],
        scaling_factor=1.0,
        device=device,
        dtype=torch.float32,
    )


def saved_bytes_hook():
    """saved_tensors_hooks that count the bytes autograd keeps for backward, once per storage."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), seen


def measure(model: GuidanceModel, mode: str, batch: int, steps: int) -> tuple[float, float, float | None, int]:
    """(ms per step, MB saved for backward, CUDA peak MB or None, trainable parameters)."""
    device = model.device
    unet = model.unet
    remove_attention_processors(unet)
    dim = unet.config.cross_attention_dim
    lora = recorder = optimizer = None
    if "CG-LoRA" in mode:
        lora = CameraGuidedLoRA(unet, dim).to(device)
        optimizer = make_cg_lora_optimizer(lora.parameters(), "sgd")
    if mode.endswith("AMA"):
        recorder = AttentionRecorder()
    install_attention_processors(unet, lora, recorder)
    g = torch.Generator(device="cpu").manual_seed(0)
    size = model.sample_size
    latents = torch.randn(batch, 4, size, size, generator=g).to(device).requires_grad_(True)
    noise = torch.randn(batch, 4, size, size, generator=g).to(device)
    cond, uncond = torch.randn(2, batch, 77, dim, generator=g).to(device)
    features = torch.randn(2 * batch, dim, generator=g).to(device)
    cameras = torch.randn(2 * batch, 6, generator=g).to(device)
    mask = (torch.rand(batch, 8 * size, 8 * size, 1, generator=g) > 0.5).float().to(device)
    t = torch.full((batch,), 300, device=device)

    def before_unet(rows: slice) -> None:
        # Each UNet call gets its rows of the [uncond; cond] condition; the recorder starts afresh.
        if lora is not None:
            lora.set_condition(features[rows], cameras[rows])
        if recorder is not None:
            recorder.set_token_index(torch.full((batch,), 5))

    def step() -> None:
        latents.grad = None
        if optimizer is not None:
            optimizer.zero_grad()
        out = score_distillation(
            model, latents, cond, uncond, t, noise, 100.0, unet_grad=recorder is not None, before_unet=before_unet
        )
        loss = out.loss
        if recorder is not None:
            loss = loss + 0.1 * ama_loss(recorder.take(), mask)
        loss.backward()
        if recorder is not None and optimizer is not None:
            optimizer.step()

    step()  # warm-up
    hooks, seen = saved_bytes_hook()
    with hooks:
        step()
    saved = sum(seen.values()) / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    elapsed = sorted(times)[len(times) // 2] * 1000
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    trainable = 0 if lora is None else sum(p.numel() for p in lora.parameters())
    return elapsed, saved, peak, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--unets", nargs="+", default=list(UNETS), choices=list(UNETS))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| UNet | views B (UNet batch 2B) | mode | step ms | saved for backward MB | CUDA peak MB | CG-LoRA params |")
    print("|---|---|---|---|---|---|---|")
    for name in args.unets:
        model = build_model(name, device)
        for batch in args.batches:
            for mode in MODES:
                ms, saved, peak, trainable = measure(model, mode, batch, args.steps)
                peak_text = "-" if peak is None else f"{peak:.0f}"
                print(f"| {name} | {batch} ({2 * batch}) | {mode} | {ms:.1f} | {saved:.1f} | {peak_text} | {trainable:,} |")


if __name__ == "__main__":
    main()
