"""The two stages of X-Dreamer: each renders a batch of views of what it optimizes, hands them to
the guidance, adds its own regularizers and returns the losses; the run does the backward pass,
the checkpoints and the restores.

Geometry: a DMTet network (SDF + offsets over a tet grid) rendered as world-space normal maps
(as [normal, mask] latents in the early phase of a latent model). Appearance: a material network
over the fixed mesh, rendered with split-sum PBR shading."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from xdreamer.appearance.material import MaterialNetwork
from xdreamer.atomic import atomic_path
from xdreamer.geometry.carving import CarvedRays, background_pixels, carved_rays, ray_carve_loss
from xdreamer.geometry.cleanup import remove_loose_pieces, topology_report
from xdreamer.geometry.dmtet import DMTetGeometry, marching_tetrahedra
from xdreamer.geometry.init import EllipsoidSDF, MeshSDF, ellipsoid_sdf, fit_geometry_to_sdf, normalize_mesh
from xdreamer.geometry.regularizers import laplacian_smoothness, normal_consistency, sdf_sign_regularizer, tet_edges
from xdreamer.guidance.ama import save_attention_visualization
from xdreamer.guidance.sds import TimestepSchedule, normal_mask_latents
from xdreamer.mesh import Mesh, load_mesh
from xdreamer.pipeline.guide import GuidanceStep, GuideOutput
from xdreamer.pipeline.state import seeded
from xdreamer.render.camera import Cameras, orbit_cameras
from xdreamer.render.light import EnvironmentLight
from xdreamer.render.passes import render_geometry
from xdreamer.render.raster import Rasterizer
from xdreamer.render.shade import render_pbr


CARVE_RESOLUTION = 64


def _adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    # METHOD's settings for both stages' networks (and the camera MLP, as in the authors' code).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.99), eps=1e-15)


def grid_image(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) in [0, 1] -> one (H, B*W, 3) uint8 strip."""
    strip = torch.cat(list(images.detach().float().cpu().clamp(0, 1)), dim=1)
    return (strip.numpy() * 255 + 0.5).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image)


