"""`xdreamer batch PROMPTS --out DIR`: every prompt of a file generated as one Ray task, resumably.

Each run is an `xdreamer generate` (or `resume`) subprocess inside a Ray task that asks for one GPU,
or CPU cores on a cluster without GPUs; Ray schedules them, on this machine or on a cluster it joins
(`--address`). Rerunning the same command skips finished runs, resumes unfinished ones from their
checkpoints and retries failed ones. `DIR/summary.csv` and `DIR/summary.json` are rewritten after
every run, so a driver killed at any moment leaves a summary of what had finished.

The helpers that start and read runs (`generate_args`, `start_cli`, `run_status`) are shared
with the web app. Ray is imported when the command runs."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from xdreamer.rundir import slug

# The columns of the toy-world score (`xdreamer.toy.eval.Score`) that the summary keeps.
SCORE_COLUMNS = [
    "split", "predicted_shape", "predicted_colour", "shape_correct", "colour_correct", "iou", "chamfer", "delta_e",
]
COLUMNS = ["name", "prompt", "seed", "status", "attempts", "wall_s", "glb", "obj", "turntable", "error"]


class BatchError(ValueError):
    """A prompts file, option or cluster address that cannot be used."""


# ----- runs as subprocesses (shared with the web app) ---------------------------------------------


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "xdreamer.cli", *args]


def generate_args(
    prompt: str,
    out: Path,
    *,
    model: str | None = None,
    preset: str | None = None,
    seed: int | None = None,
    views: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The words of one run's `xdreamer generate` command (`cli_argv` makes them a command line)."""
    args = ["generate", prompt, "--out", str(out)]
    for flag, value in (("--model", model), ("--preset", preset), ("--seed", seed), ("--views", views)):
        if value is not None:
            args += [flag, str(value)]
    return args + list(overrides)


def _child_setup(death_signal: int):
    """A preexec_fn for a run's process: signals unblocked (a Ray worker blocks SIGINT, and a
    child inherits the mask, so a stop would never arrive) and, on Linux, `death_signal` sent to it
    when the thread that started it dies, so a run never outlives what drives it."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: nothing is loaded in the child
    pr_set_pdeathsig = 1

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if prctl is not None:
            prctl(pr_set_pdeathsig, death_signal)

    return preexec


def start_cli(argv: list[str], output, death_signal: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start an `xdreamer` command with stdout and stderr into the open file `output`; it receives
    `death_signal` if the starting thread dies first (Linux; elsewhere it is left running).

    It gets its own session, so a Ctrl-C at the terminal reaches only its driver, which decides how
    the run stops (a second SIGINT would stop it without a checkpoint)."""
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env,
        preexec_fn=_child_setup(death_signal), start_new_session=True,
    )


def read_json(path: Path) -> dict | None:
    """A JSON file the pipeline writes atomically; None when it is not there (yet)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def run_status(run_dir: Path) -> str | None:
    """The final state a run recorded in report.json (running | stopped | done | failed), or None."""
    report = read_json(run_dir / "report.json")
    return None if report is None else report["status"]


def error_line(output: str, exit_code: int) -> str:
    """The one-line reason a CLI process failed, from what it printed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("xdreamer: error: "):
            return line[len("xdreamer: error: ") :]
    if exit_code < 0:
        return f"killed by {signal.Signals(-exit_code).name}"
    return f"exit code {exit_code}: {lines[-1] if lines else 'no output'}"


# ----- the prompts file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int | None  # None: the seed of --seed or of the config
    overrides: tuple[str, ...]
    line: int


