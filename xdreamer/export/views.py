"""`xdreamer render`: normal maps, masks, depths and a turntable of a mesh, with nerfstudio cameras.

Files written to `out_dir` (XXXX = view index):
  normal_XXXX.png   RGB uint8, world-space normal * 0.5 + 0.5 over a BLACK background (antialiased)
  mask_XXXX.png     grayscale uint8 antialiased coverage
  depth_XXXX.npy    (H, W) float32 distance along the view axis, 0 on background
  transforms.json   nerfstudio format: OPENCV intrinsics (no distortion) and per-frame OpenGL
                    camera-to-world `transform_matrix`, file_path / mask_path / depth_file_path
  turntable.mp4     normal-map turntable at the same elevation, radius and field of view
The mesh is drawn where it is in its file (no recentring or rescaling).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from xdreamer.atomic import atomic_path, write_json
from xdreamer.export.video import write_video
from xdreamer.mesh import Mesh, load_mesh
from xdreamer.render.camera import Cameras, orbit_cameras
from xdreamer.render.passes import render_geometry
from xdreamer.render.raster import Rasterizer


class ViewsError(ValueError):
    """Bad `xdreamer render` settings: view count, resolution, radius or field of view."""


def _check(views: int, resolution: int, radius: float, fov: float, turntable_frames: int) -> None:
    if int(views) != views or views < 1:
        raise ViewsError(f"--views must be a positive integer, got {views}")
    if int(resolution) != resolution or not 8 <= resolution <= 4096:
        raise ViewsError(f"--resolution must be an integer in [8, 4096], got {resolution}")
    if not (math.isfinite(radius) and radius > 0):
        raise ViewsError(f"--radius must be positive, got {radius}")
    if not 0 < fov < 180:
        raise ViewsError(f"--fov must be in (0, 180) degrees, got {fov}")
    if int(turntable_frames) != turntable_frames or turntable_frames < 0:
        raise ViewsError(f"turntable frames must be a non-negative integer, got {turntable_frames}")


def _write_image(path: Path, image: np.ndarray) -> None:
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _render(mesh: Mesh, cameras: Cameras, resolution: int, rasterizer: Rasterizer, batch: int, progress):
    """Yield (index, normal image (H, W, 3) uint8, mask (H, W) uint8, depth (H, W) float32)."""
    for start in range(0, len(cameras), batch):
        with torch.no_grad():
            out = render_geometry(mesh, cameras[start : start + batch], resolution, rasterizer)
        # Premultiplied over black: the antialiased normal already fades to 0 at the silhouette.
        normal = _to_uint8(out["normal"] * 0.5 + 0.5 * out["mask"])
        mask = _to_uint8(out["mask"][..., 0])
        depth = out["depth"].float().cpu().numpy()
        for offset in range(normal.shape[0]):
            yield start + offset, normal[offset], mask[offset], depth[offset]
            progress.update(1)


def render_mesh_views(
    mesh: Mesh | str | Path,
    out_dir: str | Path,
    views: int = 8,
    resolution: int = 512,
    elevation: float = 15.0,
    radius: float = 3.0,
    fov: float = 40.0,
    backend: str | Rasterizer = "auto",
    turntable_frames: int = 72,
    fps: int = 24,
    batch: int = 4,
    show_progress: bool = True,
) -> Path:
    """Render `views` orbit views of `mesh` (a Mesh or a mesh file) into `out_dir` (see the module
    docstring for the files), plus a `turntable_frames`-frame turntable (0: no video).
    Angles in degrees. Returns the path of transforms.json."""
    from tqdm import tqdm

    _check(views, resolution, radius, fov, turntable_frames)
    if not isinstance(mesh, Mesh):
        mesh = load_mesh(mesh, "cuda" if torch.cuda.is_available() else "cpu")
    mesh = mesh.detach()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rasterizer = backend if isinstance(backend, Rasterizer) else Rasterizer(backend)
    cameras = orbit_cameras(views, elevation, radius, fov).to(mesh.device)
    turntable = orbit_cameras(turntable_frames, elevation, radius, fov).to(mesh.device) if turntable_frames else None

    frames, video = [], []
    with tqdm(total=views + turntable_frames, desc="render", unit="view", disable=not show_progress) as progress:
        for index, normal, mask, depth in _render(mesh, cameras, resolution, rasterizer, batch, progress):
            names = {"file_path": f"normal_{index:04d}.png", "mask_path": f"mask_{index:04d}.png"}
            names["depth_file_path"] = f"depth_{index:04d}.npy"
            _write_image(out_dir / names["file_path"], normal)
            _write_image(out_dir / names["mask_path"], mask)
            with atomic_path(out_dir / names["depth_file_path"]) as tmp:
                np.save(tmp, depth.astype(np.float32))
            c2w = cameras.c2w[index].double().cpu().tolist()
            frames.append({**names, "transform_matrix": c2w, "elevation": elevation, "azimuth": float(cameras.azimuth[index])})
        if turntable is not None:
            for _, normal, _, _ in _render(mesh, turntable, resolution, rasterizer, batch, progress):
                video.append(normal)
    if video:
        write_video(video, out_dir / "turntable.mp4", fps=fps)

    fl_x, fl_y, cx, cy = cameras.intrinsics(resolution, resolution)[0].tolist()
    transforms = {
        "camera_model": "OPENCV",
        "fl_x": fl_x,
        "fl_y": fl_y,
        "cx": cx,
        "cy": cy,
        "w": resolution,
        "h": resolution,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": frames,
    }
    write_json(out_dir / "transforms.json", transforms)
    return out_dir / "transforms.json"
