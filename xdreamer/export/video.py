"""Turntable videos: H.264 mp4 through imageio-ffmpeg, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from xdreamer.atomic import atomic_path


class VideoError(ValueError):
    """Frames that cannot make a video: none, not (H, W, 3) uint8, or of different sizes."""


def write_video(frames: Sequence[np.ndarray] | np.ndarray, path: str | Path, fps: int = 24) -> Path:
    """frames: N x (H, W, 3) uint8 -> `path` (.mp4, libx264, yuv420p). Odd sizes are padded with
    one black row / column because yuv420p needs even dimensions."""
    frames = [np.asarray(frame) for frame in frames]
    if not frames:
        raise VideoError("no frames to write")
    shape = frames[0].shape
    for frame in frames:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoError(f"video frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        if frame.shape != shape:
            raise VideoError(f"video frames differ in size: {shape} and {frame.shape}")
    if fps <= 0:
        raise VideoError(f"fps must be positive, got {fps}")
    import imageio_ffmpeg

    height, width = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            quality=8,
        )
        writer.send(None)
        for frame in frames:
            padded = np.zeros((height, width, 3), dtype=np.uint8)
            padded[: shape[0], : shape[1]] = frame
            writer.send(np.ascontiguousarray(padded))
        writer.close()
    return path
