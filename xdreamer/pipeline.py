"""The X-Dreamer run: init -> geometry stage -> appearance stage -> export, with checkpoints.

Everything random comes from one CPU `torch.Generator` saved in every checkpoint, so a run
resumed after any interruption replays exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import xdreamer
from xdreamer.appearance.material import MaterialNetwork
from xdreamer.atomic import atomic_path, write_text
from xdreamer.config import ConfigError, load_config, to_yaml
from xdreamer.distributed import DataParallel, init_data_parallel
from xdreamer.export.bake import bake_textures, unwrap
from xdreamer.export.gltf import write_glb
from xdreamer.export.obj import write_obj
from xdreamer.export.video import write_video
from xdreamer.geometry.dmtet import DMTetGeometry
from xdreamer.geometry.init import MeshSDF, ellipsoid_sdf, fit_geometry_to_sdf, normalize_mesh
from xdreamer.guidance.ama import AttentionRecorder, ama_loss, save_attention_visualization
from xdreamer.guidance.cg_lora import CameraGuidedLoRA, install_attention_processors, make_cg_lora_optimizer
from xdreamer.guidance.loader import GuidanceModel, load_guidance_model
from xdreamer.guidance.prompts import TextConditioner
from xdreamer.guidance.sds import TimestepSchedule, normal_mask_latents, score_distillation
from xdreamer.mesh import Mesh, load_mesh, save_mesh
from xdreamer.render.camera import CameraSampling, Cameras, orbit_cameras, sample_cameras
from xdreamer.render.light import EnvironmentLight, default_environment, load_environment, read_hdr_image
from xdreamer.render.passes import render_geometry
from xdreamer.render.raster import Rasterizer
from xdreamer.render.shade import render_pbr, render_textured
from xdreamer.rundir import (
    RunError,
    RunPaths,
    StopSignal,
    check_output_dir,
    clear_dir,
    file_logger,
    load_checkpoint,
    open_run,
    save_checkpoint,
    write_report,
)

MAX_RESTORES = 5  # going back to the last checkpoint more often than this ends the run


class DeviceError(ValueError):
    """A device the machine does not have."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but this machine has no CUDA GPU (use --device cpu or auto)")
    return torch.device(name)


def camera_sampling(cfg: DictConfig) -> CameraSampling:
    c = cfg.camera
    return CameraSampling(tuple(c.radius), tuple(c.fov_deg), tuple(c.elevation_deg), tuple(c.azimuth_deg), c.jitter)


