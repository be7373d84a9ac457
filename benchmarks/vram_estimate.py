"""Estimated GPU memory of one X-Dreamer step with Stable Diffusion 2.1-base, per preset, number of
views and phase, computed on the CPU without loading or allocating any model weights.

What is counted, and how:
- weights: the float16 UNet and VAE (SD 2.1-base's exact configs, `sd21.py`); the text encoder is
  released before the first step and not counted.
- trained parameters: float32 values, gradients and optimizer state (AdamW: two moments) of the
  geometry network or the material network, and of CG-LoRA (SGD: none).
- graphs: the bytes autograd saves for the backward pass (torch.autograd.graph.saved_tensors_hooks,
  distinct storages, frozen weights left out). The UNet and the VAE run on the 'meta' device
  (shapes only), with PyTorch's CUDA flash-attention kernel's saved tensors for attention
  (q, k, v, output and a float32 log-sum-exp per query; the meta device would otherwise take
  the math path and keep the attention matrix). The UNet graph is the conditional half only
  (what AMA differentiates now) or, for comparison, the whole CFG batch (what it did before).
  The geometry network is measured on a 32³ grid and scaled by grid vertices (its saved tensors
  are per vertex); marching tetrahedra by surface area (grid resolution²); the renders
  (normal/mask passes or PBR shading with the material network) at 128² and scaled by pixels.
- not counted: forward temporaries (e.g. the unconditional UNet half, freed as it runs), the
  backward pass's gradient buffers, cuDNN/cuBLAS workspaces, the CUDA context and the
  allocator's fragmentation; CG-LoRA runs without its dropout (whose masks add one byte per
  adapted projection output). `benchmarks/gpu_check.py` measures the real peak on a GPU.

Run: .venv/bin/python benchmarks/vram_estimate.py [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sd21  # noqa: E402

from xdreamer.appearance.material import MaterialNetwork  # noqa: E402
from xdreamer.geometry.dmtet import DMTetGeometry, marching_tetrahedra  # noqa: E402
from xdreamer.geometry.init import ellipsoid_sdf  # noqa: E402
from xdreamer.guidance.ama import AttentionRecorder  # noqa: E402
from xdreamer.guidance.cg_lora import CameraGuidedLoRA, install_attention_processors  # noqa: E402
from xdreamer.mesh import Mesh  # noqa: E402
from xdreamer.render.camera import orbit_cameras  # noqa: E402
from xdreamer.render.light import default_environment  # noqa: E402
from xdreamer.render.passes import render_geometry  # noqa: E402
from xdreamer.render.shade import render_pbr  # noqa: E402

GiB = 2**30
PRESETS = {"paper": {"render": 512, "grid": 128}, "fast": {"render": 256, "grid": 128}}
IMAGE_SIZE = 512  # SD 2.1-base sees 512² images (64² latents) whatever the render size
MEASURED_GRID, MEASURED_RENDER = 32, 128
ELLIPSOID = (0.56, 0.76, 0.56)  # the init shape
PHASES = ("geometry, latent phase", "geometry, VAE", "geometry, VAE + AMA", "appearance, VAE + AMA")


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, storages of `exclude` left out."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


@contextlib.contextmanager
def flash_attention():
    """scaled_dot_product_attention as CUDA's flash kernel saves it, also on the meta device."""
    sdpa = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale
        )[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


@contextlib.contextmanager
def meta_values_read_as_zero():
    """Meta tensors hold no values; the AMA recorder reads one (its token-index bounds check,
    int(index.max()) on the UNet's device). Reading a meta tensor gives 0 here."""
    to_int = torch.Tensor.__int__
    torch.Tensor.__int__ = lambda self: 0 if self.is_meta else to_int(self)
    try:
        yield
    finally:
        torch.Tensor.__int__ = to_int


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def unet_graph(unet: torch.nn.Module, views: int, whole_batch: bool, text_dim: int = 1024) -> tuple[int, int]:
    """(saved bytes of the UNet call AMA differentiates, CG-LoRA parameter bytes), with CG-LoRA and
    the AMA recorder installed in `unet` (on 'meta' for the estimate; any device works).

    whole_batch: the [uncond; cond] batch of 2B under autograd (before) instead of the
    conditional half's B."""
    weight = next(unet.parameters())
    device, dtype, size = weight.device, weight.dtype, unet.config.sample_size
    lora = CameraGuidedLoRA(unet, text_feature_dim=text_dim).to(device).eval()
    recorder = AttentionRecorder(variant="paper", layers="all")
    install_attention_processors(unet, lora, recorder)
    rows = 2 * views if whole_batch else views
    lora.set_condition(torch.zeros(rows, text_dim, device=device), torch.zeros(rows, 6, device=device))
    recorder.set_token_index([5] * views)
    latents = torch.zeros(rows, unet.config.in_channels, size, size, device=device, dtype=dtype, requires_grad=True)
    context = torch.zeros(rows, 77, text_dim, device=device, dtype=dtype)
    t = torch.zeros(rows, dtype=torch.long, device=device)
    excluded = list(unet.parameters()) + list(unet.buffers()) + list(lora.parameters())
    with flash_attention(), meta_values_read_as_zero():
        saved = saved_bytes(lambda: unet(latents, t, encoder_hidden_states=context), excluded)
    return saved, parameter_bytes(lora)


def vae_graph(vae: torch.nn.Module, views: int, size: int = IMAGE_SIZE) -> int:
    """Saved bytes of encoding views x size² images to latents, differentiable in the images."""
    weight = next(vae.parameters())
    images = torch.zeros(views, 3, size, size, device=weight.device, dtype=weight.dtype, requires_grad=True)
    frozen = list(vae.parameters()) + list(vae.buffers())
    with flash_attention():
        return saved_bytes(lambda: vae.encode(images).latent_dist.mode(), frozen)


def geometry_graphs() -> dict[str, float]:
    """Measured at MEASURED_GRID on the CPU: network bytes per grid vertex, marching-tets bytes
    per squared grid resolution, the geometry passes' bytes per pixel, the network's parameters."""
    geometry = DMTetGeometry(grid_resolution=MEASURED_GRID)
    ellipsoid = ellipsoid_sdf(ELLIPSOID)
    params = list(geometry.parameters())
    vertices = geometry.grid_vertices.shape[0]
    network = saved_bytes(geometry.sdf_and_offset, params)

    def extract() -> Mesh:
        sdf, offset = geometry.sdf_and_offset()
        # Plus the ellipsoid, as after the init fit: a surface to extract.
        sdf = sdf + ellipsoid(geometry.grid_vertices * geometry.grid_scale)
        verts, faces = marching_tetrahedra(geometry.deformed_vertices(offset), geometry.tets, sdf)
        return Mesh(vertices=verts, faces=faces)

    whole = saved_bytes(extract, params)
    with torch.no_grad():
        mesh = extract()
    vertices_param = mesh.vertices.detach().requires_grad_()
    cameras = orbit_cameras(1)
    passes = saved_bytes(
        lambda: render_geometry(Mesh(vertices=vertices_param, faces=mesh.faces), cameras, MEASURED_RENDER, "torch")
    )
    return {
        "network_per_vertex": network / vertices,
        "surface_per_res2": (whole - network) / MEASURED_GRID**2,
        "passes_per_pixel": passes / MEASURED_RENDER**2,
        "trained_bytes": 4 * parameter_bytes(geometry),  # value, gradient, two AdamW moments
        "mesh": mesh,
    }


def appearance_graph(mesh: Mesh) -> dict[str, float]:
    """PBR render with the material network (hash encoding) at MEASURED_RENDER, per pixel."""
    material = MaterialNetwork.for_mesh(mesh)
    light = default_environment()
    cameras = orbit_cameras(1)
    per_pixel = saved_bytes(
        lambda: render_pbr(mesh, cameras, MEASURED_RENDER, material, light, background=(0, 0, 0), backend="torch"),
        list(material.parameters()),
    ) / MEASURED_RENDER**2
    return {"per_pixel": per_pixel, "trained_bytes": 4 * parameter_bytes(material)}


def estimate() -> list[dict]:
    weights = parameter_bytes(sd21.build_unet("meta")) + parameter_bytes(sd21.build_vae("meta"))
    geometry = geometry_graphs()
    appearance = appearance_graph(geometry["mesh"])
    rows = []
    for views in (1, 4):
        unet_cond, lora_bytes = unet_graph(sd21.build_unet("meta"), views, whole_batch=False)
        unet_whole, _ = unet_graph(sd21.build_unet("meta"), views, whole_batch=True)
        vae = vae_graph(sd21.build_vae("meta"), views)
        lora_trained = 2 * lora_bytes  # value and gradient (SGD keeps no state)
        for preset, sizes in PRESETS.items():
            pixels = views * sizes["render"] ** 2
            vertices = (sizes["grid"] + 1) ** 3
            geometry_graph = (
                geometry["network_per_vertex"] * vertices
                + geometry["surface_per_res2"] * sizes["grid"] ** 2
                + geometry["passes_per_pixel"] * pixels
            )
            for phase in PHASES:
                appearance_phase = phase.startswith("appearance")
                graph = appearance["per_pixel"] * pixels if appearance_phase else geometry_graph
                trained = appearance["trained_bytes"] if appearance_phase else geometry["trained_bytes"]
                encoder = vae if "VAE" in phase else 0
                ama = "AMA" in phase
                base = weights + trained + graph + encoder + (lora_trained if ama else 0)
                rows.append(
                    {
                        "preset": preset,
                        "views": views,
                        "phase": phase,
                        "weights": weights,
                        "trained": trained + (lora_trained if ama else 0),
                        "render_graph": graph,
                        "vae_graph": encoder,
                        "unet_graph": unet_cond if ama else 0,
                        "unet_graph_whole_batch": unet_whole if ama else 0,
                        "total": base + (unet_cond if ama else 0),
                        "total_whole_batch": base + (unet_whole if ama else 0),
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    header = (
        "| preset | views | phase | weights | trained | geometry/material + render graph | VAE encoder graph "
        "| UNet graph (AMA: cond. half / whole batch) | total (GiB) | total before (whole batch) |"
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        unet = f"{r['unet_graph'] / GiB:.2f} / {r['unet_graph_whole_batch'] / GiB:.2f}" if r["unet_graph"] else "-"
        lines.append(
            f"| {r['preset']} | {r['views']} | {r['phase']} | {r['weights'] / GiB:.2f} | {r['trained'] / GiB:.2f} "
            f"| {r['render_graph'] / GiB:.2f} | {r['vae_graph'] / GiB:.2f} | {unet} | **{r['total'] / GiB:.2f}** "
            f"| {r['total_whole_batch'] / GiB:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = parser.parse_args()
    rows = estimate()
    print("Estimated GiB per step, SD 2.1-base in float16 (see benchmarks/vram_estimate.py for what is counted)\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
