"""The X-Dreamer run: init -> geometry stage -> appearance stage -> export, with checkpoints.

Everything random comes from generators saved in every checkpoint (the run's draws, the CG-LoRA
dropout), so a run resumed after any interruption replays exactly the steps the uninterrupted run
takes. A run that goes bad (a collapsed mesh, non-finite values that persist) goes back to the
last regular checkpoint, random streams included, at half the stage's learning rate.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import xdreamer
from xdreamer.distributed import DataParallel
from xdreamer.export.simplify import describe_export
from xdreamer.geometry.cleanup import describe_topology
from xdreamer.guidance.loader import GuidanceModel
from xdreamer.guidance.loss_scale import DynamicLossScaler
from xdreamer.mesh import Mesh
from xdreamer.pipeline.assets import FORMATS, export_asset
from xdreamer.pipeline.guide import GuidanceStep
from xdreamer.pipeline.stages import AppearanceStage, GeometryStage
from xdreamer.pipeline.state import RunState, part_seed
from xdreamer.render.camera import CameraSampling, Cameras, sample_cameras
from xdreamer.render.light import EnvironmentLight, default_environment, load_environment
from xdreamer.render.raster import Rasterizer
from xdreamer.rundir import (
    RunError,
    RunPaths,
    StopSignal,
    file_logger,
    read_checkpoint,
    write_checkpoint,
    write_progress,
    write_report,
)
from xdreamer.step import backward_step

MAX_RESTORES = 5  # going back to the last checkpoint more often than this ends the run
PROGRESS_INTERVAL_S = 0.5
# Config keys whose change since a checkpoint makes it unloadable (the modules change shape).
STRUCTURAL_KEYS = (
    "model", "geometry.grid_resolution", "geometry.grid_scale", "geometry.encoding", "geometry.hash_log2_table_size",
    "geometry.frequency_count", "appearance.encoding", "appearance.hash_log2_table_size",
    "appearance.frequency_count", "cg_lora.enabled",
    "cg_lora.rank", "cg_lora.targets", "cg_lora.projections",
)


def camera_sampling(cfg: DictConfig) -> CameraSampling:
    c = cfg.camera
    return CameraSampling(
        radius=tuple(c.radius), fov_deg=tuple(c.fov_deg), elevation_deg=tuple(c.elevation_deg),
        azimuth_deg=tuple(c.azimuth_deg), jitter=c.jitter,
        overhead_fraction=c.overhead_fraction, overhead_elevation_deg=tuple(c.overhead_elevation_deg),
    )


class Run:
    """One generation: the guidance, the two stages, their optimizers, and the loop over them."""

    def __init__(
        self, cfg: DictConfig, paths: RunPaths, guidance: GuidanceModel, device: torch.device, dp: DataParallel
    ):
        self.cfg = cfg
        self.dp = dp
        self.paths = paths
        self.device = device
        self.log = file_logger(paths, enabled=dp.is_main)
        self.state = RunState()
        self.generator = torch.Generator().manual_seed(part_seed(cfg.seed, "run"))
        self.rasterizer = Rasterizer(cfg.render.backend)
        self.scaler = DynamicLossScaler(enabled=guidance.dtype == torch.float16 and cfg.guidance.loss_scaling)
        self.guide = GuidanceStep(cfg, guidance, device, dp, self.generator)
        self.geometry = GeometryStage(cfg, device, self.guide, self.rasterizer, self.generator)
        self.appearance: AppearanceStage | None = None
        self._mesh: Mesh | None = None
        self._light: EnvironmentLight | None = None
        self._last_progress = 0.0
        self._bar: tqdm | None = None
        self._latest_image: str | None = None

    # ----- state and checkpoints ---------------------------------------------------------

    def state_dict(self) -> dict:
        state = {
            "state": self.state.to_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "generator": self.generator.get_state(),
            "loss_scaler": self.scaler.state_dict(),
            "guide": self.guide.state_dict(),
            # A CPU run's numbers depend on its thread count: a resume takes the same one.
            "cpu_threads": torch.get_num_threads(),
            **self.geometry.state_dict(),
        }
        if self.appearance is not None:
            state.update(self.appearance.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.state = RunState.from_dict(state["state"])
        self.generator.set_state(state["generator"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.guide.load_state_dict(state["guide"])
        self.geometry.load_state_dict(state)
        self._mesh = None
        self.appearance = None
        if "material" in state:
            self._build_appearance()
            self.appearance.load_state_dict(state)

    def check_compatible(self, state: dict) -> None:
        """One line naming what changed when config.yaml no longer fits the checkpoint."""
        saved = OmegaConf.create(state.get("config", {}))
        changed = [
            f"{key} ({OmegaConf.select(saved, key)!r} -> {OmegaConf.select(self.cfg, key)!r})"
            for key in STRUCTURAL_KEYS
            if OmegaConf.select(saved, key) != OmegaConf.select(self.cfg, key)
        ]
        if changed:
            raise RunError(
                f"config.yaml of {self.paths.root} changed {', '.join(changed)} since the run started, so its "
                "checkpoint no longer fits; undo that edit, or start a new run with xdreamer generate"
            )

    def apply_edited_learning_rates(self, state: dict) -> None:
        """A learning rate edited in config.yaml (say, after the run went bad) takes effect on
        resume, replacing the one the optimizer saved."""
        saved = OmegaConf.create(state.get("config", {}))
        stage = self.state.stage
        key = {"geometry": "geometry.lr", "appearance": "appearance.lr"}.get(stage)
        if key is None or OmegaConf.select(saved, key) == OmegaConf.select(self.cfg, key):
            return
        lr = float(OmegaConf.select(self.cfg, key))
        self._stage(stage).set_lr(lr)
        self.log.info("resume: %s=%g from config.yaml (was %g)", key, lr, OmegaConf.select(saved, key))
        print(f"xdreamer: using {key}={lr:g} from config.yaml (the checkpoint had {OmegaConf.select(saved, key):g})")

    def checkpoint(self, kind: str = "good") -> None:
        """Write a regular ("good": the previous one is kept, a stop checkpoint becomes stale) or a
        stop checkpoint (written when a signal stops the run between regular ones; never restored to)."""
        if not self.dp.is_main:
            return
        paths = self.paths
        state = self.state_dict()
        if kind == "good":
            # Written in full before the rotation: a failed write (a full disk) leaves both the
            # good and the previous checkpoint as they were.
            write_checkpoint(paths.next_checkpoint, state)
            if paths.good_checkpoint.is_file():
                os.replace(paths.good_checkpoint, paths.previous_checkpoint)
            os.replace(paths.next_checkpoint, paths.good_checkpoint)
            paths.stop_checkpoint.unlink(missing_ok=True)
        else:
            write_checkpoint(paths.stop_checkpoint, state)
        self.guide.save_adapters(paths.checkpoints / "cg_lora.safetensors")
        self.report("running")

    def read_good_checkpoint(self) -> dict | None:
        """The last regular checkpoint, or the one before it when it is damaged."""
        # `next` is the newest when a kill came between the two renames of a rotation.
        for path in (self.paths.good_checkpoint, self.paths.next_checkpoint, self.paths.previous_checkpoint):
            if not path.is_file():
                continue
            try:
                return read_checkpoint(path)
            except RunError as exc:
                self.log.info("%s", exc)
                print(f"xdreamer: {exc}; trying the previous checkpoint", file=sys.stderr)
        return None

    def latest_checkpoint(self) -> dict | None:
        """Where a resume continues: the stop checkpoint if a signal wrote one after the last
        regular checkpoint, else the last good one."""
        if self.paths.stop_checkpoint.is_file():
            try:
                return read_checkpoint(self.paths.stop_checkpoint)
            except RunError as exc:
                print(f"xdreamer: {exc}; using the last regular checkpoint", file=sys.stderr)
        return self.read_good_checkpoint()

    def restore_last_good(self, reason: str) -> None:
        """Go back to the last regular checkpoint (the random streams too, so an interrupted and
        resumed run replays the same restores) and halve the stage's learning rate for each
        restore in this stage, so the replay does not walk into the same failure."""
        stage, failed_at = self.state.stage, self.state.step
        in_stage = 1 + sum(r["stage"] == stage for r in self.state.restores)
        base_lr = self.cfg.appearance.lr if stage == "appearance" else self.cfg.geometry.lr
        record = {"stage": stage, "step": failed_at, "reason": reason, "lr": base_lr * 0.5**in_stage}
        restores = self.state.restores + [record]
        if len(restores) > MAX_RESTORES:
            self.report("failed", error=f"went bad {len(restores)} times (last: {reason})")
            raise RunError(
                f"the run went bad {len(restores)} times (last: {reason} at {stage} step {failed_at}); "
                f"lower {stage}.lr in {self.paths.config} and continue with xdreamer resume {self.paths.root}"
            )
        state = self.read_good_checkpoint()
        if state is None:
            raise RunError(f"{reason} at {stage} step {failed_at} and no checkpoint to go back to")
        nan_skips, overflow_skips = self.state.nan_skips, self.state.overflow_skips
        self.load_state_dict(state)
        record["returned_to"] = self.state.step
        record["redone"] = failed_at - self.state.step
        self.state.restores, self.state.nan_skips, self.state.overflow_skips = restores, nan_skips, overflow_skips
        self.state.consecutive_skips = 0
        self._stage(stage).set_lr(record["lr"])
        if self.dp.is_main:
            self.paths.stop_checkpoint.unlink(missing_ok=True)
        self.log.info("restored last good checkpoint: %s", record)
        if self.dp.is_main:
            tqdm.write(
                f"xdreamer: {reason} at {stage} step {failed_at}: back to step {record['returned_to']} "
                f"({record['redone']} steps to redo) at lr {record['lr']:g}",
                file=sys.stderr,
            )

    # ----- report and progress ---------------------------------------------------------

    def outputs(self) -> dict[str, str]:
        paths = self.paths
        candidates = {"glb": paths.export / "model.glb", "obj": paths.export / "model.obj", "turntable": paths.turntable}
        return {kind: str(path) for kind, path in candidates.items() if path.is_file()}

    def report(self, status: str, error: str | None = None) -> None:
        import diffusers

        if not self.dp.is_main:
            return
        s = self.state
        report = {
            "prompt": self.cfg.prompt,
            "model": self.cfg.model,
            "seed": self.cfg.seed,
            "device": str(self.device),
            # CPU results depend on it at rounding level (a run is one draw of many; the same
            # seed on another thread count is another draw): what it takes to reproduce a run.
            "cpu_threads": torch.get_num_threads(),
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
            "attention_alignment": s.alignment,
            "mesh": s.mesh,
            "export": s.export,
            "skipped_nan_steps": s.nan_skips,
            "skipped_overflow_steps": s.overflow_skips,
            "loss_scale": self.scaler.scale_value,
            "restored_checkpoints": s.restores,
            "outputs": self.outputs(),
        }
        if error is not None:
            report["error"] = error
        write_report(self.paths, report)
        self.progress(status, force=True)

    def progress(self, status: str = "running", force: bool = False) -> None:
        """progress.json for front ends (the web app): about twice a second while a run works."""
        now = time.time()
        if not self.dp.is_main or (not force and now - self._last_progress < PROGRESS_INTERVAL_S):
            return
        self._last_progress = now
        s, cfg = self.state, self.cfg
        total = {"geometry": cfg.geometry.iters, "appearance": cfg.appearance.iters}.get(s.stage, 0)
        eta = None
        rate = self._bar.format_dict.get("rate") if self._bar is not None else None
        if rate:
            remaining = total - s.step + (cfg.appearance.iters if s.stage == "geometry" else 0)
            eta = remaining / rate
        write_progress(
            self.paths,
            {
                "status": status,
                "stage": s.stage,
                "step": s.step,
                "total": total,
                "losses": {k.split("/", 1)[1]: v for k, v in s.latest_losses.items() if k.startswith(f"{s.stage}/")},
                "elapsed_s": sum(s.timings.values()),
                "eta_s": eta,
                "image": self._latest_image,
                "pid": os.getpid(),
                "updated": now,
            },
        )

    # ----- stages ------------------------------------------------------------------------

    def _stage(self, name: str):
        return self.appearance if name == "appearance" else self.geometry

    def light(self) -> EnvironmentLight:
        if self._light is None:
            a = self.cfg.appearance
            light = load_environment(a.environment, scale=a.environment_scale) if a.environment else default_environment(scale=a.environment_scale)
            self._light = light.to(self.device)
        return self._light

    def mesh(self) -> Mesh:
        """The geometry stage's final mesh, loose pieces removed (the appearance stage keeps it fixed)."""
        if self._mesh is None:
            mesh, topology = self.geometry.final_mesh()
            if mesh.faces.shape[0] == 0:
                raise RunError(
                    "the geometry stage ended with an empty mesh; lower geometry.lr or geometry.guidance_scale "
                    "and generate again"
                )
            self._mesh = mesh
            self.state.mesh = topology
        return self._mesh

    def _build_appearance(self) -> None:
        self.appearance = AppearanceStage(self.cfg, self.device, self.guide, self.rasterizer, self.mesh(), self.light)

    def sample_views(self) -> Cameras:
        """This step's cameras: the world batch is azimuth-stratified, each rank keeps its sector."""
        cameras = sample_cameras(self.cfg.views * self.dp.world, self.generator, camera_sampling(self.cfg))
        return self.dp.own(cameras, self.cfg.views)

    def _image(self, folder: Path, name: str) -> Path:
        path = folder / name
        self._latest_image = str(path.relative_to(self.paths.root))
        return path

    def _one_step(self, stage) -> str:
        """One optimization step of `stage`: "applied", "skipped" (non-finite, or a loss-scale
        overflow) or "restored" (went back to the last good checkpoint)."""
        cfg, s = self.cfg, self.state
        step = s.step
        cameras = self.sample_views()
        diagnose = bool(cfg.ama.diagnose_every) and step % cfg.ama.diagnose_every == 0
        attention_png = None
        if self.dp.is_main and cfg.ama.visualize_every and step % cfg.ama.visualize_every == 0:
            attention_png = self._image(self.paths.attention, f"{stage.name}_{step:05d}.png")
        result = stage.step(step, cameras, diagnose, attention_png)
        if result is None:
            self.restore_last_good("the mesh collapsed")
            return "restored"
        stage.optimizer.zero_grad(set_to_none=True)
        self.guide.zero_grad()
        params = stage.parameters + self.guide.adapter_parameters
        outcome = backward_step(result.losses["total"], params, self.dp, self.scaler, skip=result.skipped)
        if not outcome.apply:
            if not outcome.nan_skip:
                s.overflow_skips += 1
                return "skipped"
            s.nan_skips += 1
            s.consecutive_skips += 1
            self.log.info("%s step %d: %s, skipped", s.stage, step, outcome.reason)
            if s.consecutive_skips > cfg.max_nan_skips:
                self.restore_last_good("non-finite losses persisted")
                return "restored"
            return "skipped"
        s.consecutive_skips = 0
        stage.optimizer.step()
        self.guide.step()
        if any(not torch.isfinite(p).all() for p in stage.parameters):
            self.restore_last_good("non-finite parameters")
            return "restored"
        self._record(result.losses, result.alignment)
        return "applied"

    def _record(self, losses: dict[str, torch.Tensor], alignment: dict[int, float] | None, every: int = 10) -> None:
        s = self.state
        values = {k: float(v.detach()) for k, v in losses.items() if k != "total"}
        for key, value in values.items():
            s.latest_losses[f"{s.stage}/{key}"] = value
        if s.step % every == 0:
            for key, value in values.items():
                s.losses.setdefault(f"{s.stage}/{key}", []).append(value)
            self.log.info("%s step %d %s", s.stage, s.step, values)
        if alignment:
            for side, iou in alignment.items():
                s.alignment.setdefault(f"{s.stage}/{side}", []).append([s.step, iou])
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def _stage_loop(self, stage, iters: int, stop: StopSignal) -> bool:
        """Run `stage` from the current step; False when a signal stopped it (checkpoint written)."""
        cfg, s = self.cfg, self.state
        start = time.perf_counter() - s.timings.get(stage.name, 0.0)
        self._bar = tqdm(
            total=iters, initial=s.step, desc=stage.name, unit="it", dynamic_ncols=True, file=sys.stderr,
            disable=not self.dp.is_main,
        )
        try:
            while s.step < iters:
                outcome = self._one_step(stage)
                s = self.state  # a restore replaces the state
                if outcome == "restored":
                    stage = self._stage(s.stage)
                    self._bar.n = s.step  # the bar follows the rewind
                    self._bar.refresh()
                    continue
                s.step += 1
                self._bar.update(1)
                s.timings[stage.name] = time.perf_counter() - start
                if cfg.validate_every and s.step % cfg.validate_every == 0 and self.dp.is_main:
                    folder = self.paths.geometry if stage.name == "geometry" else self.paths.appearance
                    stage.validate(self._image(folder, f"validation_{s.step:05d}.png"))
                stopping = self.dp.any(stop.received is not None)
                # In the middle of a streak of skipped steps, or with a collapsed mesh, the state
                # is suspect: the restore target stays the checkpoint from before it (a collapsed
                # one would send every restore straight back into the collapse).
                if s.step % cfg.checkpoint_every == 0 and s.consecutive_skips == 0 and not stage.collapsed():
                    self.checkpoint("good")
                elif stopping:
                    self.checkpoint("stop")
                self.progress()
                if stopping:
                    return False
        finally:
            self._bar.close()
            self._bar = None
        return True

    def run(self, stop: StopSignal) -> int:
        cfg, s = self.cfg, self.state
        if s.stage == "init":
            start = time.perf_counter()
            losses = self.geometry.initialize()
            s.losses["init/sdf_mse"] = losses[:: max(1, len(losses) // 50)] + losses[-1:]
            s.latest_losses["init/sdf_mse"] = losses[-1] if losses else 0.0
            s.timings["init"] = time.perf_counter() - start
            if self.dp.is_main:
                self.geometry.validate(self._image(self.paths.geometry, "validation_init.png"))
            s.stage, s.step = "geometry", 0
            self.checkpoint()
        if s.stage == "geometry":
            if not self._stage_loop(self.geometry, cfg.geometry.iters, stop):
                return self._stopped(stop)
            s = self.state
            if self.dp.is_main:
                self.geometry.validate(self._image(self.paths.geometry, "validation_final.png"))
            self.guide.start_stage("appearance")
            self._build_appearance()
            s.stage, s.step = "appearance", 0
            self.checkpoint()
        if s.stage == "appearance":
            if self.appearance is None:
                self._build_appearance()
            if not self._stage_loop(self.appearance, cfg.appearance.iters, stop):
                return self._stopped(stop)
            s = self.state
            if self.dp.is_main:
                self.appearance.validate(self._image(self.paths.appearance, "validation_final.png"))
            s.stage, s.step = "export", 0
            self.checkpoint()
        if s.stage == "export":
            if not self.dp.is_main:
                return 0
            written = self.export(list(cfg.export.formats), cfg.export.texture_size, cfg.export.max_faces)
            s.stage = "done"
            self.checkpoint()
            self.report("done")
            summary = ", ".join(f"{k}: {v}" for k, v in written.items())
            mesh = f" — mesh: {describe_topology(s.mesh)}" if s.mesh else ""
            faces = describe_export(s.export)
            print(f"xdreamer: done in {sum(s.timings.values()):.0f} s{mesh}{f' — {faces}' if faces else ''} — {summary}")
        return 0

    def export(self, formats: list[str], texture_size: int, max_faces: int) -> dict[str, str]:
        """Simplify, UV-unwrap, bake, write GLB/OBJ (the export folder replaced as one unit) and the turntable."""
        if self.appearance is None:
            self._build_appearance()
        start = time.perf_counter()
        e = self.cfg.export
        written, simplification = export_asset(
            self.paths, self.mesh(), self.appearance.material, self.light(), self.rasterizer,
            [f for f in formats if f in FORMATS], texture_size, max_faces, e.turntable_frames, e.turntable_resolution,
            e.fps, tuple(self.cfg.appearance.background), self.device,
        )
        self.state.timings["export"] = time.perf_counter() - start
        self.state.export = simplification.to_dict()
        return written

    def _stopped(self, stop: StopSignal) -> int:
        self.report("stopped")
        if self.dp.is_main:
            print(f"xdreamer: stopped at {self.state.stage} step {self.state.step}; continue with: xdreamer resume {self.paths.root}")
        return stop.exit_code