def _grid_image(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) in [0, 1] -> one (H, B*W, 3) uint8 strip."""
    strip = torch.cat(list(images.detach().float().cpu().clamp(0, 1)), dim=1)
    return (strip.numpy() * 255 + 0.5).astype(np.uint8)


def _write_png(path: Path, image: np.ndarray) -> None:
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image)


@dataclass
class RunState:
    """What the loop needs besides the modules: where it is and what it has seen."""

    stage: str = "init"
    step: int = 0
    nan_skips: int = 0
    consecutive_skips: int = 0
    restores: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)  # every 10th step
    latest_losses: dict[str, float] = field(default_factory=dict)


class Run:
    """One generation: the guidance, the geometry, the material, and their optimizers."""

    def __init__(
        self, cfg: DictConfig, paths: RunPaths, guidance: GuidanceModel, device: torch.device, dp: DataParallel
    ):
        self.cfg = cfg
        self.dp = dp
        self.paths = paths
        self.guidance = guidance
        self.device = device
        self.log = file_logger(paths, enabled=dp.is_main)
        self.state = RunState()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # Module initialization uses the global RNG: seed it so fresh runs are reproducible.
        torch.manual_seed(cfg.seed)

        self.geometry = DMTetGeometry(
            grid_resolution=cfg.geometry.grid_resolution,
            grid_scale=cfg.geometry.grid_scale,
            encoding=cfg.geometry.encoding,
            hash_log2_table_size=cfg.geometry.hash_log2_table_size,
        ).to(device)
        self.geometry_optimizer = torch.optim.AdamW(
            self.geometry.parameters(), lr=cfg.geometry.lr, betas=(0.9, 0.99), eps=1e-15
        )
        self.material: MaterialNetwork | None = None
        self.material_optimizer: torch.optim.Optimizer | None = None

        self.text = TextConditioner(guidance, negative_prompt=cfg.negative_prompt)
        # Every prompt the run can ask for (four directions and the negative) is embedded now, so
        # the text encoder's memory goes back before the first step.
        self.text.prepare(cfg.prompt)
        guidance.release_text_encoder()
        self.cg_lora: CameraGuidedLoRA | None = None
        self.cg_lora_optimizer = None
        if cfg.cg_lora.enabled:
            self.cg_lora = CameraGuidedLoRA(
                guidance.unet, text_feature_dim=self.text.feature_dim, rank=cfg.cg_lora.rank, targets=cfg.cg_lora.targets
            ).to(device)
            self.cg_lora_optimizer = make_cg_lora_optimizer(
                self.cg_lora.parameters(), kind=cfg.cg_lora.optimizer, lr=cfg.cg_lora.lr,
                max_grad_norm=cfg.cg_lora.grad_clip,
            )
        self.recorder = (
            AttentionRecorder(variant="paper" if cfg.ama.scores == "softmax" else "code", layers=cfg.ama.layers)
            if cfg.ama.enabled
            else None
        )
        # The recorder is wired in only while AMA is active, so earlier steps pay nothing for it.
        self._recording = False
        install_attention_processors(guidance.unet, self.cg_lora, None)
        self.light: EnvironmentLight | None = None
        # One rasterizer for the whole run: under CUDA it holds the nvdiffrast context.
        self.rasterizer = Rasterizer("auto")

    # ----- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict:
        s = self.state
        state = {
            "stage": s.stage,
            "step": s.step,
            "nan_skips": s.nan_skips,
            "consecutive_skips": s.consecutive_skips,
            "restores": s.restores,
            "timings": s.timings,
            "losses": s.losses,
            "latest_losses": s.latest_losses,
            "generator": self.generator.get_state(),
            "geometry": self.geometry.state_dict(),
            "geometry_optimizer": self.geometry_optimizer.state_dict(),
        }
        if self.material is not None:
            state["material"] = self.material.state_dict()
            state["material_optimizer"] = self.material_optimizer.state_dict()
        if self.cg_lora is not None:
            state["cg_lora"] = self.cg_lora.lora_state_dict()
            state["cg_lora_optimizer"] = self.cg_lora_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        s = self.state
        s.stage, s.step = state["stage"], state["step"]
        s.nan_skips, s.consecutive_skips = state["nan_skips"], state["consecutive_skips"]
        s.restores, s.timings, s.losses = state["restores"], state["timings"], state["losses"]
        s.latest_losses = state["latest_losses"]
        self.generator.set_state(state["generator"])
        self.geometry.load_state_dict(state["geometry"])
        self.geometry_optimizer.load_state_dict(state["geometry_optimizer"])
        if "material" in state:
            self._build_material()
            self.material.load_state_dict(state["material"])
            self.material_optimizer.load_state_dict(state["material_optimizer"])
        if self.cg_lora is not None and "cg_lora" in state:
            self.cg_lora.load_lora_state_dict(state["cg_lora"])
            self.cg_lora_optimizer.load_state_dict(state["cg_lora_optimizer"])

    def checkpoint(self) -> None:
        if self.dp.is_main:
            save_checkpoint(self.paths.checkpoint, self.state_dict())
            if self.cg_lora is not None:
                # The adapters on their own, for use outside xdreamer; resume reads last.pt.
                self.cg_lora.save(self.paths.checkpoints / "cg_lora.safetensors")
            self.report("running")

    def restore_last_good(self, reason: str) -> None:
        """A run gone bad (persistent non-finite values, a collapsed mesh): go back to the last
        checkpoint, halve the stage's learning rate for each restore in this stage (so the replay
        does not walk into the same failure) and note it. The random stream is not rewound."""
        stage = self.state.stage
        in_stage = 1 + sum(r["stage"] == stage for r in self.state.restores)
        base_lr = self.cfg.appearance.lr if stage == "appearance" else self.cfg.geometry.lr
        record = {"stage": stage, "step": self.state.step, "reason": reason, "lr": base_lr * 0.5**in_stage}
        restores = self.state.restores + [record]
        if len(restores) > MAX_RESTORES:
            self.report("failed")
            raise RunError(
                f"the run went bad {len(restores)} times (last: {reason} at {record['stage']} step {record['step']}); "
                f"lower the stage's learning rate and continue with xdreamer resume {self.paths.root}"
            )
        state = load_checkpoint(self.paths.checkpoint)
        if state is None:
            raise RunError(f"{reason} at step {self.state.step} and no checkpoint to go back to")
        generator_state, nan_skips = self.generator.get_state(), self.state.nan_skips
        self.load_state_dict(state)
        self.generator.set_state(generator_state)
        self.state.restores, self.state.nan_skips, self.state.consecutive_skips = restores, nan_skips, 0
        optimizer = self.material_optimizer if stage == "appearance" else self.geometry_optimizer
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = record["lr"]
        self.log.info("restored last good checkpoint: %s", record)

    def report(self, status: str) -> None:
        import diffusers

        if not self.dp.is_main:
            return
        s = self.state
        write_report(
            self.paths,
            {
                "prompt": self.cfg.prompt,
                "model": self.cfg.model,
                "seed": self.cfg.seed,
                "device": str(self.device),
                "status": status,
                "stage": s.stage,
                "step": s.step,
                "versions": {
                    "xdreamer": xdreamer.__version__,
                    "torch": torch.__version__,
                    "diffusers": diffusers.__version__,
                    "python": platform.python_version(),
                },
                "timings_s": s.timings,
                "final_losses": s.latest_losses,
                "losses": s.losses,
                "skipped_nan_steps": s.nan_skips,
                "restored_checkpoints": s.restores,
                "outputs": {
                    "glb": str(self.paths.export / "model.glb"),
                    "obj": str(self.paths.export / "model.obj"),
                    "turntable": str(self.paths.turntable),
                },
            },
        )

    # ----- shared step machinery -----------------------------------------------------------

    def _guide(
        self,
        model_input: torch.Tensor,
        cameras: Cameras,
        mask: torch.Tensor,
        t_range: tuple[float, float],
        weighting: str,
        guidance_scale: float,
        ama_on: bool,
    ) -> dict[str, torch.Tensor]:
        """SDS (+ AMA) on one batch. model_input: (B, C, h, w) latents or pixels; mask (B, H, W, 1)."""
        cfg = self.cfg
        batch = model_input.shape[0]
        labels = cameras.view_labels(cfg.camera.overhead_elevation)
        text = self.text(cfg.prompt, labels)
        if self.cg_lora is not None:
            camera_features = cameras.features().to(self.device)
            # CG-LoRA's adapters are float32 even when the UNet runs in half precision.
            self.cg_lora.set_condition(
                torch.cat([text.uncond_features, text.cond_features]).float(),
                torch.cat([camera_features, camera_features]).float(),
            )
        if ama_on != self._recording:
            install_attention_processors(self.guidance.unet, self.cg_lora, self.recorder if ama_on else None)
            self._recording = ama_on
        if ama_on:
            self.recorder.set_token_index(text.eot_indices if cfg.ama.token < 0 else [cfg.ama.token] * batch)
        world = self.dp.world
        t = self.dp.own(TimestepSchedule(*t_range).sample(batch * world, self.generator, self.guidance.num_train_timesteps), batch)
        noise = self.dp.own(torch.randn((batch * world, *model_input.shape[1:]), generator=self.generator), batch)
        noise = noise.to(self.device)
        sds = score_distillation(
            self.guidance,
            model_input,
            text.cond,
            text.uncond,
            t.to(self.device),
            noise,
            guidance_scale=guidance_scale,
            weighting=weighting,
            unet_grad=ama_on,
        )
        losses = {"sds": sds.loss, "skipped": torch.tensor(float(sds.skipped))}
        total = sds.loss
        if ama_on:
            self.last_maps = self.recorder.take()
            losses["ama"] = ama_loss(self.last_maps, mask, norm=cfg.ama.norm)
            total = total + cfg.ama.weight * losses["ama"]
        losses["total"] = total
        return losses

    def _apply(self, losses: dict, optimizers: list[torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> bool:
        """Backward and step, or skip a non-finite step. Returns whether the step was applied."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if self.cg_lora_optimizer is not None:
            self.cg_lora_optimizer.zero_grad(set_to_none=True)
        total = losses["total"]
        skipped = bool(losses["skipped"]) or not torch.isfinite(total)
        if not skipped:
            total.backward()
            trained = params + (list(self.cg_lora.parameters()) if self.cg_lora is not None else [])
            self.dp.average_gradients(trained)
            skipped = any(not torch.isfinite(p.grad).all() for p in trained if p.grad is not None)
        if self.dp.any(skipped):
            self.state.nan_skips += 1
            self.state.consecutive_skips += 1
            self.log.info("step %d: non-finite loss or gradient, skipped", self.state.step)
            if self.state.consecutive_skips > self.cfg.max_nan_skips:
                self.restore_last_good("non-finite losses persisted")
            return False
        self.state.consecutive_skips = 0
        for opt in optimizers:
            opt.step()
        if self.cg_lora_optimizer is not None:
            self.cg_lora_optimizer.step()  # clips the gradient norm first
        if any(not torch.isfinite(p).all() for p in params):
            self.restore_last_good("non-finite parameters")
            return False
        return True

    def _record(self, losses: dict, every: int = 10) -> dict[str, float]:
        values = {k: float(v.detach()) for k, v in losses.items() if k not in ("skipped", "total")}
        for key, value in values.items():
            self.state.latest_losses[f"{self.state.stage}/{key}"] = value
        if self.state.step % every == 0:
            for key, value in values.items():
                self.state.losses.setdefault(f"{self.state.stage}/{key}", []).append(value)
            self.log.info("%s step %d %s", self.state.stage, self.state.step, values)
        return values

    # ----- stages ---------------------------------------------------------------------------

    def initialize_geometry(self) -> None:
        cfg = self.cfg.init
        start = time.perf_counter()
        if cfg.shape == "ellipsoid":
            target = ellipsoid_sdf(list(cfg.radii))
        else:
            target = MeshSDF(normalize_mesh(load_mesh(cfg.shape)))
        losses = fit_geometry_to_sdf(
            self.geometry, target, target.sample_surface, generator=self.generator, steps=cfg.steps, lr=cfg.lr
        )
        # The stage optimizer starts fresh after the init fit.
        self.geometry_optimizer = torch.optim.AdamW(
            self.geometry.parameters(), lr=self.cfg.geometry.lr, betas=(0.9, 0.99), eps=1e-15
        )
        self.state.losses["init/sdf_mse"] = losses[:: max(1, len(losses) // 50)] + losses[-1:]
        self.state.latest_losses["init/sdf_mse"] = losses[-1]
        self.state.timings["init"] = time.perf_counter() - start
        self.validate_geometry("init")

    def sample_views(self) -> Cameras:
        """This step's cameras: the world batch is azimuth-stratified, each rank keeps its sector."""
        cameras = sample_cameras(self.cfg.views * self.dp.world, self.generator, camera_sampling(self.cfg))
        return self.dp.own(cameras, self.cfg.views)

    def geometry_step(self) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.geometry
        step = self.state.step
        cameras = self.sample_views()
        mesh = self.geometry()
        if mesh.faces.shape[0] == 0:
            self.restore_last_good("the mesh collapsed to nothing")
            return {}
        out = render_geometry(mesh, cameras.to(self.device), g.render_resolution, backend=self.rasterizer)
        normal, mask = out["normal"], out["mask"]
        early = self.guidance.is_latent and step < g.latent_phase_iters
        if early:
            model_input = normal_mask_latents(normal, mask, self.guidance.sample_size)
            t_range, weighting = g.t_range_early, g.weighting_early
        else:
            model_input = self.guidance.encode_images((normal * 0.5 + 0.5) * mask)
            t_range, weighting = g.t_range, g.weighting
        ama_on = self.recorder is not None and step >= cfg.ama.start_geometry
        losses = self._guide(model_input, cameras, mask, tuple(t_range), weighting, g.guidance_scale, ama_on)
        if ama_on and self.dp.is_main and cfg.ama.visualize_every and step % cfg.ama.visualize_every == 0:
            save_attention_visualization(
                self.paths.attention / f"geometry_{step:05d}.png", (normal * 0.5 + 0.5) * mask, mask, self.last_maps
            )
        self._apply(losses, [self.geometry_optimizer], list(self.geometry.parameters()))
        return self._record(losses)

    def _build_material(self) -> None:
        a = self.cfg.appearance
        self.material = MaterialNetwork.for_mesh(
            self.fixed_mesh(), encoding=a.encoding, metallic=a.metallic, log2_table_size=a.hash_log2_table_size,
            occlusion_range=(0.0, 1.0) if a.occlusion else (0.0, 0.0),
        )
        self.material_optimizer = torch.optim.AdamW(
            self.material.parameters(), lr=self.cfg.appearance.lr, betas=(0.9, 0.99), eps=1e-15
        )

    def fixed_mesh(self) -> Mesh:
        """The geometry stage's final mesh (the appearance stage keeps it fixed)."""
        if getattr(self, "_fixed_mesh", None) is None:
            with torch.no_grad():
                self._fixed_mesh = self.geometry().detach()
            if self._fixed_mesh.faces.shape[0] == 0:
                raise RunError(
                    "the geometry stage ended with an empty mesh; lower geometry.lr or geometry.guidance_scale "
                    "and generate again"
                )
        return self._fixed_mesh

    def environment(self) -> EnvironmentLight:
        if self.light is None:
            a = self.cfg.appearance
            if a.environment:
                light = load_environment(a.environment, scale=a.environment_scale)
            else:
                light = default_environment(scale=a.environment_scale)
            self.light = light.to(self.device)
        return self.light

    def appearance_step(self) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.appearance
        step = self.state.step
        cameras = self.sample_views()
        out = render_pbr(
            self.fixed_mesh(), cameras.to(self.device), a.render_resolution, self.material, self.environment(),
            background=tuple(a.background), backend=self.rasterizer,
        )
        rgb, mask = out["rgb"], out["mask"]
        model_input = self.guidance.encode_images(rgb)
        t_range = a.t_range_early if step < a.t_switch else a.t_range
        ama_on = self.recorder is not None and step >= cfg.ama.start_appearance
        losses = self._guide(model_input, cameras, mask, tuple(t_range), a.weighting, a.guidance_scale, ama_on)
        if ama_on and self.dp.is_main and cfg.ama.visualize_every and step % cfg.ama.visualize_every == 0:
            save_attention_visualization(self.paths.attention / f"appearance_{step:05d}.png", rgb, mask, self.last_maps)
        self._apply(losses, [self.material_optimizer], list(self.material.parameters()))
        return self._record(losses)

    def validate_geometry(self, tag: str) -> None:
        if not self.dp.is_main:
            return
        with torch.no_grad():
            out = render_geometry(self.geometry(), orbit_cameras(4).to(self.device), 256, backend=self.rasterizer)
        _write_png(self.paths.geometry / f"validation_{tag}.png", _grid_image((out["normal"] * 0.5 + 0.5) * out["mask"]))

    def validate_appearance(self, tag: str) -> None:
        if not self.dp.is_main:
            return
        with torch.no_grad():
            out = render_pbr(
                self.fixed_mesh(), orbit_cameras(4).to(self.device), 256, self.material, self.environment(),
                background=tuple(self.cfg.appearance.background), backend=self.rasterizer,
            )
        _write_png(self.paths.appearance / f"validation_{tag}.png", _grid_image(out["rgb"]))

    def export(self, formats: list[str], texture_size: int) -> dict[str, str]:
        """UV-unwrap, bake, write GLB/OBJ and the turntable video."""
        start = time.perf_counter()
        mesh = unwrap(self.fixed_mesh(), texture_size=texture_size)
        with torch.no_grad():
            textures = bake_textures(mesh, self.material, size=texture_size, backend=self.rasterizer)
        written = {}
        if "glb" in formats:
            write_glb(self.paths.export / "model.glb", mesh, textures)
            written["glb"] = str(self.paths.export / "model.glb")
        if "obj" in formats:
            write_obj(self.paths.export / "model.obj", mesh, textures)
            written["obj"] = str(self.paths.export / "model.obj")
        save_mesh(self.fixed_mesh(), self.paths.geometry / "mesh.ply")
        e = self.cfg.export
        cameras = orbit_cameras(e.turntable_frames, elevation=15.0)
        frames = []
        with torch.no_grad():
            for i in range(0, len(cameras), 8):
                out = render_textured(
                    mesh, cameras[i : i + 8].to(self.device), e.turntable_resolution, textures, self.environment(),
                    background=tuple(self.cfg.appearance.background), backend=self.rasterizer,
                )
                frames.extend((out["rgb"].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
        write_video(frames, self.paths.turntable, fps=e.fps)
        written["turntable"] = str(self.paths.turntable)
        self.state.timings["export"] = time.perf_counter() - start
        return written

    # ----- the loop -------------------------------------------------------------------------

    def _stage_loop(self, stage: str, iters: int, step_fn, validate_fn, stop: StopSignal) -> bool:
        """Run `stage` from the current step; False when a signal stopped it (checkpoint written)."""
        cfg = self.cfg
        start = time.perf_counter() - self.state.timings.get(stage, 0.0)
        bar = tqdm(
            total=iters, initial=self.state.step, desc=stage, unit="it", dynamic_ncols=True, file=sys.stderr,
            disable=not self.dp.is_main,
        )
        try:
            while self.state.step < iters:
                restores = len(self.state.restores)
                values = step_fn()
                if len(self.state.restores) != restores:
                    continue  # went back to the last checkpoint: its step is done again
                self.state.step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
                self.state.timings[stage] = time.perf_counter() - start
                if cfg.validate_every and self.state.step % cfg.validate_every == 0:
                    validate_fn(f"{self.state.step:05d}")
                stopping = self.dp.any(stop.received is not None)
                if self.state.step % cfg.checkpoint_every == 0 or stopping:
                    self.checkpoint()
                if stopping:
                    return False
        finally:
            bar.close()
        return True

    def run(self, stop: StopSignal) -> int:
        cfg, s = self.cfg, self.state
        if s.stage == "init":
            self.initialize_geometry()
            s.stage, s.step = "geometry", 0
            self.checkpoint()
        if s.stage == "geometry":
            if not self._stage_loop("geometry", cfg.geometry.iters, self.geometry_step, self.validate_geometry, stop):
                return self._stopped(stop)
            self.validate_geometry("final")
            s.stage, s.step = "appearance", 0
            self._build_material()
            self.checkpoint()
        if s.stage == "appearance":
            if self.material is None:
                self._build_material()
            if not self._stage_loop("appearance", cfg.appearance.iters, self.appearance_step, self.validate_appearance, stop):
                return self._stopped(stop)
            self.validate_appearance("final")
            s.stage, s.step = "export", 0
            self.checkpoint()
        if s.stage == "export":
            if not self.dp.is_main:
                return 0
            written = self.export(list(cfg.export.formats), cfg.export.texture_size)
            s.stage = "done"
            self.checkpoint()
            self.report("done")
            summary = ", ".join(f"{k}: {v}" for k, v in written.items())
            print(f"xdreamer: done in {sum(s.timings.values()):.0f} s — {summary}")
        return 0

    def _stopped(self, stop: StopSignal) -> int:
        self.report("stopped")
        if self.dp.is_main:
            print(f"xdreamer: stopped at {self.state.stage} step {self.state.step}; continue with: xdreamer resume {self.paths.root}")
        return stop.exit_code


# ----- entry points (the CLI calls these) -------------------------------------------------------


def _load_guidance(cfg: DictConfig, device: torch.device) -> GuidanceModel:
    dtype = torch.float16 if device.type == "cuda" and cfg.half_precision else torch.float32
    return load_guidance_model(cfg.model, device, dtype=dtype)


def _check_inputs(cfg: DictConfig) -> None:
    """Input files are read now, not when their stage comes hours later."""
    if cfg.appearance.environment:
        read_hdr_image(cfg.appearance.environment)  # raises EnvironmentMapError (one line)
        cfg.appearance.environment = str(Path(cfg.appearance.environment).resolve())
    if cfg.init.shape != "ellipsoid":
        mesh = load_mesh(cfg.init.shape)  # raises MeshError (one line) when missing/unreadable/empty
        if float(mesh.vertices.norm(dim=-1).max()) == 0.0:
            raise ConfigError(f"init mesh {cfg.init.shape} is degenerate (all vertices at one point)")
        cfg.init.shape = str(Path(cfg.init.shape).resolve())


def generate(cfg: DictConfig, out_dir: Path, overwrite: bool = False) -> int:
    """Validate everything a user can get wrong before writing anything, then run."""
    dp, device_name = init_data_parallel(cfg.device)
    device = resolve_device(device_name)
    _check_inputs(cfg)
    check_output_dir(out_dir, overwrite)
    guidance = _load_guidance(cfg, device)
    dp.barrier()  # every rank has checked the folder before rank 0 clears it
    paths = RunPaths(out_dir)
    if dp.is_main:
        if out_dir.is_dir() and overwrite:
            clear_dir(out_dir)
        paths.make()
        write_text(paths.config, to_yaml(cfg))
    dp.barrier()
    run = Run(cfg, paths, guidance, device, dp)
    with StopSignal() as stop:
        return run.run(stop)


def generate_from_cli(args) -> int:
    init = args.init
    cfg = load_config(
        preset=args.preset,
        config_file=args.config,
        overrides=list(args.overrides),
        prompt=args.prompt,
        model=args.model,
        seed=args.seed,
        device=args.device,
        views=args.views,
        init=None if init is None else {"shape": init},
        appearance=None if args.environment is None else {"environment": args.environment},
    )
    out = Path(args.out) if args.out else Path("runs") / _slug(cfg.prompt)
    return generate(cfg, out, overwrite=args.overwrite)


def _slug(prompt: str) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in prompt.strip().lower())
    return "_".join(filter(None, slug.split("_")))[:60] or "run"


def _open_existing(run_dir: Path) -> tuple[Run, dict | None]:
    paths = open_run(run_dir)
    try:
        cfg = load_config(config_file=paths.config)
    except ConfigError as exc:
        raise RunError(f"{run_dir} has an unusable config.yaml: {exc}") from None
    dp, device_name = init_data_parallel(cfg.device)
    device = resolve_device(device_name)
    guidance = _load_guidance(cfg, device)
    run = Run(cfg, paths, guidance, device, dp)
    state = load_checkpoint(paths.checkpoint)
    if state is not None:
        run.load_state_dict(state)
    return run, state


def resume(run_dir: Path) -> int:
    run, state = _open_existing(run_dir)
    where = "the start" if state is None else f"{run.state.stage} step {run.state.step}"
    print(f"xdreamer: resuming {run_dir} from {where}")
    with StopSignal() as stop:
        return run.run(stop)


def export_run(run_dir: Path, formats: list[str], texture_size: int | None) -> int:
    for fmt in formats:
        if fmt not in ("glb", "obj"):
            raise ConfigError(f"export format '{fmt}' is not one of: glb, obj")
    run, state = _open_existing(run_dir)
    if state is None or run.state.stage not in ("export", "done"):
        raise RunError(f"{run_dir} has not finished its appearance stage yet; run xdreamer resume {run_dir} first")
    written = run.export(formats, texture_size or run.cfg.export.texture_size)
    print("xdreamer: exported " + ", ".join(f"{k}: {v}" for k, v in written.items()))
    return 0


def render_command(args) -> int:
    from xdreamer.export.views import render_mesh_views

    source = Path(args.mesh)
    if source.is_dir():
        paths = open_run(source)
        candidates = [paths.export / "model.glb", paths.export / "model.obj", paths.geometry / "mesh.ply"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise RunError(f"run {source} has no exported mesh yet; finish it with xdreamer resume {source}")
        source = found[0]
    mesh = load_mesh(source)
    out = Path(args.out)
    render_mesh_views(
        mesh, out, views=args.views, resolution=args.resolution, elevation=args.elevation,
        radius=args.radius, fov=args.fov, backend=args.backend,
    )
    print(f"xdreamer: rendered {args.views} views of {source} into {out}")
    return 0


def toy_benchmark(args) -> int:
    """`xdreamer toy eval`: generate every prompt under every ablation and score it."""
    from xdreamer.toy import eval as toy_eval

    prompts = toy_eval.read_prompts(Path(args.prompts) if args.prompts else None)
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    user_overrides = list(args.overrides)
    load_config(preset="toy", prompt=prompts[0], overrides=user_overrides)  # bad overrides fail before any run

    def generate_one(prompt: str, run_dir: Path, overrides: list[str]) -> int:
        cfg = load_config(preset="toy", prompt=prompt, overrides=user_overrides + overrides)
        try:
            return generate(cfg, run_dir, overwrite=True)
        except RunError as exc:
            if toy_eval.run_status(run_dir) != "failed":
                raise
            print(f"xdreamer: {prompt!r} failed and counts as a miss: {exc}", file=sys.stderr)
            return 1

    out = Path(args.out)
    scores = toy_eval.run_benchmark(prompts, out, ablations, generate_one)
    print(toy_eval.markdown_table(scores))
    print(f"xdreamer: benchmark written to {out / 'eval.json'} and {out / 'eval.md'}")
    return 0
