"""Peak memory of a run's steps against views and render resolution (CPU, toy model), the numbers
behind the `--views` check in xdreamer/pipeline/checks.py.

Each configuration runs in its own process (peak RSS is per process): a few geometry and
appearance steps with AMA on from the first step (its backward through the UNet is the largest
graph), then the process's peak resident memory. The per-view-pixel cost is the slope against
views x pixels over a small baseline.

    python benchmarks/bench_memory.py [--configs 1x64,8x128,8x256,16x256,4x512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, tempfile, pathlib
from xdreamer.config import load_config
from xdreamer.pipeline import Run, _load_guidance
from xdreamer.distributed import DataParallel
from xdreamer.rundir import RunPaths
import torch
views, res = int(sys.argv[1]), int(sys.argv[2])
cfg = load_config(preset="toy", prompt="a red cube", views=views, device="cpu", overrides=[
    f"geometry.render_resolution={res}", f"appearance.render_resolution={res}",
    "ama.start_geometry=0", "ama.start_appearance=0", "ama.visualize_every=0", "validate_every=0",
    "geometry.iters=3", "appearance.iters=3"])
paths = RunPaths(pathlib.Path(tempfile.mkdtemp()))
paths.make()
run = Run(cfg, paths, _load_guidance(cfg, torch.device("cpu")), torch.device("cpu"), DataParallel())
run.geometry.initialize()
run.state.stage = "geometry"
for _ in range(3):
    run._one_step(run.geometry); run.state.step += 1
run._build_appearance(); run.state.stage, run.state.step = "appearance", 0
for _ in range(3):
    run._one_step(run.appearance); run.state.step += 1
print(json.dumps({"views": views, "resolution": res,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(views: int, resolution: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(views), str(resolution)], capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1x64,8x128,8x256,16x256,4x512", help="VIEWSxRESOLUTION, comma-separated")
    args = parser.parse_args()
    rows = [measure(*map(int, c.split("x"))) for c in args.configs.split(",")]
    base = min(rows, key=lambda r: r["views"] * r["resolution"] ** 2)
    print("| views | resolution | peak RSS MB | bytes per view pixel over the baseline |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        extra = r["views"] * r["resolution"] ** 2 - base["views"] * base["resolution"] ** 2
        slope = (r["peak_mb"] - base["peak_mb"]) * 2**20 / extra if extra else float("nan")
        print(f"| {r['views']} | {r['resolution']} | {r['peak_mb']:.0f} | {slope:.0f} |")


if __name__ == "__main__":
    main()
