"""The Gradio page: the form, the live run, the result in 3D, and the past runs."""

from pathlib import Path

import gradio as gr
import imageio.v3 as iio
import numpy as np

from xdreamer.app.runs import (
    AppError,
    RunQueue,
    check_request,
    describe,
    find_run,
    latest_image,
    list_runs,
    new_run_name,
    obj_zip,
    run_prompt,
    run_state,
    thumbnail,
)
from xdreamer.batch import cli_argv, generate_args
from xdreamer.config import ConfigError, preset_names

POLL_SECONDS = 1.0
PRESET_VIEWS = "preset"  # the views menu's "as the preset says"
PLACEHOLDER = np.full((64, 64, 3), 220, dtype=np.uint8)  # the thumbnail of a run with no image yet


def first_view(run_dir: Path) -> np.ndarray:
    """(H, H, 3) uint8: the first view of the run's latest validation strip (its views side by side)."""
    path = thumbnail(run_dir)
    if path is None:
        return PLACEHOLDER
    strip = iio.imread(path)[..., :3]
    return strip[:, : strip.shape[0]]


def build_page(runs: Path, queue: RunQueue, models: list[str], default_model: str) -> gr.Blocks:
    """The page over the runs folder `runs`; every run goes through `queue`."""

    def gallery() -> tuple[list, list[str]]:
        found = list_runs(runs)
        items = [(first_view(run_dir), f"{run_prompt(run_dir)} — {run_state(run_dir, queue)}") for run_dir in found]
        return items, [p.name for p in found]

    def selected(current: str | None) -> Path | None:
        """The session's run: one of the listing, or one still waiting for its folder."""
        if not current:
            return None
        return find_run(runs, current) or (runs / current if current in queue.waiting_names() else None)

    def on_generate(prompt, model, preset, seed, views, advanced):
        views = None if views == PRESET_VIEWS else int(views)
        try:
            overrides = check_request(prompt, model, preset, seed, views, advanced, models)
        except (ConfigError, AppError) as exc:
            return gr.skip(), f"**Not started:** {str(exc).splitlines()[0]}"
        name = new_run_name(runs, prompt, queue.waiting_names())
        args = generate_args(
            prompt.strip(), runs / name, model=model, preset=preset, seed=None if seed is None else int(seed),
            views=views, overrides=overrides,
        )
        queue.submit(runs / name, cli_argv(*args))
        return name, ""

    def on_stop(current):
        run_dir = selected(current)
        if run_dir is None or not queue.stop(run_dir):
            return "Nothing to stop: this run is neither queued nor running."
        return ""

    def on_resume(current):
        run_dir = find_run(runs, current)
        if run_dir is None:
            return "Pick a run first: click it under Past runs."
        state = run_state(run_dir, queue)
        if state in ("done", "queued", "running"):
            return f"Run {current} is {state}: nothing to resume."
        queue.submit(run_dir, cli_argv("resume", str(run_dir)))
        return ""

    def on_select(names: list[str], evt: gr.SelectData):
        return names[evt.index], ""

    def poll(current, seen):
        """Status every tick; the image, the result and the gallery only when they changed."""
        seen = dict(seen)
        run_dir = selected(current)
        status = describe(run_dir, queue) if run_dir else "Type a prompt and press **Generate**."
        image = latest_image(run_dir) if run_dir and run_dir.is_dir() else None
        done = run_dir is not None and run_state(run_dir, queue) == "done"
        image_update = gallery_update = names_update = gr.skip()
        result_update = [gr.skip()] * 4
        if str(image) != seen.get("image"):
            seen["image"] = str(image)
            image_update = None if image is None else str(image)
        result = current if done else ""
        if result != seen.get("result"):
            seen["result"] = result
            if done:
                glb = str(run_dir / "export" / "model.glb")
                result_update = [
                    glb, str(run_dir / "turntable.mp4"), gr.update(value=glb, interactive=True),
                    gr.update(value=str(obj_zip(run_dir)), interactive=True),
                ]
            else:
                empty = gr.update(value=None, interactive=False)
                result_update = [None, None, empty, empty]
        listing = [(p.name, run_state(p, queue), str(thumbnail(p))) for p in list_runs(runs)]
        if listing != seen.get("listing"):
            seen["listing"] = listing
            gallery_update, names_update = gallery()
        return (status, image_update, *result_update, gallery_update, names_update, seen)

    with gr.Blocks(title="xdreamer") as page:
        current = gr.State(None)
        seen = gr.State({})
        names = gr.State([])
        gr.Markdown(
            "# xdreamer — text to 3D\nType a prompt, watch the mesh and its material being optimized, "
            "then look at the asset in 3D and download it."
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="a red cube", elem_id="prompt")
                with gr.Row():
                    model = gr.Dropdown(models, value=default_model, label="Model", elem_id="model")
                    preset = gr.Dropdown(
                        preset_names(), value="toy" if default_model == "toy" else "paper", label="Preset",
                        elem_id="preset",
                    )
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    views = gr.Dropdown(
                        [("the preset's", PRESET_VIEWS), "1", "2", "4", "8"], value=PRESET_VIEWS,
                        label="Views per step", elem_id="views",
                    )
                with gr.Accordion("Advanced: KEY=VALUE overrides", open=False, elem_id="advanced-accordion"):
                    advanced = gr.Textbox(
                        label="Overrides", lines=3, elem_id="advanced",
                        placeholder='geometry.iters=500 ama.weight=0.2 negative_prompt="blurry"',
                        info="Any config key, as on the command line (see xdreamer/config.py).",
                    )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", scale=2, elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                    resume = gr.Button("Resume", scale=1, min_width=80, elem_id="resume")
                message = gr.Markdown(elem_id="message")
                status = gr.Markdown(elem_id="status")
                image = gr.Image(label="Latest image of the run", interactive=False, elem_id="validation")
            with gr.Column(scale=3):
                viewer = gr.Model3D(label="Asset (GLB)", height=480, elem_id="viewer")
                video = gr.Video(
                    label="Turntable", interactive=False, autoplay=True, loop=True, height=320, elem_id="turntable"
                )
                with gr.Row():
                    glb = gr.DownloadButton("Download GLB", interactive=False, elem_id="download-glb")
                    obj = gr.DownloadButton(
                        "Download OBJ + MTL + textures (.zip)", interactive=False, elem_id="download-obj"
                    )
        with gr.Accordion("Past runs", open=True):
            runs_gallery = gr.Gallery(
                label="Runs (click one to show it)", columns=6, fit_columns=False, height=260,
                object_fit="contain", allow_preview=False, elem_id="runs",
            )
        timer = gr.Timer(POLL_SECONDS)

        model.change(lambda m: "toy" if m == "toy" else "paper", model, preset)
        generate.click(on_generate, [prompt, model, preset, seed, views, advanced], [current, message])
        stop.click(on_stop, current, message)
        resume.click(on_resume, current, message)
        runs_gallery.select(on_select, names, [current, message])
        outputs = [status, image, viewer, video, glb, obj, runs_gallery, names, seen]
        for event in (timer.tick, page.load):
            event(poll, [current, seen], outputs, show_progress="hidden", concurrency_limit=None)
    return page
