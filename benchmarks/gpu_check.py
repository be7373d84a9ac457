"""The CUDA path, measured: one script for one GPU that prints markdown tables (and writes JSON).

Sections, each independent (an error is printed and the next section runs), in this order:
1. environment: versions, GPU.
2. raster: nvdiffrast against the torch rasterizer on UV spheres of ~20k and ~200k triangles at
   512² (4 views): mask IoU, largest normal difference inside the masks, forward+backward time;
   the first nvdiffrast context creation (which JIT-compiles its CUDA plugin) is timed apart.
3. steps: the paper preset's optimization step with Stable Diffusion 2.1-base's UNet and VAE at
   their exact size, random float16 weights (`sd21.py`, no download), its 1024-wide text encoder
   at 2 of 23 layers (it runs once per prompt, before the first step), per phase (geometry with
   normal+mask as latents; geometry through the VAE; the same with AMA; appearance with AMA;
   VAE + AMA with the UNet's gradient checkpointing) at 1 and 4 views: median step time and
   peak allocated memory. The parts are the run's own (DMTet grid 128 with the hash encoding,
   512² renders, CG-LoRA, AMA, dynamic loss scaling, `backward_step`).
4. generate: `xdreamer generate` end to end in a subprocess: the random SD-2.1-size model
   (saved to a temporary folder in float16) with the paper preset cut to a few iterations per
   stage, then the toy model with the toy preset (fewer iterations).

A GPU run takes about 4-6 minutes on one H100; `--budget-s` (default 450) skips a section that
would start with less time left than it needs. `--smoke` runs every section at tiny sizes (the
CPU is allowed) in about a minute, to test the script. Run from the repository root:
    python3 benchmarks/gpu_check.py [--smoke] [--json results.json] [--sections raster,steps]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

GiB = 2**30
PROMPT = "a red chair"
SECTIONS = ("environment", "raster", "steps", "generate")
PHASES = {
    "geometry, normal+mask latents": ("geometry", "latent", False, False),
    "geometry, VAE": ("geometry", "vae", False, False),
    "geometry, VAE + AMA": ("geometry", "vae", True, False),
    "appearance, VAE + AMA": ("appearance", "vae", True, False),
    "geometry, VAE + AMA, checkpointed UNet": ("geometry", "vae", True, True),
}


def say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Check:
    """Sizes, device, time budget and what sections share (the saved model, the rasterizer)."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.smoke = args.smoke
        self.workdir = workdir
        self.started = time.monotonic()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.smoke:
            self.device = torch.device("cpu")
        else:
            raise SystemExit("gpu_check: no CUDA device (use --smoke to test the script on the CPU)")
        self.resolution = 64 if self.smoke else 512
        self.grid = 16 if self.smoke else 128
        self.fit_steps = 30 if self.smoke else 100
        self.views = [int(v) for v in args.views.split(",")]
        self.repeats = 1 if self.smoke else args.repeats
        self.raster_backend = "torch"
        self.results: dict[str, dict] = {}
        self._model_dir: Path | None = None

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def model_dir(self) -> Path:
        """The random SD-2.1-size model in diffusers' layout (tiny under --smoke), saved once."""
        if self._model_dir is None:
            import sd21

            start = time.perf_counter()
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self._model_dir = sd21.save_random_model(self.workdir / "sd21_random", self.device, dtype, tiny=self.smoke)
            say(f"saved the random model to {self._model_dir} in {time.perf_counter() - start:.1f} s")
        return self._model_dir


def run_section(check: Check, name: str, needs_s: float, fn) -> None:
    """Run one section; its table is printed at once, its error printed and recorded."""
    if name not in check.args.sections.split(","):
        return
    say("", f"## {name}", "")
    if check.left() < needs_s:
        reason = f"skipped: {check.left():.0f} s of the budget left, the section needs about {needs_s:.0f} s"
        check.results[name] = {"status": "skipped", "reason": reason}
        say(reason)
        return
    start = time.monotonic()
    try:
        result = fn(check)
        result["status"] = "ok"
    except Exception as error:  # every section is independent: report it and go on
        result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        say(f"ERROR in {name}: {type(error).__name__}: {error}", "".join(traceback.format_exc().splitlines(True)[-12:]))
    result["seconds"] = round(time.monotonic() - start, 1)
    check.results[name] = result
    gc.collect()  # the section's models and graphs go before the next section (or subprocess) needs the memory
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
    say(f"({name}: {result['seconds']} s)")


