"""Physically based shading with split-sum image-based lighting, and the PBR renders built on it.

Material channels (the MaterialNetwork's outputs and the baked textures alike):
  kd (..., 3) linear base colour in [0, 1]; roughness (..., 1) perceptual (GGX alpha = r^2);
  metallic (..., 1); occlusion (..., 1) with 0 = unoccluded (shading is scaled by 1 - occlusion,
  as in nvdiffrec); normal_perturbation (..., 3) a tangent-space normal (xy in [-1, 1], z >= 0,
  not necessarily unit).

Tangent frames. `render_pbr` (the material network) uses `fallback_tangents`, a frame that
depends only on the surface normal, so a trained network stays valid after the mesh is
re-meshed or UV-unwrapped; `bake_textures` converts its normals into the UV frame of
`vertex_tangents`, which `render_textured` and exported assets use (MikkTSpace-style: T = dP/du,
B = dP/d(1 - v), handedness in w, so OpenGL / glTF "+Y up" normal maps come out right).

UVs follow glTF: u to the right, v down, (0, 0) is the top-left texel of the image (row 0).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from xdreamer.mesh import Mesh
from xdreamer.render.camera import Cameras
from xdreamer.render.light import EnvironmentLight
from xdreamer.render.raster import Rasterizer, edge_neighbors

MaterialFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """sRGB transfer function (IEC 61966-2-1) on linear values, clamped to [0, 1]."""
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """Inverse of linear_to_srgb on values in [0, 1]."""
    x = x.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)


def split_sum_shade(
    normal: torch.Tensor,
    view_dir: torch.Tensor,
    kd: torch.Tensor,
    roughness: torch.Tensor,
    metallic: torch.Tensor,
    occlusion: torch.Tensor,
    light: EnvironmentLight,
    specular: bool = True,
) -> torch.Tensor:
    """Linear radiance (..., 3) of a GGX/Lambert surface under `light`, split-sum approximation.

    normal, view_dir: (..., 3) unit, world space, view_dir points from the surface to the eye;
    kd: (..., 3); roughness, metallic, occlusion: (..., 1)."""
    diffuse_colour = kd * (1 - metallic)
    shaded = diffuse_colour * light.diffuse(normal)
    if specular:
        n_dot_v = _dot(normal, view_dir).clamp(1e-4, 1)
        reflected = F.normalize(2 * n_dot_v * normal - view_dir, dim=-1)
        f0 = 0.04 * (1 - metallic) + kd * metallic
        terms = light.split_sum_terms(n_dot_v, roughness)
        shaded = shaded + light.specular(reflected, roughness) * (f0 * terms[..., 0:1] + terms[..., 1:2])
    return shaded * (1 - occlusion)


def fallback_tangents(normal: torch.Tensor) -> torch.Tensor:
    """(..., 3) unit normals -> (..., 3) unit tangents from a fixed world axis: +y x n, or
    +x x n where the normal is (nearly) vertical."""
    up = torch.zeros_like(normal)
    up[..., 1] = 1
    side = torch.zeros_like(normal)
    side[..., 0] = 1
    axis = torch.where(normal[..., 1:2].abs() > 0.999, side, up)
    return F.normalize(torch.cross(axis, normal, dim=-1), dim=-1)


def welded_vertex_normals(mesh: Mesh) -> torch.Tensor:
    """(V, 3) smooth normals averaged across UV seams (vertices at the same position share one)."""
    unique, inverse = torch.unique(mesh.vertices.detach(), dim=0, return_inverse=True)
    if unique.shape[0] == mesh.vertices.shape[0]:
        return mesh.vertex_normals()
    # Keep the original (differentiable) coordinates: scatter any representative per position.
    representative = torch.zeros(unique.shape[0], dtype=torch.long, device=mesh.device)
    representative.scatter_(0, inverse, torch.arange(inverse.shape[0], device=mesh.device))
    welded = Mesh(mesh.vertices[representative], inverse[mesh.faces])
    return welded.vertex_normals()[inverse]


def vertex_tangents(mesh: Mesh, normals: torch.Tensor | None = None) -> torch.Tensor:
    """(V, 4) per-vertex tangents from the UVs: xyz = dP/du orthogonalized against the normal,
    w = +-1 handedness so that bitangent = w * (normal x tangent) = dP/d(1 - v).

    Needs mesh.uvs (glTF convention); degenerate UV triangles contribute nothing and vertices with
    no usable tangent get `fallback_tangents`."""
    if mesh.uvs is None:
        raise ValueError("vertex_tangents needs a mesh with uvs")
    if normals is None:
        normals = welded_vertex_normals(mesh)
    p = mesh.vertices[mesh.faces]  # (F, 3, 3)
    uv = mesh.uvs[mesh.faces].clone()  # (F, 3, 2)
    uv[..., 1] = 1 - uv[..., 1]  # OpenGL texture orientation: bitangent points up the image
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    d1, d2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    # (dP/du, dP/dv) * |det|: each face's frame weighted by its UV area; sign(det) = 0 drops
    # faces with degenerate UVs.
    sign = det.sign()[:, None]
    tangent_face = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * sign
    bitangent_face = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * sign
    tangent = torch.zeros_like(mesh.vertices)
    bitangent = torch.zeros_like(mesh.vertices)
    for i in range(3):
        tangent = tangent.index_add(0, mesh.faces[:, i], tangent_face)
        bitangent = bitangent.index_add(0, mesh.faces[:, i], bitangent_face)
    tangent = tangent - normals * _dot(normals, tangent)
    usable = tangent.norm(dim=-1, keepdim=True) > 1e-12
    tangent = torch.where(usable, F.normalize(tangent, dim=-1), fallback_tangents(normals))
    handedness = torch.where(_dot(torch.cross(normals, tangent, dim=-1), bitangent) < 0, -1.0, 1.0)
    return torch.cat([tangent, handedness], dim=-1)


def perturb_normal(
    normal: torch.Tensor, tangent: torch.Tensor, normal_perturbation: torch.Tensor, handedness: torch.Tensor | None = None
) -> torch.Tensor:
    """Tangent-space normal mapping: normalize(t x + b y + n z) with t Gram-Schmidt'ed against n
    and b = handedness * (n x t). normal, tangent, normal_perturbation: (..., 3);
    handedness: (..., 1) of +-1 (default +1) -> (..., 3) unit world normals."""
    normal = F.normalize(normal, dim=-1)
    tangent = F.normalize(tangent - normal * _dot(normal, tangent), dim=-1)
    bitangent = torch.cross(normal, tangent, dim=-1)
    if handedness is not None:
        bitangent = bitangent * handedness
    p = normal_perturbation
    return F.normalize(tangent * p[..., 0:1] + bitangent * p[..., 1:2] + normal * p[..., 2:3], dim=-1)


def world_to_tangent(
    world_normal: torch.Tensor, normal: torch.Tensor, tangent: torch.Tensor, handedness: torch.Tensor
) -> torch.Tensor:
    """Inverse of perturb_normal for unit normals: world (..., 3) -> tangent-space (..., 3)."""
    normal = F.normalize(normal, dim=-1)
    tangent = F.normalize(tangent - normal * _dot(normal, tangent), dim=-1)
    bitangent = torch.cross(normal, tangent, dim=-1) * handedness
    return torch.cat([_dot(world_normal, tangent), _dot(world_normal, bitangent), _dot(world_normal, normal)], -1)


def _background(background, batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """A colour tuple, (3,), (H, W, 3) or (B, H, W, 3) sRGB -> (B, H, W, 3)."""
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.dim() == 1:
        bg = bg.view(1, 1, 1, -1)
    elif bg.dim() == 3:
        bg = bg[None]
    return bg.expand(batch, height, width, 3)


def _rasterize_views(mesh: Mesh, cameras: Cameras, resolution, rasterizer: Rasterizer):
    """Clip positions (B, V, 4) and rast (B, H, W, 4) of `mesh` seen by `cameras`."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    homogeneous = F.pad(mesh.vertices, (0, 1), value=1.0)
    mvp = cameras.mvp(aspect=width / height).to(mesh.vertices)
    pos_clip = torch.einsum("bij,vj->bvi", mvp, homogeneous)
    return pos_clip, rasterizer.rasterize(pos_clip, mesh.faces, resolution)