class _Stage:
    """What both stages share: a network, its optimizer, and their checkpoint state under
    `state_key` and `state_key + "_optimizer"`."""

    name: str
    state_key: str
    optimizer: torch.optim.Optimizer

    @property
    def network(self) -> torch.nn.Module:
        return getattr(self, self.state_key)

    def collapsed(self) -> bool:
        """Whether the current state is one a restore must not return to."""
        return False

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {self.state_key: self.network.state_dict(), f"{self.state_key}_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state[self.state_key])
        self.optimizer.load_state_dict(state[f"{self.state_key}_optimizer"])


class GeometryStage(_Stage):
    """The DMTet geometry, its optimizer (with the camera MLP's group) and one step of it."""

    name = state_key = "geometry"

    def __init__(
        self, cfg: DictConfig, device: torch.device, guide: GuidanceStep, rasterizer: Rasterizer,
        generator: torch.Generator,
    ):
        self.cfg, self.device, self.guide, self.rasterizer, self.generator = cfg, device, guide, rasterizer, generator
        g = cfg.geometry
        with seeded(cfg.seed, "geometry"):
            self.geometry = DMTetGeometry(
                grid_resolution=g.grid_resolution, grid_scale=g.grid_scale, encoding=g.encoding,
                hash_log2_table_size=g.hash_log2_table_size, frequency_count=g.frequency_count,
                max_offset=g.max_offset, bound_radius=g.bound_radius,
            ).to(device)
        self.optimizer = self.make_optimizer(g.lr)
        self._edges: torch.Tensor | None = None
        self.carved = CarvedRays(g.carve_memory, device, g.carve_confirm)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "geometry_carved_rays": self.carved.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "geometry_carved_rays" in state:  # checkpoints from before the carving memory have none
            self.carved.load_state_dict(state["geometry_carved_rays"])
        else:
            self.carved = CarvedRays(self.carved.memory, self.device, self.carved.confirm)

    def make_optimizer(self, lr: float) -> torch.optim.AdamW:
        return _adamw([{"params": list(self.geometry.parameters())}, {"params": self.guide.camera_parameters}], lr)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.geometry.parameters()) + self.guide.camera_parameters

    def t_range_at(self, step: int) -> tuple[float, float]:
        """The t range after the latent phase: `t_range`, or `t_range_final` from step
        `t_final_from` on where one is set (the switch of `TimestepSchedule`)."""
        g = self.cfg.geometry
        return TimestepSchedule(*g.t_range, later=g.t_range_final, later_step=g.t_final_from).ratios(step)

    @functools.cached_property
    def initial_shape(self) -> EllipsoidSDF | MeshSDF:
        """The SDF the geometry starts from (`init.shape`), read once."""
        i = self.cfg.init
        if i.shape == "ellipsoid":
            return ellipsoid_sdf(list(i.radii), i.flat_base)
        return MeshSDF(normalize_mesh(load_mesh(i.shape)))

    @functools.cached_property
    def collapse_area(self) -> float:
        """Below this mesh area the stage has collapsed: `geometry.collapse_fraction` of the
        initial shape's area (from the config, so a resumed run draws the same line)."""
        return self.cfg.geometry.collapse_fraction * self.initial_shape.area

    def _too_small(self, mesh: Mesh) -> bool:
        return mesh.faces.shape[0] == 0 or float(mesh.area().detach()) < self.collapse_area

    def collapsed(self) -> bool:
        """The mesh has no faces or less area than `collapse_area`."""
        with torch.no_grad():
            return self._too_small(self._mesh_and_sdf()[0])

    def initialize(self) -> list[float]:
        """Fit the SDF to the initial shape (ellipsoid or the user's mesh); the stage optimizer
        starts fresh afterwards. Returns the fit's losses."""
        i = self.cfg.init
        target = self.initial_shape
        losses = fit_geometry_to_sdf(
            self.geometry, target, target.sample_surface, generator=self.generator, steps=i.steps, lr=i.lr
        )
        self.optimizer = self.make_optimizer(self.cfg.geometry.lr)
        return losses

    def _mesh_and_sdf(self) -> tuple[Mesh, torch.Tensor]:
        sdf, offset = self.geometry.sdf_and_offset()
        verts, faces = marching_tetrahedra(self.geometry.deformed_vertices(offset), self.geometry.tets, sdf)
        return Mesh(vertices=verts, faces=faces), sdf

    def step(self, step: int, cameras: Cameras, diagnose: bool, attention_png: Path | None) -> GuideOutput | None:
        """One geometry step: the guidance output with the regularizers added to its losses (and
        to "total"); None when the mesh has collapsed (no faces, or less area than
        `collapse_area`)."""
        cfg, g = self.cfg, self.cfg.geometry
        mesh, sdf = self._mesh_and_sdf()
        if self._too_small(mesh):
            return None
        out = render_geometry(
            mesh, cameras.to(self.device), g.render_resolution, backend=self.rasterizer,
            silhouette_weight=self.silhouette_weight(step),
        )
        normal, mask = out["normal"], out["mask"]
        early_latents = self.guide.guidance.is_latent and step < g.latent_phase_iters
        if early_latents:
            model_input = normal_mask_latents(normal, mask, self.guide.guidance.sample_size)
            t_range, weighting = g.t_range_early, g.weighting_early
        else:
            model_input = self.guide.guidance.encode_images((normal * 0.5 + 0.5) * mask)
            t_range, weighting = self.t_range_at(step), g.weighting
        ama_on = cfg.ama.enabled and step >= cfg.ama.start_geometry
        carving = g.carve_weight > 0 and not early_latents
        result = self.guide(
            "geometry", model_input, cameras, mask, tuple(t_range), weighting, g.guidance_scale, ama_on,
            diagnose or attention_png is not None, keep_uncond=carving,
        )
        losses = result.losses
        if carving:
            losses["carve"] = self.carve(step, result.denoised(g.carve_guidance_scale), mask, cameras)
            losses["total"] = losses["total"] + g.carve_weight * losses["carve"]
        if g.normal_consistency_weight > 0:
            losses["normal_consistency"] = normal_consistency(mesh)
            losses["total"] = losses["total"] + g.normal_consistency_weight * losses["normal_consistency"]
        if g.laplacian_weight > 0:
            losses["laplacian"] = laplacian_smoothness(mesh)
            losses["total"] = losses["total"] + g.laplacian_weight * losses["laplacian"]
        if g.sdf_weight > 0:
            if self._edges is None:
                self._edges = tet_edges(self.geometry.tets)
            losses["sdf"] = sdf_sign_regularizer(sdf, self._edges)
            losses["total"] = losses["total"] + g.sdf_weight * losses["sdf"]
        if attention_png is not None and result.maps:
            save_attention_visualization(attention_png, (normal * 0.5 + 0.5) * mask, mask, result.maps)
        return result

    def silhouette_weight(self, step: int) -> float:
        """`geometry.silhouette_weight_early` before step `geometry.silhouette_switch` (when set),
        `geometry.silhouette_weight` from there on."""
        g = self.cfg.geometry
        early = g.silhouette_weight_early is not None and step < g.silhouette_switch
        return g.silhouette_weight_early if early else g.silhouette_weight

    def carve(self, step: int, denoised: torch.Tensor, mask: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """The silhouette-carving loss (geometry/carving.py) of `step`: denoised (B, C, h, w) the
        guidance's prediction of the clean normal maps, mask (B, H, W, 1) the render's coverage.
        Carves along the rays found now, and those of the last `geometry.carve_memory` - 1 steps
        once `geometry.carve_confirm` steps have shown holes (`CarvedRays`)."""
        images = self.guide.guidance.decode_images(denoised)  # (B, S, S, 3)
        # Holes are judged at most at 64^2 (the toy model sees 32^2; SD's 512^2 decode is resized),
        # so "3x3 pixels" means the same share of the view for every model.
        size = min(images.shape[1], CARVE_RESOLUTION)

        def resized(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="area").permute(0, 2, 3, 1)

        carve = background_pixels(resized(images), resized(mask.detach()), self.cfg.geometry.carve_threshold)
        origins, directions = cameras.to(self.device).pixel_rays(size)
        remembered = self.carved.add(step, *carved_rays(origins, directions, carve))
        return ray_carve_loss(self.geometry.sdf_at, *remembered, self.geometry.grid_scale / 2)

    def validate(self, path: Path) -> None:
        with torch.no_grad():
            out = render_geometry(self.geometry(), orbit_cameras(4).to(self.device), 256, backend=self.rasterizer)
        write_png(path, grid_image((out["normal"] * 0.5 + 0.5) * out["mask"]))

    @torch.no_grad()
    def final_mesh(self) -> tuple[Mesh, dict]:
        """The stage's result: the extracted mesh without loose pieces smaller than
        `geometry.min_piece_fraction` of the largest and without cavities, and what was found and
        removed."""
        mesh = self.geometry().detach()
        dropped = []
        if self.cfg.geometry.min_piece_fraction > 0 and mesh.faces.shape[0]:
            mesh, dropped = remove_loose_pieces(mesh, self.cfg.geometry.min_piece_fraction)
        return mesh, topology_report(mesh, dropped) if mesh.faces.shape[0] else {"pieces": 0}


class AppearanceStage(_Stage):
    """The material network over the fixed mesh, its optimizer (with the camera MLP's group), the
    environment light, and one step of it."""

    name, state_key = "appearance", "material"

    def __init__(
        self, cfg: DictConfig, device: torch.device, guide: GuidanceStep, rasterizer: Rasterizer,
        mesh: Mesh, light: Callable[[], EnvironmentLight],
    ):
        self.cfg, self.device, self.guide, self.rasterizer, self.mesh, self.light = cfg, device, guide, rasterizer, mesh, light
        a = cfg.appearance
        with seeded(cfg.seed, "material"):
            self.material = MaterialNetwork.for_mesh(
                mesh, encoding=a.encoding, metallic=a.metallic, log2_table_size=a.hash_log2_table_size,
                occlusion_range=(0.0, 1.0) if a.occlusion else (0.0, 0.0), max_normal_tilt_deg=a.max_normal_tilt_deg,
                frequency_count=a.frequency_count, kd_range=tuple(a.kd_range),
            )
        self.material = self.material.to(device)
        self.optimizer = _adamw([{"params": list(self.material.parameters())}, {"params": guide.camera_parameters}], a.lr)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.material.parameters()) + self.guide.camera_parameters

    def step(self, step: int, cameras: Cameras, diagnose: bool, attention_png: Path | None) -> GuideOutput:
        cfg, a = self.cfg, self.cfg.appearance
        out = render_pbr(
            self.mesh, cameras.to(self.device), a.render_resolution, self.material, self.light(),
            background=tuple(a.background), backend=self.rasterizer,
        )
        rgb, mask = out["rgb"], out["mask"]
        model_input = self.guide.guidance.encode_images(rgb)
        t_range = a.t_range_early if step < a.t_switch else a.t_range
        ama_on = cfg.ama.enabled and step >= cfg.ama.start_appearance
        result = self.guide(
            "appearance", model_input, cameras, mask, tuple(t_range), a.weighting, a.guidance_scale, ama_on,
            diagnose or attention_png is not None,
        )
        if attention_png is not None and result.maps:
            save_attention_visualization(attention_png, rgb, mask, result.maps)
        return result

    def validate(self, path: Path) -> None:
        with torch.no_grad():
            out = render_pbr(
                self.mesh, orbit_cameras(4).to(self.device), 256, self.material, self.light(),
                background=tuple(self.cfg.appearance.background), backend=self.rasterizer,
            )
        write_png(path, grid_image(out["rgb"]))