# ----- 1. environment ------------------------------------------------------------------------


def environment(check: Check) -> dict:
    import diffusers
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if check.device.type == "cuda" else "cpu",
    }
    if check.device.type == "cuda":
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
    try:
        import nvdiffrast

        info["nvdiffrast"] = getattr(nvdiffrast, "__version__", "importable")
    except ImportError as error:
        info["nvdiffrast"] = f"not importable ({error})"
    say(table(["what", "value"], [[k, v] for k, v in info.items()]))
    return {"info": info}


# ----- 2. raster -----------------------------------------------------------------------------


def uv_sphere(triangles: int, device: torch.device):
    """A sphere of radius 0.8 from an n x n latitude-longitude grid: 2 n² triangles (the poles'
    are degenerate), outward-facing."""
    from xdreamer.mesh import Mesh

    n = max(3, round(math.sqrt(triangles / 2)))
    theta = torch.linspace(0, math.pi, n + 1)
    phi = torch.arange(n) * (2 * math.pi / n)
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    vertices = 0.8 * torch.stack([t.sin() * p.cos(), t.cos(), t.sin() * p.sin()], dim=-1).reshape(-1, 3)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    a, b = i * n + j, i * n + (j + 1) % n
    c, d = a + n, b + n
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([b, d, c], -1).reshape(-1, 3)])
    mesh = Mesh(vertices=vertices, faces=faces)
    if mesh.volume() < 0:
        mesh = Mesh(vertices=vertices, faces=faces.flip(1))
    return mesh.to(device)


