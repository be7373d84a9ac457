"""Texture baking for export: xatlas UV unwrap, then the material network evaluated on every
texel of the atlas, with the gutters between charts filled so mip-mapping shows no seams.

Baked maps (all (S, S, C) float32, texture row 0 at glTF v = 0):
  kd (S, S, 3) linear base colour; roughness, metallic, occlusion (S, S, 1) (occlusion 0 =
  unoccluded, as in shading); normal (S, S, 3) tangent-space unit normal in [-1, 1], in the UV
  frame of `vertex_tangents`; mask (S, S, 1) 1 on texels covered by a chart.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from xdreamer.mesh import Mesh
from xdreamer.render.raster import Rasterizer
from xdreamer.render.shade import fallback_tangents, perturb_normal, vertex_tangents, welded_vertex_normals, world_to_tangent

CHANNELS = {"kd": 3, "roughness": 1, "metallic": 1, "occlusion": 1, "normal": 3}


class BakeError(ValueError):
    """A mesh or texture size that cannot be baked."""


def unwrap(mesh: Mesh, texture_size: int = 2048, padding: int = 4) -> Mesh:
    """UV-unwrap with xatlas: returns a Mesh whose vertices are duplicated along chart seams
    (xatlas's vmapping) with per-vertex uvs (V', 2) in [0, 1], glTF orientation. Charts are packed
    for `texture_size` texels with `padding` texels between them."""
    import xatlas

    if mesh.faces.shape[0] == 0:
        raise BakeError("cannot unwrap a mesh without triangles")
    vertices = mesh.vertices.detach().cpu().numpy().astype(np.float32)
    faces = mesh.faces.detach().cpu().numpy().astype(np.uint32)
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces)
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, indices, uvs = atlas[0]
    device = mesh.device
    return Mesh(
        vertices=mesh.vertices.detach()[torch.as_tensor(vmapping.astype(np.int64), device=device)],
        faces=torch.as_tensor(indices.astype(np.int64), device=device),
        uvs=torch.as_tensor(uvs, dtype=torch.float32, device=device),
    )


def fill_gutters(texture: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Give every uncovered texel the value of its nearest covered texel (an exact Euclidean
    dilation to infinity), so bilinear and mip-mapped lookups near chart edges read chart colours.
    texture: (S, S, C); covered: (S, S) bool -> (S, S, C)."""
    from scipy.ndimage import distance_transform_edt

    if not bool(covered.any()):
        return texture
    _, (rows, cols) = distance_transform_edt(~covered.cpu().numpy(), return_indices=True)
    rows = torch.as_tensor(rows, device=texture.device)
    cols = torch.as_tensor(cols, device=texture.device)
    return texture[rows, cols]