def _override_words(value, where: str) -> tuple[str, ...]:
    """JSONL "overrides": ["KEY=VALUE", ...] or {"KEY": value, ...}."""
    if isinstance(value, dict):
        return tuple(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise BatchError(f"{where}: \"overrides\" must be a list of \"KEY=VALUE\" strings or an object")


def _parse_line(text: str, where: str, line: int) -> Job:
    if not text.startswith("{"):
        return Job(text, None, (), line)
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BatchError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    unknown = sorted(set(item) - {"prompt", "seed", "overrides"})
    if unknown:
        raise BatchError(f"{where}: unknown field {unknown[0]!r} (the fields are prompt, seed, overrides)")
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BatchError(f"{where}: \"prompt\" must be a non-empty string")
    seed = item.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BatchError(f"{where}: \"seed\" must be an integer, got {seed!r}")
    overrides = _override_words(item.get("overrides", []), where)
    return Job(prompt.strip(), seed, overrides, line)


def read_jobs(path: Path) -> list[Job]:
    """One prompt a line, or a JSON object a line ({"prompt", "seed", "overrides"}); blank lines and
    lines starting with # are skipped."""
    if not path.is_file():
        raise BatchError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchError(f"cannot read prompts file {path}: {exc}") from None
    jobs = [
        _parse_line(text.strip(), f"{path}:{number}", number)
        for number, text in enumerate(lines, start=1)
        if text.strip() and not text.lstrip().startswith("#")
    ]
    if not jobs:
        raise BatchError(f"prompts file {path} has no prompts")
    for job in jobs:
        if any(word.split("=", 1)[0].strip() == "seed" for word in job.overrides):
            raise BatchError(f"{path}:{job.line}: give the seed as the \"seed\" field, not as an override")
    return jobs


def run_names(jobs: list[Job], path: Path) -> list[str]:
    """Each job's run folder: the prompt's slug, plus `_seed<N>` when several jobs share the slug."""
    slugs = [slug(job.prompt) for job in jobs]
    shared = Counter(slugs)
    names = [s if shared[s] == 1 else f"{s}_seed{job.seed}" for s, job in zip(slugs, jobs)]
    first: dict[str, int] = {}
    for name, job in zip(names, jobs):
        if name in first:
            raise BatchError(
                f"{path}: lines {first[name]} and {job.line} would both be run {name!r} (same prompt and seed): "
                "give them different seeds"
            )
        first[name] = job.line
    return names


# ----- one run: the Ray task ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    name: str
    prompt: str
    seed: int
    run_dir: str  # absolute: Ray workers do not share the driver's working directory
    log: str
    generate: list[str]  # `generate_args` of a fresh start; an existing run is resumed instead
    score: bool  # a toy-world prompt generated with the toy model


def _attempt(argv: list[str], log: Path) -> tuple[int, str]:
    """Run one CLI command to its end with its output appended to `log`; (exit code, error line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        output.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(['xdreamer', *argv[3:]])}\n".encode())
        output.flush()
        offset = output.tell()
        # SIGKILL when the worker dies: a killed driver takes its workers with it, and a run that kept
        # going would hold its folder against the rerun's attempt. Its last checkpoint is kept.
        process = start_cli(argv, output, signal.SIGKILL)
        try:
            # Polled: ray.cancel's KeyboardInterrupt only arrives while Python code runs.
            while (code := process.poll()) is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            # ray.cancel (the driver was interrupted): stop the run cleanly, checkpoint written.
            process.send_signal(signal.SIGINT)
            process.wait()
            raise
    with open(log, "rb") as f:
        f.seek(offset)
        printed = f.read().decode("utf-8", errors="replace")
    return code, "" if code == 0 else error_line(printed, code)


def execute(spec: RunSpec) -> dict:
    """Generate (or resume) one run unless it is done, then score it when it is a toy-world run.
    Returns {"exit_code", "error", "started", "wall_s", "score"}; "started": the run folder exists."""
    run_dir = Path(spec.run_dir)
    start = time.perf_counter()
    code, error = 0, ""
    if run_status(run_dir) != "done":
        # The command line is made here: the worker's Python may live elsewhere than the driver's.
        args = ["resume", str(run_dir)] if (run_dir / "config.yaml").is_file() else spec.generate
        code, error = _attempt(cli_argv(*args), Path(spec.log))
    score = None
    if spec.score and run_status(run_dir) == "done":
        from xdreamer.toy.eval import score_run

        full = asdict(score_run(run_dir, spec.prompt, seed=spec.seed))
        score = {key: full[key] for key in SCORE_COLUMNS}
    return {
        "exit_code": code,
        "error": error,
        "started": (run_dir / "config.yaml").is_file(),
        "wall_s": time.perf_counter() - start,
        "score": score,
    }


# ----- the summary --------------------------------------------------------------------------------


def _outputs(run_dir: Path, out: Path) -> dict[str, str]:
    files = {"glb": "export/model.glb", "obj": "export/model.obj", "turntable": "turntable.mp4"}
    return {key: (run_dir / rel).relative_to(out).as_posix() if (run_dir / rel).is_file() else ""
            for key, rel in files.items()}


def write_summary(out: Path, rows: list[dict], scored: bool) -> None:
    """DIR/summary.json ({"counts", "runs"}) and DIR/summary.csv (one row a run), each atomically."""
    from xdreamer.atomic import write_json, write_text

    columns = COLUMNS + (SCORE_COLUMNS if scored else [])
    counts = Counter(row["status"] for row in rows)
    write_json(out / "summary.json", {"counts": dict(sorted(counts.items())), "runs": rows})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    write_text(out / "summary.csv", text.getvalue())


def _check_folder(run_dir: Path, job: Job) -> str:
    """Why an existing run folder cannot be this job's run ('' when it can)."""
    from omegaconf import OmegaConf

    if not (run_dir / "config.yaml").is_file():
        return ""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.prompt != job.prompt or cfg.seed != job.seed:
        return (
            f"{run_dir} holds a run of {cfg.prompt!r} with seed {cfg.seed}, not {job.prompt!r} with seed {job.seed}: "
            "move it away"
        )
    return ""


# ----- the command --------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "prompts", help='a text file: one prompt a line, or one JSON object a line {"prompt", "seed", "overrides"}'
    )
    parser.add_argument("--out", required=True, help="the batch folder: one run folder per prompt, and the summary")
    parser.add_argument("--model", default=None, help="toy | a Hugging Face hub id | a local diffusers folder")
    parser.add_argument("--preset", default="paper", help="paper | fast | toy")
    parser.add_argument("--seed", type=int, default=None, help="the seed of lines that give none (default: the config's)")
    parser.add_argument("--retries", type=int, default=1, help="tries after a failed one, per run (default 1)")
    parser.add_argument("--cpus-per-run", type=int, default=1, help="CPU cores each run asks Ray for (default 1)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default: start Ray on this machine)")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides for every run, e.g. geometry.iters=500")


