"""Differentiable rasterization with nvdiffrast's interface: rasterize, interpolate, antialias.

Two backends give the same outputs: "torch" (pure PyTorch, any device, the reference) and
"nvdiffrast" (CUDA, imported lazily). "auto" picks nvdiffrast for CUDA tensors when a context can
actually be created on their device (tried once per process and device: the `cuda` extra builds
nvdiffrast's plugin at that moment), else torch, saying why in one warning per process.
Asking for "nvdiffrast" where it cannot run is a one-line RasterError.

Layout (shared with nvdiffrast, but image row 0 is the TOP, NDC y = +1):
  rast: (B, H, W, 4) = (u, v, z/w, triangle_id + 1), all 0 on background; u, v are the
  perspective-correct barycentrics of vertices 0 and 1 (vertex 2 gets 1 - u - v). Pixel (x, y)
  has its centre at NDC ((x + 0.5) / W * 2 - 1, 1 - (y + 0.5) / H * 2).

Gradients: rasterize's visibility has none, but `rast`'s u, v, z/w channels are differentiable
functions of `pos_clip` (as in nvdiffrast), so `interpolate(attr, rast, faces)` passes gradients
to both `attr` and the vertex positions; `antialias` adds the gradients of silhouette edges.

Triangles with a vertex at w <= 0 are rasterized in homogeneous coordinates (no clipping needed)
and cut per pixel at the near and far planes (-1 <= z/w <= 1).

nvdiffrast's CUDA contexts are made once per device and process and shared by every
`Rasterizer`, so the module functions may take a backend name as cheaply as a `Rasterizer`.
"""

from __future__ import annotations

import functools
import warnings

import torch

from xdreamer.render import _raster_nvdiffrast, _raster_torch

BACKENDS = ("auto", "torch", "nvdiffrast")


class RasterError(ValueError):
    """Bad rasterizer input: unknown backend, bad resolution, wrong tensor shapes."""


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    height, width = (int(r) for r in resolution)
    if height < 1 or width < 1:
        raise RasterError(f"resolution must be positive, got {height}x{width}")
    return height, width


def _batched(tensor: torch.Tensor, name: str, last: int | None = None) -> torch.Tensor:
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3 or (last is not None and tensor.shape[-1] != last):
        expected = f"(V, {last}) or (B, V, {last})" if last else "(V, C) or (B, V, C)"
        raise RasterError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    return tensor


def _faces(faces: torch.Tensor) -> torch.Tensor:
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise RasterError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    return faces.long()


