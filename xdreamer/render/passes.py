"""Geometry passes: the world-space normal map, antialiased mask and depth the geometry stage sees."""

from __future__ import annotations

import torch

from xdreamer.mesh import Mesh
from xdreamer.render.camera import Cameras
from xdreamer.render.raster import Rasterizer, RasterError, antialias_each, edge_neighbors, interpolate, rasterize


def clip_positions(vertices: torch.Tensor, cameras: Cameras, resolution: tuple[int, int]) -> torch.Tensor:
    """(V, 3) world-space vertices -> (B, V, 4) OpenGL clip-space positions for each camera."""
    height, width = resolution
    mvp = cameras.mvp(aspect=width / height).to(vertices.dtype)
    homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=-1)
    return homogeneous @ mvp.transpose(1, 2)


def render_geometry(
    mesh: Mesh,
    cameras: Cameras,
    resolution: int | tuple[int, int],
    backend: str | Rasterizer = "auto",
    silhouette_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Rasterize `mesh` from every camera.

    `silhouette_weight` scales the gradient that reaches the vertices through the antialiased
    silhouette (how far an edge pixel's coverage moves with them) against the shading's; the
    outputs' values do not depend on it.

    Returns normal (B, H, W, 3) world-space interpolated vertex normals in [-1, 1], antialiased
    over a 0 background; mask (B, H, W, 1) antialiased coverage in [0, 1] whose gradients reach
    the vertices through the silhouette; depth (B, H, W) distance along each camera's view axis,
    0 on background; rast (B, H, W, 4) and pos_clip (B, V, 4) for further passes."""
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if min(resolution) < 1:
        raise RasterError(f"resolution must be positive, got {resolution[0]}x{resolution[1]}")
    rasterizer = backend if isinstance(backend, Rasterizer) else Rasterizer(backend)
    cameras = cameras.to(mesh.device)
    pos_clip = clip_positions(mesh.vertices, cameras, resolution)
    rast = rasterize(pos_clip, mesh.faces, resolution, rasterizer)
    covered = (rast[..., 3:] > 0).to(pos_clip.dtype)
    neighbors = edge_neighbors(mesh.faces)

    normal = interpolate(mesh.vertex_normals(), rast, mesh.faces, rasterizer)
    # Interpolated unit normals are shorter than 1 inside a triangle; background stays 0.
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    edge_pos = pos_clip
    if silhouette_weight != 1.0:  # pos + w (pos - pos) is pos exactly; its gradient is w times pos's
        edge_pos = pos_clip.detach() + silhouette_weight * (pos_clip - pos_clip.detach())
    normal, mask = antialias_each([normal, covered], rast, edge_pos, mesh.faces, rasterizer, neighbors)
    # Clip-space w is the distance along the view axis for an OpenGL perspective projection.
    depth = interpolate(pos_clip[..., 3:4], rast, mesh.faces, rasterizer)[..., 0]
    return {"normal": normal, "mask": mask, "depth": depth, "rast": rast, "pos_clip": pos_clip}