def _shade_and_composite(
    mesh: Mesh,
    cameras: Cameras,
    resolution,
    light: EnvironmentLight,
    background,
    backend: str | Rasterizer,
    material_at: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    attributes: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The shared body of render_pbr and render_textured: rasterize, interpolate `attributes`
    (name -> (V, C)), ask `material_at(covered pixel attributes)` for the material and a shading
    normal, shade, convert to sRGB, composite and antialias."""
    rasterizer = backend if isinstance(backend, Rasterizer) else Rasterizer(backend)
    pos_clip, rast = _rasterize_views(mesh, cameras, resolution, rasterizer)
    batch, height, width = rast.shape[:3]
    covered = rast[..., 3] > 0  # (B, H, W)
    index = covered.reshape(-1).nonzero()[:, 0]

    pixels = {}
    names = list(attributes)
    stacked = torch.cat([attributes[n] for n in names], dim=-1)
    interpolated = rasterizer.interpolate(stacked[None], rast, mesh.faces).reshape(-1, stacked.shape[-1])[index]
    start = 0
    for name in names:
        size = attributes[name].shape[-1]
        pixels[name] = interpolated[:, start : start + size]
        start += size

    # Two-sided: a triangle seen from behind is lit on the side facing the camera.
    face_id = rast[..., 3].reshape(-1)[index].long() - 1
    eye = cameras.position.to(stacked).repeat_interleave(height * width, dim=0)[index]
    view_dir = F.normalize(eye - pixels["position"], dim=-1)
    facing = torch.where(_dot(mesh.face_normals()[face_id], view_dir) < 0, -1.0, 1.0)
    pixels["normal"] = F.normalize(pixels["normal"], dim=-1) * facing
    material = material_at(pixels)
    rgb = split_sum_shade(
        material["normal"], view_dir, material["kd"], material["roughness"], material["metallic"],
        material["occlusion"], light,
    )

    def image(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(batch * height * width, values.shape[-1])
        return full.index_put((index,), values).reshape(batch, height, width, -1)

    rgb_linear = image(rgb)
    mask = covered[..., None].to(rgb_linear.dtype)
    bg = _background(background, batch, height, width, rgb_linear)
    composite = linear_to_srgb(rgb_linear) * mask + bg * (1 - mask)
    neighbors = edge_neighbors(mesh.faces) if rasterizer.backend_for(mesh.device) == "torch" else None
    antialiased = rasterizer.antialias(torch.cat([composite, mask], -1), rast, pos_clip, mesh.faces, neighbors)
    return {
        "rgb": antialiased[..., :3],
        "rgb_linear": rgb_linear,
        "mask": antialiased[..., 3:],
        "kd": image(material["kd"]),
        "roughness": image(material["roughness"]),
        "metallic": image(material["metallic"]),
        "occlusion": image(material["occlusion"]),
        "normal": image(material["normal"]),
    }


def render_pbr(
    mesh: Mesh,
    cameras: Cameras,
    resolution: int | tuple[int, int],
    material_fn: MaterialFn,
    light: EnvironmentLight,
    background=(1.0, 1.0, 1.0),
    backend: str | Rasterizer = "auto",
) -> dict[str, torch.Tensor]:
    """Render `mesh` with a neural material, split-sum lit by `light`.

    material_fn(positions (N, 3) world) -> dict(kd (N, 3), roughness, metallic, occlusion (N, 1),
    normal_perturbation (N, 3)), called on covered pixels only. background: sRGB colour or image.
    Returns rgb (B, H, W, 3) sRGB composited and antialiased, rgb_linear (unmasked shading,
    0 on background), mask (B, H, W, 1) antialiased coverage, and the per-pixel kd, roughness,
    metallic, occlusion and shading normal (world) maps, 0 on background."""
    attributes = {"position": mesh.vertices, "normal": welded_vertex_normals(mesh)}

    def material_at(pixels):
        material = dict(material_fn(pixels["position"]))
        material["normal"] = perturb_normal(
            pixels["normal"], fallback_tangents(pixels["normal"]), material["normal_perturbation"]
        )
        return material

    return _shade_and_composite(mesh, cameras, resolution, light, background, backend, material_at, attributes)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of an (S, S, C) texture at glTF uvs (N, 2) (v down, row 0 at v = 0) -> (N, C)."""
    grid = (uv * 2 - 1).view(1, 1, -1, 2)
    out = F.grid_sample(texture.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T


def render_textured(
    mesh: Mesh,
    cameras: Cameras,
    resolution: int | tuple[int, int],
    textures: dict[str, torch.Tensor],
    light: EnvironmentLight,
    background=(1.0, 1.0, 1.0),
    backend: str | Rasterizer = "auto",
) -> dict[str, torch.Tensor]:
    """Render a UV-mapped mesh with baked texture maps (the output of `bake_textures`):
    kd (S, S, 3) linear, roughness / metallic / occlusion (S, S, 1), normal (S, S, 3) tangent
    space in [-1, 1]. Same outputs as `render_pbr`."""
    if mesh.uvs is None:
        raise ValueError("render_textured needs a mesh with uvs")
    normals = welded_vertex_normals(mesh)
    tangents = vertex_tangents(mesh, normals)
    attributes = {"position": mesh.vertices, "normal": normals, "uv": mesh.uvs, "tangent": tangents}

    def material_at(pixels):
        uv = pixels["uv"]
        material = {k: sample_texture(textures[k], uv) for k in ("kd", "roughness", "metallic", "occlusion")}
        handedness = torch.where(pixels["tangent"][:, 3:] < 0, -1.0, 1.0)
        material["normal"] = perturb_normal(
            pixels["normal"], pixels["tangent"][:, :3], sample_texture(textures["normal"], uv), handedness
        )
        return material

    return _shade_and_composite(mesh, cameras, resolution, light, background, backend, material_at, attributes)
