"""What the command line (and the web app and batch front ends) call: generate, resume, export,
render, and the toy benchmark. Everything a user can get wrong is checked before a file is
touched; a run directory belongs to one process at a time (its lock)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

import xdreamer
from xdreamer.atomic import write_text
from xdreamer.config import ConfigError, load_config, to_yaml
from xdreamer.distributed import init_data_parallel
from xdreamer.export.simplify import describe_export
from xdreamer.guidance.loader import GuidanceModel, load_guidance_model
from xdreamer.mesh import load_mesh
from xdreamer.pipeline.checks import DeviceError, check_inputs, check_memory, resolve_device
from xdreamer.pipeline.run import Run
from xdreamer.rundir import (
    RunError,
    RunLock,
    RunPaths,
    StopSignal,
    check_output_dir,
    check_writable,
    clear_run,
    close_logger,
    is_run,
    open_run,
    remove_temporaries,
    slug,
)

__all__ = [
    "DeviceError", "Run", "export_run", "generate", "generate_from_cli", "render_command", "resume", "toy_benchmark",
]

TEXTURE_SIZES = (16, 8192)


def _load_guidance(cfg: DictConfig, device: torch.device) -> GuidanceModel:
    dtype = torch.float16 if device.type == "cuda" and cfg.half_precision else torch.float32
    guidance = load_guidance_model(
        cfg.model, device, dtype=dtype, attention_slicing=cfg.guidance.attention_slicing,
        cpu_offload=cfg.guidance.cpu_offload,
    )
    if cfg.guidance.gradient_checkpointing:
        # AMA's backward recomputes the conditional UNet half instead of keeping its activations
        # (the recorder and CG-LoRA's dropout give the same maps and masks when recomputed).
        guidance.unet.enable_gradient_checkpointing()
    return guidance


def _execute(run: Run, lock: RunLock | None) -> int:
    """Run to the end or to a stop; whatever ends it, report.json says so (a full disk is a user
    error with one line; anything else is a bug, re-raised after the report)."""
    try:
        with StopSignal() as stop:
            return run.run(stop)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            _report_quietly(run, "failed", f"{type(exc).__name__}: {exc}")
            raise
        _report_quietly(run, "failed", "no space left on device")
        raise RunError(
            f"no space left on device while writing {exc.filename or run.paths.root}; free some space and "
            f"continue with xdreamer resume {run.paths.root}"
        ) from None
    except KeyboardInterrupt:
        _report_quietly(run, "stopped", "interrupted before the next checkpoint")
        raise
    except RunError as exc:
        _report_quietly(run, "failed", str(exc))
        raise
    except Exception as exc:
        _report_quietly(run, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        close_logger(run.log)
        if lock is not None:
            lock.release()


def _report_quietly(run: Run, status: str, error: str) -> None:
    try:
        run.report(status, error=error)
    except OSError:
        pass  # the disk that failed may not take the report either; last good checkpoint stands


def generate(cfg: DictConfig, out_dir: Path, overwrite: bool = False) -> int:
    """Validate everything a user can get wrong before writing anything, then run."""
    dp, device_name = init_data_parallel(cfg.device)
    device = resolve_device(device_name)
    check_inputs(cfg)
    check_memory(cfg, device)
    check_output_dir(out_dir, overwrite)
    guidance = _load_guidance(cfg, device)
    dp.barrier()  # every rank has checked the folder before rank 0 clears it
    paths = RunPaths(out_dir)
    lock = None
    if dp.is_main:
        lock = RunLock(out_dir).acquire()
        try:
            # Checked again under the lock: another process may have written here meanwhile.
            check_output_dir_locked(out_dir, overwrite)
            clear_run(out_dir)
            paths.make()
            paths.marker.write_text(f"xdreamer {xdreamer.__version__}\n")
            write_text(paths.config, to_yaml(cfg))
        except BaseException:
            lock.release()
            raise
    dp.barrier()
    run = Run(cfg, paths, guidance, device, dp)
    return _execute(run, lock)


def check_output_dir_locked(out_dir: Path, overwrite: bool) -> None:
    """`check_output_dir` for a folder whose lock this process holds (its `.lock` is ours)."""
    entries = [p for p in out_dir.iterdir() if p.name != ".lock"]
    if entries and not overwrite:
        raise RunError(f"output directory {out_dir} is not empty: another xdreamer process wrote it just now")
    if entries and not is_run(out_dir):
        raise RunError(f"--overwrite only replaces an xdreamer run, and {out_dir} is not one: choose another --out")


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
    out = Path(args.out) if args.out else Path("runs") / slug(cfg.prompt)
    return generate(cfg, out, overwrite=args.overwrite)


def _take_recorded_threads(state: dict, device: torch.device, announce: bool) -> None:
    """On a CPU, continue with the thread count the checkpoint was written with: the same seed on
    another count is another draw (sums are split differently), so only it resumes exactly.
    Checkpoints from before the count was recorded keep this process's."""
    threads = state.get("cpu_threads")
    if device.type != "cpu" or threads is None or threads == torch.get_num_threads():
        return
    if announce:
        print(f"xdreamer: using {threads} CPU thread{'s' if threads != 1 else ''} as the run did (this process "
              f"started with {torch.get_num_threads()}): on another count the same seed is another draw")
    torch.set_num_threads(int(threads))