def _plan(args) -> tuple[Path, list[Job], list[str], bool]:
    """Everything the user can get wrong, checked before Ray starts: (out, jobs, names, toy-scored)."""
    from xdreamer.config import load_config

    if args.retries < 0:
        raise BatchError(f"--retries must be >= 0, got {args.retries}")
    if args.cpus_per_run < 1:
        raise BatchError(f"--cpus-per-run must be >= 1, got {args.cpus_per_run}")
    if any(word.split("=", 1)[0].strip() == "seed" for word in args.overrides):
        raise BatchError("give the seed with --seed (or per line in a JSONL prompts file), not as an override")
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} exists and is not a directory")
    path = Path(args.prompts)
    jobs = read_jobs(path)
    # The options every run shares fail here, once, with the CLI's message.
    cfg = load_config(
        preset=args.preset, overrides=list(args.overrides), prompt=jobs[0].prompt, model=args.model, seed=args.seed
    )
    jobs = [job if job.seed is not None else replace(job, seed=cfg.seed) for job in jobs]
    if args.address is not None:
        _check_reachable(args.address)
    return out, jobs, run_names(jobs, path), cfg.model == "toy"


def _check_reachable(address: str) -> None:
    """A head node's HOST:PORT that does not answer, refused now: Ray itself would wait for minutes."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise BatchError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _toy_prompt(prompt: str) -> bool:
    from xdreamer.toy.eval import parse_prompt
    from xdreamer.toy.world import ToyWorldError

    try:
        parse_prompt(prompt)
    except ToyWorldError:
        return False
    return True


def _start_ray(address: str | None):
    # Ray would otherwise report usage statistics over the network from every driver.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise BatchError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    return ray


def run(args) -> int:
    out, jobs, names, toy = _plan(args)
    scored = {name: toy and _toy_prompt(job.prompt) for job, name in zip(jobs, names)}
    previous = {row["name"]: row for row in (read_json(out / "summary.json") or {"runs": []})["runs"]}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"cannot create the batch folder {out}: {exc.strerror}") from None

    rows: dict[str, dict] = {}
    todo: list[RunSpec] = []
    for job, name in zip(jobs, names):
        run_dir = out / name
        before = previous.get(name, {})
        row = {
            "name": name, "prompt": job.prompt, "seed": job.seed, "status": "pending",
            "attempts": before.get("attempts", 0), "wall_s": before.get("wall_s"), "error": "",
            **_outputs(run_dir, out), **{key: before.get(key) for key in SCORE_COLUMNS if toy},
        }
        rows[name] = row
        mismatch = _check_folder(run_dir, job)
        if mismatch:
            row.update(status="failed", error=mismatch)
        elif run_status(run_dir) == "done" and (not scored[name] or before.get("iou") is not None):
            row["status"] = "done"
        else:
            words = generate_args(job.prompt, run_dir, model=args.model, preset=args.preset, seed=job.seed,
                                  overrides=list(args.overrides) + list(job.overrides))
            log = str(out / "logs" / f"{name}.log")
            todo.append(RunSpec(name, job.prompt, job.seed, str(run_dir), log, words, scored[name]))

    def save() -> None:
        write_summary(out, [rows[name] for name in names], toy)

    save()
    if todo:
        ray = _start_ray(args.address)
        try:
            _run_tasks(ray, todo, rows, args, save)
        finally:
            ray.shutdown()
    counts = Counter(row["status"] for row in rows.values())
    print(
        f"xdreamer: batch of {len(rows)}: {counts['done']} done, {counts['failed']} failed; "
        f"summary in {out / 'summary.csv'} and {out / 'summary.json'}"
    )
    return 0 if counts["done"] == len(rows) else 1


def _run_tasks(ray, todo: list[RunSpec], rows: dict[str, dict], args, save) -> None:
    """Submit every run, resubmit failed attempts up to --retries, record each result as it comes."""
    from tqdm import tqdm

    gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"num_cpus": args.cpus_per_run, **({"num_gpus": 1} if gpu else {})}
    # Ray's own retries are off: a crashed worker is a failed attempt like any other, retried below.
    task = ray.remote(max_retries=0)(execute).options(**resources)
    tries = {spec.name: 0 for spec in todo}

    def submit(spec: RunSpec):
        tries[spec.name] += 1
        rows[spec.name].update(status="running", attempts=rows[spec.name]["attempts"] + 1)
        return task.remote(spec)

    pending = {submit(spec): spec for spec in todo}
    save()
    done_before = sum(row["status"] == "done" for row in rows.values())
    bar = tqdm(total=len(rows), initial=done_before, desc="batch", unit="run", dynamic_ncols=True, file=sys.stderr)
    try:
        while pending:
            # A timeout, so that a Ctrl-C reaches Python between waits.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not ready:
                continue
            spec = pending.pop(ready[0])
            row = rows[spec.name]
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                result = {"exit_code": -1, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
                          "started": True, "wall_s": 0.0, "score": None}
            row["wall_s"] = round((row["wall_s"] or 0.0) + result["wall_s"], 3)
            row.update(_outputs(Path(spec.run_dir), Path(spec.run_dir).parent))
            if result["score"] is not None:
                row.update(result["score"])
            if result["exit_code"] == 0 and run_status(Path(spec.run_dir)) == "done":
                row.update(status="done", error="")
                bar.update(1)
            # A command refused before its run started is a user error that trying again cannot fix.
            elif result["started"] and tries[spec.name] <= args.retries:
                bar.write(f"xdreamer: retrying {spec.prompt!r}: {result['error']}", file=sys.stderr)
                pending[submit(spec)] = spec
            else:
                row.update(status="failed", error=result["error"])
                bar.write(f"xdreamer: failed {spec.prompt!r}: {result['error']}", file=sys.stderr)
                bar.update(1)
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows.values()), refresh=False)
            save()
    except KeyboardInterrupt:
        # Cancelling interrupts each task, which stops its run cleanly (checkpoint written).
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=120)
        for spec in pending.values():
            rows[spec.name]["status"] = run_status(Path(spec.run_dir)) or "pending"
        save()
        raise
    finally:
        bar.close()