class Rasterizer:
    """A backend choice: "auto", "torch" or "nvdiffrast" (see the module docstring)."""

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise RasterError(f"unknown rasterizer backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend

    def backend_for(self, device: str | torch.device) -> str:
        """The backend ("torch" or "nvdiffrast") that runs for tensors on `device`."""
        device = torch.device(device)
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cuda"):
            return "torch"
        if device.type != "cuda":
            raise RasterError(f"the nvdiffrast backend needs CUDA tensors, got device {device}")
        context = _raster_nvdiffrast.context_for(_indexed(device))
        if isinstance(context, str):
            if self.backend == "nvdiffrast":
                raise RasterError(f"the nvdiffrast backend cannot run on {device}: {context}")
            _warn_once(f"nvdiffrast cannot run on {device.type}: {context}; using the torch rasterizer")
            return "torch"
        return "nvdiffrast"

    def _context(self, device: torch.device) -> _raster_nvdiffrast.NvdiffrastContext:
        return _raster_nvdiffrast.context_for(_indexed(device))

    def rasterize(
        self, pos_clip: torch.Tensor, faces: torch.Tensor, resolution: int | tuple[int, int]
    ) -> torch.Tensor:
        """pos_clip: (B, V, 4) or (V, 4) clip space; faces: (F, 3) int -> rast (B, H, W, 4)."""
        pos_clip, faces, resolution = _batched(pos_clip, "pos_clip", 4), _faces(faces), _resolution(resolution)
        if self.backend_for(pos_clip.device) == "nvdiffrast":
            return self._context(pos_clip.device).rasterize(pos_clip, faces, resolution)
        return _raster_torch.rasterize(pos_clip, faces, resolution)

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """attr: (B, V, C), (1, V, C) or (V, C) per-vertex values -> (B, H, W, C), 0 on background."""
        attr, faces = _batched(attr, "attr"), _faces(faces)
        if attr.shape[0] not in (1, rast.shape[0]):
            raise RasterError(f"attr batch {attr.shape[0]} does not match rast batch {rast.shape[0]}")
        if self.backend_for(attr.device) == "nvdiffrast":
            return self._context(attr.device).interpolate(attr, rast, faces)
        return _raster_torch.interpolate(attr, rast, faces)

    def antialias(
        self,
        color: torch.Tensor,
        rast: torch.Tensor,
        pos_clip: torch.Tensor,
        faces: torch.Tensor,
        neighbors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """color: (B, H, W, C) -> (B, H, W, C) with silhouette edges blended and differentiable.

        `pos_clip` and `faces` must be the ones `rast` was made from; `neighbors` (torch backend
        only) is `edge_neighbors(faces)`, computed when not given."""
        return self.antialias_each([color], rast, pos_clip, faces, neighbors)[0]

    def antialias_each(
        self,
        colors: list[torch.Tensor],
        rast: torch.Tensor,
        pos_clip: torch.Tensor,
        faces: torch.Tensor,
        neighbors: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """colors: images (B, H, W, C_i) of one rasterization -> each antialiased, equal to its own
        `antialias` call; the torch backend finds the silhouettes once for all of them."""
        pos_clip, faces = _batched(pos_clip, "pos_clip", 4), _faces(faces)
        if self.backend_for(pos_clip.device) == "nvdiffrast":
            context = self._context(pos_clip.device)
            return [context.antialias(color, rast, pos_clip, faces) for color in colors]
        return _raster_torch.antialias_each(colors, rast, pos_clip, faces, neighbors)


def _indexed(device: torch.device) -> torch.device:
    """The bare "cuda" means the current device, so "cuda" and "cuda:0" share one context."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _rasterizer(backend: str | Rasterizer) -> Rasterizer:
    return backend if isinstance(backend, Rasterizer) else Rasterizer(backend)


def rasterize(
    pos_clip: torch.Tensor,
    faces: torch.Tensor,
    resolution: int | tuple[int, int],
    backend: str | Rasterizer = "auto",
) -> torch.Tensor:
    """pos_clip: (B, V, 4) or (V, 4) OpenGL clip space; faces: (F, 3) int; resolution: (H, W)
    -> rast: (B, H, W, 4) = (u, v, z/w, triangle_id + 1), row 0 at the top."""
    return _rasterizer(backend).rasterize(pos_clip, faces, resolution)


def interpolate(
    attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor, backend: str | Rasterizer = "auto"
) -> torch.Tensor:
    """attr: (B, V, C) or (V, C); rast from `rasterize` -> (B, H, W, C), perspective-correct,
    0 on background; differentiable in `attr` and (through `rast`) in the vertex positions."""
    return _rasterizer(backend).interpolate(attr, rast, faces)


def antialias(
    color: torch.Tensor,
    rast: torch.Tensor,
    pos_clip: torch.Tensor,
    faces: torch.Tensor,
    backend: str | Rasterizer = "auto",
    neighbors: torch.Tensor | None = None,
) -> torch.Tensor:
    """color: (B, H, W, C) shaded image -> (B, H, W, C) with silhouettes antialiased; gradients
    reach `pos_clip` through the silhouette edges (Laine et al. 2020)."""
    return _rasterizer(backend).antialias(color, rast, pos_clip, faces, neighbors)


def antialias_each(
    colors: list[torch.Tensor],
    rast: torch.Tensor,
    pos_clip: torch.Tensor,
    faces: torch.Tensor,
    backend: str | Rasterizer = "auto",
    neighbors: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """`antialias` of several images of one rasterization (e.g. a normal map and its mask), each
    result equal to its own call; on the torch backend the silhouette search runs once."""
    return _rasterizer(backend).antialias_each(colors, rast, pos_clip, faces, neighbors)


def edge_neighbors(faces: torch.Tensor) -> torch.Tensor:
    """(F, 3) faces -> (F, 3) the face across the edge opposite each vertex, -1 on a boundary.

    Pass it to `antialias` to reuse it across calls with the same faces."""
    return _raster_torch.edge_neighbors(_faces(faces))
