"""`xdreamer app`: a web page (Gradio) to type a prompt, watch the run and look at the asset in 3D.

Every generation is an `xdreamer generate` subprocess writing an ordinary run directory under the
runs folder, so the page shows live progress from the run's progress.json, a stop is SIGINT (the
run writes its checkpoint), a restarted server lists every earlier run, and `xdreamer resume`
continues any of them. Runs wait in one queue and run one at a time per device.

Nothing typed in the page names a file: a run's folder is the slug of its prompt inside the runs
folder, runs are picked from the server's own listing, and overrides that name files are refused.
This module imports nothing heavy: Gradio comes with `xdreamer.app.page` when the command runs."""

from __future__ import annotations

import os
from pathlib import Path

from xdreamer.app.runs import AppError, RunQueue, device_envs


def add_arguments(parser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--runs", default="runs", help="the runs folder: every run of the page is a folder in it")
    parser.add_argument(
        "--model", default=None,
        help="the page's default model, added to its menu (default: toy on a CPU, SD 2.1-base on a GPU)",
    )


def run(args) -> int:
    # Gradio would otherwise send usage analytics from the server.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from xdreamer.app.page import build_page
    from xdreamer.config import PAPER_MODEL

    runs = Path(args.runs).resolve()
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AppError(f"cannot create the runs folder {runs}: {exc.strerror}") from None
    if not os.access(runs, os.W_OK | os.X_OK):
        raise AppError(f"the runs folder {runs} is not writable")
    envs = device_envs()
    default_model = args.model or ("toy" if envs == [None] else PAPER_MODEL)
    models = list(dict.fromkeys([default_model, "toy", PAPER_MODEL]))
    queue = RunQueue(envs)
    page = build_page(runs, queue, models, default_model)
    try:
        try:
            page.queue(default_concurrency_limit=None).launch(
                server_name=args.host, server_port=args.port, allowed_paths=[str(runs)], show_error=False,
                quiet=True, footer_links=[], run_history=False, theme=gr.themes.Default(), prevent_thread_lock=True,
            )
        except OSError as exc:
            reason = str(exc).splitlines()[0].split(". ")[0]
            raise AppError(
                f"cannot serve on {args.host}:{args.port} ({reason}): choose another --port or --host"
            ) from None
        print(f"xdreamer: serving the page on {page.local_url} with runs in {runs} (Ctrl-C stops)", flush=True)
        page.block_thread()
    finally:
        # Running runs stop cleanly (checkpoint written) before the server exits.
        queue.close()
    return 0