def raster(check: Check) -> dict:
    from timing import call_seconds

    from xdreamer.render.camera import orbit_cameras
    from xdreamer.render.passes import render_geometry
    from xdreamer.render.raster import Rasterizer

    device = check.device
    backends = {"torch": Rasterizer("torch")}
    result: dict = {"rows": []}
    if device.type != "cuda":
        result["nvdiffrast"] = "not tried: no CUDA device"
    else:
        try:
            from xdreamer.render import _raster_nvdiffrast

            start = time.perf_counter()
            context = _raster_nvdiffrast.context_for(device)  # the first one JIT-compiles the CUDA plugin
            if isinstance(context, str):
                raise RuntimeError(context)
            result["nvdiffrast_first_context_s"] = round(time.perf_counter() - start, 1)
            start = time.perf_counter()
            _raster_nvdiffrast.NvdiffrastContext(device)
            result["nvdiffrast_next_context_s"] = round(time.perf_counter() - start, 3)
            backends["nvdiffrast"] = Rasterizer("nvdiffrast")
            check.raster_backend = "nvdiffrast"
        except Exception as error:  # missing package, compiler, or a failed build
            result["nvdiffrast"] = f"unusable: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    say(f"nvdiffrast: {result.get('nvdiffrast', 'context created')}; first context (plugin build) "
        f"{result.get('nvdiffrast_first_context_s', '-')} s, next {result.get('nvdiffrast_next_context_s', '-')} s")

    cameras = orbit_cameras(4, elevation=20.0).to(device)
    sizes = (2_000, 8_000) if check.smoke else (20_000, 200_000)
    for triangles in sizes:
        mesh = uv_sphere(triangles, device)
        vertices = mesh.vertices.clone().requires_grad_()
        outputs, row = {}, {"triangles": int(mesh.faces.shape[0]), "resolution": check.resolution, "views": 4}
        for name, rasterizer in backends.items():

            def render_and_backward(rasterizer=rasterizer):
                out = render_geometry(type(mesh)(vertices, mesh.faces), cameras, check.resolution, backend=rasterizer)
                (out["normal"].sum() + out["mask"].sum()).backward()

            try:  # one backend failing (e.g. out of memory) leaves the other's numbers
                with torch.no_grad():
                    outputs[name] = render_geometry(mesh, cameras, check.resolution, backend=rasterizer)
                seconds = call_seconds(render_and_backward, device, 3 if check.smoke else 5)
                row[f"{name}_ms"] = round(1000 * statistics.median(seconds), 2)
            except Exception as error:
                row[f"{name}_ms"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                outputs.pop(name, None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if len(outputs) == 2:
            a, b = outputs["torch"], outputs["nvdiffrast"]
            mask_a, mask_b = a["mask"][..., 0] > 0.5, b["mask"][..., 0] > 0.5
            row["mask_iou"] = round(float((mask_a & mask_b).sum() / (mask_a | mask_b).sum()), 5)
            inside = (a["mask"][..., 0] == 1) & (b["mask"][..., 0] == 1)
            difference = (a["normal"] - b["normal"]).abs().amax(-1)[inside]
            row["normal_max_diff_inside"] = float(difference.max())
            row["normal_pixels_off_1e-3"] = round(float((difference > 1e-3).float().mean()), 6)
        result["rows"].append(row)
        say(f"  {row}")
    header = ["triangles", "resolution x views", "torch fwd+bwd ms", "nvdiffrast fwd+bwd ms", "mask IoU",
              "max normal diff (inside)", "pixels off > 1e-3"]
    rows = [[r["triangles"], f"{r['resolution']}² x {r['views']}", r.get("torch_ms", "-"), r.get("nvdiffrast_ms", "-"),
             r.get("mask_iou", "-"), f"{r['normal_max_diff_inside']:.2e}" if "normal_max_diff_inside" in r else "-",
             r.get("normal_pixels_off_1e-3", "-")] for r in result["rows"]]
    result["table"] = table(header, rows)
    say(result["table"])
    return result


# ----- 3. steps ------------------------------------------------------------------------------


class StepParts:
    """What one step of the run touches, built as the pipeline builds it."""

    def __init__(self, check: Check):
        from xdreamer.appearance.material import MaterialNetwork
        from xdreamer.distributed import DataParallel
        from xdreamer.geometry.dmtet import DMTetGeometry
        from xdreamer.geometry.init import ellipsoid_sdf, fit_geometry_to_sdf
        from xdreamer.guidance.ama import AttentionRecorder
        from xdreamer.guidance.cg_lora import CameraGuidedLoRA, make_cg_lora_optimizer
        from xdreamer.guidance.loader import load_guidance_model
        from xdreamer.guidance.loss_scale import DynamicLossScaler
        from xdreamer.guidance.prompts import TextConditioner
        from xdreamer.render.light import default_environment
        from xdreamer.render.raster import Rasterizer

        self.check, device = check, check.device
        start = time.perf_counter()
        self.guidance = load_guidance_model(str(check.model_dir()), device)
        self.load_s = time.perf_counter() - start
        self.text = TextConditioner(self.guidance)
        self.text.prepare(PROMPT)
        self.guidance.release_text_encoder()
        self.generator = torch.Generator().manual_seed(0)
        self.lora = CameraGuidedLoRA(self.guidance.unet, text_feature_dim=self.text.feature_dim).to(device)
        self.lora_optimizer = make_cg_lora_optimizer(self.lora.parameters())
        self.recorder = AttentionRecorder()
        self.recording: bool | None = None
        self.scaler = DynamicLossScaler(enabled=self.guidance.dtype == torch.float16)
        self.dp = DataParallel()
        self.rasterizer = Rasterizer(check.raster_backend)
        torch.manual_seed(0)
        # The paper's hash encoding; the frequency one under --smoke (the CPU hash grid is slow).
        encoding = "frequency" if check.smoke else "hash"
        self.geometry = DMTetGeometry(grid_resolution=check.grid, encoding=encoding).to(device)
        start = time.perf_counter()
        target = ellipsoid_sdf([0.56, 0.76, 0.56])
        fit_geometry_to_sdf(
            self.geometry, target, target.sample_surface, self.generator, steps=check.fit_steps, lr=1e-2
        )
        self.fit_s = time.perf_counter() - start
        self.geometry_optimizer = torch.optim.AdamW(self.geometry.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-15)
        with torch.no_grad():
            self.fixed_mesh = self.geometry().detach()
        self.material = MaterialNetwork.for_mesh(self.fixed_mesh, encoding=encoding)
        self.material_optimizer = torch.optim.AdamW(self.material.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
        self.light = default_environment().to(device)

    def step(self, stage: str, model_input_kind: str, ama: bool, views: int):
        """One optimization step; returns backward_step's outcome."""
        from xdreamer.guidance.ama import ama_loss
        from xdreamer.guidance.cg_lora import install_attention_processors
        from xdreamer.guidance.sds import TimestepSchedule, normal_mask_latents, score_distillation
        from xdreamer.render.camera import sample_cameras
        from xdreamer.render.passes import render_geometry
        from xdreamer.render.shade import render_pbr
        from xdreamer.step import backward_step

        device, guidance = self.check.device, self.guidance
        cameras = sample_cameras(views, self.generator).to(device)
        if stage == "geometry":
            out = render_geometry(self.geometry(), cameras, self.check.resolution, backend=self.rasterizer)
            params, optimizer = list(self.geometry.parameters()), self.geometry_optimizer
            image = (out["normal"] * 0.5 + 0.5) * out["mask"]
        else:
            out = render_pbr(self.fixed_mesh, cameras, self.check.resolution, self.material, self.light,
                             background=(0.0, 0.0, 0.0), backend=self.rasterizer)
            params, optimizer = list(self.material.parameters()), self.material_optimizer
            image = out["rgb"]
        mask = out["mask"]
        if model_input_kind == "latent":
            model_input, weighting = normal_mask_latents(out["normal"], mask, guidance.sample_size), "sds"
        else:
            model_input, weighting = guidance.encode_images(image), "fantasia3d"
        if ama != self.recording:
            install_attention_processors(guidance.unet, self.lora, self.recorder if ama else None)
            self.recording = ama
        text = self.text(PROMPT, cameras.view_labels())
        features = torch.cat([text.uncond_features, text.cond_features]).float()
        camera_features = cameras.features().to(device).repeat(2, 1).float()

        def before_unet(rows: slice) -> None:
            self.lora.set_condition(features[rows], camera_features[rows])
            self.recorder.reset()

        if ama:
            self.recorder.set_token_index(text.eot_indices)
        t = TimestepSchedule(0.02, 0.5).sample(views, self.generator, guidance.num_train_timesteps).to(device)
        noise = torch.randn(model_input.shape, generator=self.generator).to(device)
        sds = score_distillation(guidance, model_input, text.cond, text.uncond, t, noise, 100.0, weighting,
                                 unet_grad=ama, before_unet=before_unet)
        total = sds.loss + (0.1 * ama_loss(self.recorder.take(), mask) if ama else 0.0)
        optimizer.zero_grad(set_to_none=True)
        self.lora_optimizer.zero_grad(set_to_none=True)
        outcome = backward_step(total, params + list(self.lora.parameters()), self.dp, self.scaler, skip=sds.skipped)
        if outcome.apply:
            optimizer.step()
            self.lora_optimizer.step()
        return outcome


def steps(check: Check) -> dict:
    device = check.device
    parts = StepParts(check)
    say(f"model loaded in {parts.load_s:.1f} s, init fit ({check.fit_steps} steps, grid {check.grid}) "
        f"{parts.fit_s:.1f} s, "
        f"rasterizer {check.raster_backend}, UNet {parts.guidance.dtype}")
    rows = []
    for views in check.views:
        for phase, (stage, kind, ama, checkpointed) in PHASES.items():
            row = {"views": views, "phase": phase}
            if checkpointed:
                parts.guidance.unet.enable_gradient_checkpointing()
            try:  # one phase failing (e.g. out of memory) leaves the others' numbers
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                outcomes, seconds = [], []
                for repeat in range(2 + check.repeats):
                    sync(device)
                    start = time.perf_counter()
                    outcomes.append(parts.step(stage, kind, ama, views))
                    sync(device)
                    if repeat >= 2:  # two warm-up steps: kernels, allocator, the loss scale's first backoffs
                        seconds.append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else float("nan")
                row.update(step_ms=round(1000 * statistics.median(seconds), 1), peak_gib=round(peak, 2),
                           skipped=[o.reason for o in outcomes if not o.apply], loss_scale=parts.scaler.scale_value)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                if checkpointed:
                    parts.guidance.unet.disable_gradient_checkpointing()
            rows.append(row)
            say(f"  {row}")
    header = ["views", "phase", "step ms (median)", "peak allocated GiB", "skipped steps (of warm-up + timed)",
              "loss scale after"]
    result = {"rows": rows, "rasterizer": check.raster_backend, "dtype": str(parts.guidance.dtype)}
    result["table"] = table(header, [
        [r["views"], r["phase"], r.get("step_ms", r.get("error")), r.get("peak_gib", "-"),
         ", ".join(r.get("skipped", [])) or "none", r.get("loss_scale", "-")] for r in rows
    ])
    say("", result["table"])
    return result


# ----- 4. generate ---------------------------------------------------------------------------


def generate_once(check: Check, name: str, model: str, preset: str, overrides: list[str], timeout: float) -> dict:
    out = check.workdir / f"run_{name}"
    command = [sys.executable, "-m", "xdreamer.cli", "generate", PROMPT, "--model", model, "--preset", preset,
               "--out", str(out), "--device", check.device.type, "--overwrite", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        process = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, stderr = process.returncode, process.stderr
    except subprocess.TimeoutExpired as expired:
        output = expired.stderr or ""
        code, stderr = "timeout", output.decode(errors="replace") if isinstance(output, bytes) else output
    row = {"run": name, "exit": code, "wall_s": round(time.perf_counter() - start, 1)}
    report_path = out / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        row["status"] = report.get("status")
        row["timings_s"] = {k: round(v, 1) for k, v in report.get("timings_s", {}).items()}
        row["skipped_nan_steps"] = report.get("skipped_nan_steps")
        outputs = report.get("outputs", {})
        row["outputs"] = {k: Path(v).is_file() and Path(v).stat().st_size > 0 for k, v in outputs.items()}
    if code != 0:
        lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line]
        row["stderr_tail"] = lines[-6:]
    say(f"  {name}: exit {code} in {row['wall_s']} s, status {row.get('status')}, timings {row.get('timings_s')}")
    for line in row.get("stderr_tail", []):
        say(f"    {line}")
    return row


def generate(check: Check) -> dict:
    if check.smoke:
        small = ["geometry.grid_resolution=16", "geometry.render_resolution=64", "appearance.render_resolution=64",
                 "geometry.encoding=frequency", "appearance.encoding=frequency", "init.steps=30", "init.lr=0.01",
                 "export.texture_size=64", "export.turntable_frames=2", "export.turntable_resolution=64",
                 "validate_every=0", "checkpoint_every=2"]
        toy = small + ["geometry.iters=3", "appearance.iters=2", "ama.start_geometry=1", "ama.start_appearance=1"]
        paper = small + ["geometry.iters=3", "geometry.latent_phase_iters=1", "ama.start_geometry=2",
                         "appearance.iters=2", "appearance.t_switch=1", "ama.start_appearance=1"]
    else:
        toy = ["geometry.iters=40", "appearance.iters=30", "ama.start_geometry=20",
               "ama.start_appearance=15", "appearance.t_switch=15", "checkpoint_every=20", "export.turntable_frames=12"]
        paper = ["geometry.iters=6", "geometry.latent_phase_iters=2", "ama.start_geometry=4", "appearance.iters=4",
                 "appearance.t_switch=2", "ama.start_appearance=2", "init.steps=100", "init.lr=0.01",
                 "checkpoint_every=5", "validate_every=0", "export.texture_size=512", "export.turntable_frames=8",
                 "export.turntable_resolution=256"]
    # The SD-2.1-size run first: it is the path no CPU test covers.
    runs = [("sd21_random_paper", None, "paper", paper), ("toy", "toy", "toy", toy)]
    rows = []
    for name, model, preset, overrides in runs:
        if check.left() < 20:
            rows.append({"run": name, "exit": "skipped: time budget"})
            continue
        model = model or str(check.model_dir())
        rows.append(generate_once(check, name, model, preset, overrides, timeout=max(20.0, check.left() - 10)))
    header = ["run", "exit", "wall s", "status", "stage timings s", "skipped NaN steps", "outputs written"]
    result = {"rows": rows}
    result["table"] = table(header, [[r["run"], r["exit"], r.get("wall_s", "-"), r.get("status", "-"),
                                      r.get("timings_s", "-"), r.get("skipped_nan_steps", "-"),
                                      ", ".join(k for k, ok in r.get("outputs", {}).items() if ok) or "-"]
                                     for r in rows])
    say("", result["table"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: tests the script in a minute")
    parser.add_argument("--json", default=None, help="also write every result to this JSON file")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--views", default="1,4", help="views per step in the steps section")
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per phase, after 2 warm-up steps")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would start later than this")
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        check = Check(args, Path(workdir))
        say(f"# gpu_check on {check.device} ({'smoke' if check.smoke else 'full'}), budget {args.budget_s:.0f} s")
        run_section(check, "environment", 0, environment)
        run_section(check, "raster", 30 if check.smoke else 150, raster)
        run_section(check, "steps", 20 if check.smoke else 120, steps)
        run_section(check, "generate", 20 if check.smoke else 60, generate)
    total = time.monotonic() - check.started
    say("", f"# summary ({total:.0f} s in all)")
    for name, result in check.results.items():
        say("", f"## {name}: {result['status']} ({result.get('seconds', 0)} s)")
        say(result.get("table") or result.get("error") or result.get("reason") or json.dumps(result.get("info", {})))
    if args.json:
        summary = {"total_s": round(total, 1), "sections": check.results}
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return 0 if all(r["status"] != "error" for r in check.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
