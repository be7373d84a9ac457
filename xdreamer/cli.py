"""Command line: `xdreamer generate | resume | export | render | toy train | toy eval`.

Errors a user can cause (bad prompt, config, mesh, model, folder) print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other user error."""

    def error(self, message: str):
        sys.stderr.write(f"xdreamer: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text -> textured 3D asset (GLB/OBJ) and a turntable video")
    p.add_argument("prompt", help='what to make, e.g. "a red cube"')
    p.add_argument("--model", default=None, help="toy | a Hugging Face hub id | a local diffusers folder")
    p.add_argument("--out", default=None, help="run directory (default: runs/<prompt>)")
    p.add_argument("--preset", default="paper", help="paper | fast | toy")
    p.add_argument("--config", default=None, help="a config.yaml (e.g. from an earlier run)")
    p.add_argument("--init", default=None, help="ellipsoid | a mesh file to start from")
    p.add_argument("--environment", default=None, help="an .hdr/.exr environment map (default: procedural sky)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--views", type=int, default=None, help="cameras per step")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. geometry.iters=500")


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="render normal/mask/depth views and a turntable of a mesh or a run")
    p.add_argument("mesh", help="a mesh file (OBJ/PLY/STL/GLB) or a run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--elevation", type=float, default=15.0)
    p.add_argument("--radius", type=float, default=3.0)
    p.add_argument("--fov", type=float, default=40.0)
    p.add_argument("--backend", default="auto", help="auto | torch | nvdiffrast")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xdreamer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    p = sub.add_parser("resume", help="continue a stopped run from its last checkpoint")
    p.add_argument("run_dir")
    p = sub.add_parser("export", help="re-export a finished run's asset")
    p.add_argument("run_dir")
    p.add_argument("--format", default="glb,obj", help="comma-separated: glb, obj")
    p.add_argument("--texture-size", type=int, default=None)
    p.add_argument(
        "--max-faces", type=int, default=None, help="simplify the exported mesh to this many faces (0: not at all)"
    )
    _add_render(sub)
    # The app and batch front ends declare their own options (their modules import nothing heavy
    # at the top; gradio and ray are imported when the command runs).
    from xdreamer import app, batch

    app.add_arguments(sub.add_parser("app", help="a web page: type a prompt, watch the run, look at the asset in 3D"))
    batch.add_arguments(sub.add_parser("batch", help="generate a file of prompts as Ray tasks (resumable)"))
    toy = sub.add_parser("toy", help="the embedded toy world: train its model, run its benchmark")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, parser_class=_Parser)
    p = toy_sub.add_parser("train", help="train the toy diffusion model (from scratch, or on from --init)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.add_argument("--sampling", default=None, help="uniform (default) | shapes: every shape an equal share of each mode")
    p.add_argument("--init", default=None, help="an exported toy model folder to start from")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 32; a multiple of 4)")
    p.add_argument("--channels", default=None, help="the UNet's three block widths (default 32,64,64)")
    p.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda; the same draws either way")
    p = toy_sub.add_parser("eval", help="generate each prompt and score it against ground truth")
    p.add_argument("--prompts", default=None, help="default | front | a text file, one prompt per line")
    p.add_argument("--out", required=True)
    p.add_argument("--ablations", default="full",
                   help="comma-separated: full, no_cg_lora, no_ama, neither, no_direction, no_cg_lora_no_direction")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each prompt is generated once per seed")
    p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides for every run")
    p = toy_sub.add_parser("compare", help="compare two benchmarks run by run (e.g. after and before a change)")
    p.add_argument("new", help="folder (or eval.json) of the benchmark to judge")
    p.add_argument("old", help="folder (or eval.json) of the benchmark to compare it with")
    p.add_argument("--ablation", default="full", help="which ablation's runs to compare (default: full)")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    return parser


def _quiet_libraries() -> None:
    """The run's own progress bars are the ones a user should see, not the weight loaders'."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def _run(args) -> int:
    # Imports are deferred so `xdreamer --help` and argument errors stay instant.
    if args.command in ("generate", "resume", "export", "toy"):
        _quiet_libraries()
    if args.command == "generate":
        from xdreamer import pipeline

        return pipeline.generate_from_cli(args)
    if args.command == "resume":
        from xdreamer import pipeline

        return pipeline.resume(Path(args.run_dir))
    if args.command == "export":
        from xdreamer import pipeline

        formats = [f.strip() for f in args.format.split(",") if f.strip()]
        return pipeline.export_run(Path(args.run_dir), formats, args.texture_size, args.max_faces)
    if args.command == "render":
        from xdreamer import pipeline

        return pipeline.render_command(args)
    if args.command == "app":
        from xdreamer import app

        return app.run(args)
    if args.command == "batch":
        from xdreamer import batch

        return batch.run(args)
    if args.command == "toy" and args.toy_command == "train":
        from xdreamer.toy import train

        channels = None if args.channels is None else train.parse_channels(args.channels)
        train.main(
            Path(args.out), device=args.device, steps=args.steps, seed=args.seed, lr=args.lr, sampling=args.sampling,
            init=args.init, resolution=args.resolution, channels=channels,
        )
        return 0
    if args.command == "toy" and args.toy_command == "compare":
        from xdreamer.atomic import write_text
        from xdreamer.toy import eval as toy_eval

        if args.out and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):
            raise toy_eval.ToyWorldError(f"--out {args.out}: give a file in an existing folder")
        table = toy_eval.comparison_table(
            toy_eval.read_scores(Path(args.new), args.ablation), toy_eval.read_scores(Path(args.old), args.ablation)
        )
        print(table, end="")
        if args.out:
            write_text(Path(args.out), table)
        return 0
    if args.command == "toy" and args.toy_command == "eval":
        from xdreamer import pipeline

        return pipeline.toy_benchmark(args)
    raise AssertionError(args.command)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"xdreamer: warning: {str(message).splitlines()[0]}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a warning is one line too, not a source excerpt
    parser = build_parser()
    # Dotted KEY=VALUE overrides may come anywhere among the options, which argparse's positional
    # handling does not allow: collect the leftovers and accept only overrides among them.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        code = _run(args)
    except ValueError as exc:
        # Our own errors are user errors with a one-line message; anything else is a bug.
        if not type(exc).__module__.startswith("xdreamer"):
            raise
        sys.stderr.write(f"xdreamer: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("xdreamer: interrupted\n")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