class NearestSurface:
    """The surface of `mesh` (its AABB tree built once), queried for the point nearest to given
    points and the smooth (welded, interpolated vertex) normal there."""

    def __init__(self, mesh: Mesh):
        import igl

        self.vertices = mesh.vertices.detach().cpu().double()
        self.faces = mesh.faces.detach().cpu()
        self.vertex_normals = welded_vertex_normals(mesh).detach().cpu().double()
        self._arrays = (self.vertices.numpy(), self.faces.numpy().astype(np.int64))
        self._tree = igl.AABB()
        self._tree.init(*self._arrays)

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points (N, 3) -> nearest points (N, 3) and unit normals (N, 3), on points.device."""
        _, face, nearest = self._tree.squared_distance(*self._arrays, points.detach().cpu().double().numpy())
        nearest = torch.as_tensor(nearest)
        corners = self.faces[torch.as_tensor(face)]  # (N, 3) vertex indices
        a, b, c = self.vertices[corners].unbind(1)
        # Barycentric coordinates of the nearest point in its triangle; on a sliver rounding can
        # push them out of [0, 1], so they are clamped and renormalized.
        e1, e2, d = b - a, c - a, nearest - a
        d11, d12, d22 = (e1 * e1).sum(-1), (e1 * e2).sum(-1), (e2 * e2).sum(-1)
        d1, d2 = (d * e1).sum(-1), (d * e2).sum(-1)
        denominator = (d11 * d22 - d12 * d12).clamp_min(1e-30)
        w1, w2 = (d22 * d1 - d12 * d2) / denominator, (d11 * d2 - d12 * d1) / denominator
        weights = torch.stack([1 - w1 - w2, w1, w2], -1).clamp_min(0)
        weights = (weights / weights.sum(-1, keepdim=True).clamp_min(1e-30))[..., None]  # (N, 3, 1)
        normal = F.normalize((self.vertex_normals[corners] * weights).sum(1), dim=-1)
        return nearest.to(points), normal.to(points)


@torch.no_grad()
def bake_textures(
    mesh: Mesh,
    material_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    size: int = 2048,
    chunk: int = 1 << 18,
    backend: str | Rasterizer = "auto",
    detail: Mesh | None = None,
) -> dict[str, torch.Tensor]:
    """Evaluate `material_fn` (render_pbr's contract) on every texel of the UV atlas of `mesh`
    (which needs uvs: see `unwrap`), `chunk` points at a time. The network's normal
    perturbation, defined in `fallback_tangents`' frame, is re-expressed in the UV tangent frame.
    With `detail` (the full mesh `mesh` was simplified from), every texel reads the material and
    the smooth normal at the nearest point of `detail`'s surface, so the normal map carries the
    full mesh's shading onto the simplified one. Returns the maps listed in the module docstring,
    on mesh.device."""
    if mesh.uvs is None:
        raise BakeError("bake_textures needs a mesh with uvs; call unwrap(mesh) first")
    if size < 8:
        raise BakeError(f"texture size must be at least 8, got {size}")
    rasterizer = backend if isinstance(backend, Rasterizer) else Rasterizer(backend)
    uv = mesh.uvs
    # Texture row 0 is v = 0 and image row 0 is NDC y = +1, so y = 1 - 2 v.
    pos_clip = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2, torch.zeros_like(uv[:, 0]), torch.ones_like(uv[:, 0])], -1)
    rast = rasterizer.rasterize(pos_clip[None], mesh.faces, (size, size))
    covered = rast[0, ..., 3] > 0
    index = covered.reshape(-1).nonzero()[:, 0]

    normals = welded_vertex_normals(mesh)
    tangents = vertex_tangents(mesh, normals)
    attributes = torch.cat([mesh.vertices, normals, tangents], dim=-1)
    texels = rasterizer.interpolate(attributes[None], rast, mesh.faces).reshape(-1, attributes.shape[-1])[index]
    position, normal, tangent = texels[:, 0:3], F.normalize(texels[:, 3:6], dim=-1), texels[:, 6:9]
    handedness = torch.where(texels[:, 9:10] < 0, -1.0, 1.0)

    values = {name: [] for name in CHANNELS}
    nearest = None if detail is None else NearestSurface(detail)
    for start in range(0, position.shape[0], chunk):
        stop = start + chunk
        n = normal[start:stop]
        surface, shading = position[start:stop], n
        if nearest is not None:
            found, found_normal = nearest(surface)
            # Where a part is thinner than the simplification moved it, the nearest point can be
            # on the sheet behind: such texels keep their own point and normal.
            front = (found_normal * n).sum(-1, keepdim=True) > 0
            surface, shading = torch.where(front, found, surface), torch.where(front, found_normal, shading)
        material = material_fn(surface)
        world = perturb_normal(shading, fallback_tangents(shading), material["normal_perturbation"])
        material["normal"] = F.normalize(world_to_tangent(world, n, tangent[start:stop], handedness[start:stop]), dim=-1)
        for name in CHANNELS:
            values[name].append(material[name].float())

    maps = {}
    for name, channels in CHANNELS.items():
        texture = torch.zeros(size * size, channels, device=mesh.device)
        if index.numel():
            texture[index] = torch.cat(values[name])
        maps[name] = fill_gutters(texture.reshape(size, size, channels), covered)
    maps["mask"] = covered[..., None].float()
    return maps


def texture_images(maps: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Baked maps -> 8-bit images (S, S, C) uint8 RGB as files store them: base_color (sRGB),
    roughness and metallic (grey, linear), orm (glTF packing: R = 1 - occlusion i.e. visibility,
    G = roughness, B = metallic, linear) and normal (tangent space, n * 0.5 + 0.5)."""
    from xdreamer.render.shade import linear_to_srgb

    def u8(x: torch.Tensor) -> np.ndarray:
        return (x.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()

    return {
        "base_color": u8(linear_to_srgb(maps["kd"])),
        "roughness": u8(maps["roughness"])[..., 0],
        "metallic": u8(maps["metallic"])[..., 0],
        "orm": u8(torch.cat([1 - maps["occlusion"], maps["roughness"], maps["metallic"]], -1)),
        "normal": u8(maps["normal"] * 0.5 + 0.5),
    }


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 RGB -> PNG bytes."""
    import cv2

    ok, data = cv2.imencode(".png", image[..., ::-1] if image.ndim == 3 else image)
    if not ok:
        raise BakeError("PNG encoding failed")
    return data.tobytes()