def _open_existing(run_dir: Path) -> tuple[Run, dict | None, RunLock]:
    """A run directory's Run with its latest checkpoint loaded, under its lock."""
    paths = open_run(run_dir)
    try:
        cfg = load_config(config_file=paths.config)
    except ConfigError as exc:
        raise RunError(f"{run_dir} has an unusable config.yaml: {exc}") from None
    dp, device_name = init_data_parallel(cfg.device)
    device = resolve_device(device_name)
    lock = RunLock(run_dir).acquire() if dp.is_main else None
    try:
        if dp.is_main:
            remove_temporaries(run_dir)
        guidance = _load_guidance(cfg, device)
        run = Run(cfg, paths, guidance, device, dp)
        state = run.latest_checkpoint()
        if state is not None:
            run.check_compatible(state)
            _take_recorded_threads(state, device, dp.is_main)
            run.load_state_dict(state)
            run.apply_edited_learning_rates(state)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run, state, lock


def resume(run_dir: Path) -> int:
    run, state, lock = _open_existing(run_dir)
    where = "the start" if state is None else f"{run.state.stage} step {run.state.step}"
    if run.dp.is_main:
        print(f"xdreamer: resuming {run_dir} from {where}")
    return _execute(run, lock)


def export_run(run_dir: Path, formats: list[str], texture_size: int | None, max_faces: int | None = None) -> int:
    """`xdreamer export`: re-export a finished run (the export folder is replaced as one unit)."""
    if not formats:
        raise ConfigError("--format is empty: give glb, obj or both (e.g. --format glb,obj)")
    for fmt in formats:
        if fmt not in ("glb", "obj"):
            raise ConfigError(f"export format '{fmt}' is not one of: glb, obj")
    if texture_size is not None and not TEXTURE_SIZES[0] <= texture_size <= TEXTURE_SIZES[1]:
        raise ConfigError(f"--texture-size must be in [{TEXTURE_SIZES[0]}, {TEXTURE_SIZES[1]}], got {texture_size}")
    if max_faces is not None and max_faces < 0:
        raise ConfigError(f"--max-faces must be 0 (no simplification) or more, got {max_faces}")
    run, state, lock = _open_existing(run_dir)
    try:
        if state is None or run.state.stage not in ("export", "done"):
            raise RunError(f"{run_dir} has not finished its appearance stage yet; run xdreamer resume {run_dir} first")
        written = run.export(
            formats, texture_size or run.cfg.export.texture_size, run.cfg.export.max_faces if max_faces is None else max_faces
        )
        run.report(run.state.stage if run.state.stage == "done" else "running")
    finally:
        close_logger(run.log)
        if lock is not None:
            lock.release()
    faces = describe_export(run.state.export)
    print("xdreamer: exported " + ", ".join(f"{k}: {v}" for k, v in written.items()) + (f" — {faces}" if faces else ""))
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
    check_writable(out)
    render_mesh_views(
        mesh, out, views=args.views, resolution=args.resolution, elevation=args.elevation,
        radius=args.radius, fov=args.fov, backend=args.backend,
    )
    print(f"xdreamer: rendered {args.views} views of {source} into {out}")
    return 0


def toy_benchmark(args) -> int:
    """`xdreamer toy eval`: generate every prompt under every ablation and seed, and score it."""
    from xdreamer.toy import eval as toy_eval

    prompts = toy_eval.read_prompts(args.prompts)
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2")
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
    scores = toy_eval.run_benchmark(prompts, out, ablations, generate_one, seeds=seeds)
    print(toy_eval.markdown_table(scores))
    print(f"xdreamer: benchmark written to {out / 'eval.json'} and {out / 'eval.md'}")
    return 0
