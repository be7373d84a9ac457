"""Where generated assets (tet grids, lookup tables) are cached: $XDREAMER_CACHE or ~/.cache/xdreamer."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("XDREAMER_CACHE", Path.home() / ".cache" / "xdreamer"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
