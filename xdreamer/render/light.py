"""Split-sum image-based lighting (Karis 2013): an HDR environment as a cubemap with a GGX
prefiltered specular chain and a cosine-convolved irradiance map, plus the GGX (n·v, roughness)
-> (scale, bias) lookup table, all computed here in plain PyTorch.

Conventions
-----------
- Lat-long maps are (H, W, 3) linear radiance, row 0 = straight up (+y). Column u in [0, 1) has
  azimuth phi = 2 pi (u - 0.5) with direction (sin phi, ., -cos phi) sin(theta): the centre column
  looks down -z, u = 0.75 looks down +x.
- Cubemaps are (6, R, R, C) with OpenGL face order +x, -x, +y, -y, +z, -z and row 0 at the top of
  each face. Every stored face carries a one-texel border computed from the neighbouring faces'
  directions, so bilinear lookups are seamless across face edges without special cases.
- Roughness is perceptual; GGX alpha = roughness ** 2 (Karis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xdreamer.atomic import atomic_path
from xdreamer.cache import cache_dir


class EnvironmentMapError(ValueError):
    """An environment map that cannot be used: missing, unreadable or badly shaped."""

# Roughness of each prefiltered specular level and the face resolution it is stored and
# integrated at: rough lobes are smooth, so they need few texels (brute-force integration over
# the source cube is then cheap on a CPU).
SPECULAR_ROUGHNESS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SPECULAR_RESOLUTION = (None, 32, 16, 16, 8, 8)  # None: the base cubemap's resolution
SOURCE_RESOLUTION = (None, 32, 32, 16, 16, 16)
IRRADIANCE_RESOLUTION = 16


# --------------------------------------------------------------------------- GGX lookup table


def hammersley(n: int) -> np.ndarray:
    """(n, 2) float64 Hammersley points in [0, 1)^2 (i / n, radical inverse base 2)."""
    i = np.arange(n, dtype=np.uint64)
    bits = i.copy()
    bits = ((bits << np.uint64(16)) | (bits >> np.uint64(16))) & np.uint64(0xFFFFFFFF)
    bits = ((bits & np.uint64(0x55555555)) << np.uint64(1)) | ((bits & np.uint64(0xAAAAAAAA)) >> np.uint64(1))
    bits = ((bits & np.uint64(0x33333333)) << np.uint64(2)) | ((bits & np.uint64(0xCCCCCCCC)) >> np.uint64(2))
    bits = ((bits & np.uint64(0x0F0F0F0F)) << np.uint64(4)) | ((bits & np.uint64(0xF0F0F0F0)) >> np.uint64(4))
    bits = ((bits & np.uint64(0x00FF00FF)) << np.uint64(8)) | ((bits & np.uint64(0xFF00FF00)) >> np.uint64(8))
    return np.stack([i.astype(np.float64) / n, bits.astype(np.float64) / 2.0**32], axis=-1)


def smith_g_ggx(n_dot_v, n_dot_l, roughness):
    """Separable Schlick-Smith G with k = alpha / 2 (Karis's choice for image-based lighting)."""
    k = roughness**2 / 2
    return n_dot_v / (n_dot_v * (1 - k) + k) * n_dot_l / (n_dot_l * (1 - k) + k)


def integrate_ggx_brdf(n_dot_v: np.ndarray, roughness: np.ndarray, samples: int = 512) -> np.ndarray:
    """Karis's split-sum BRDF integral by GGX importance sampling on a Hammersley set.

    n_dot_v, roughness: (N,) float64 -> (N, 2) (scale, bias): the specular integral of a white
    environment is F0 * scale + bias."""
    xi = hammersley(samples)
    nv = n_dot_v[:, None]
    alpha = (roughness**2)[:, None]
    v = np.stack([np.sqrt(1 - nv**2), np.zeros_like(nv), nv], axis=-1)  # (N, 1, 3)
    phi = 2 * math.pi * xi[None, :, 0]
    cos_t = np.sqrt((1 - xi[None, :, 1]) / (1 + (alpha**2 - 1) * xi[None, :, 1]))
    sin_t = np.sqrt(1 - cos_t**2)
    h = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=-1)  # (N, S, 3)
    v_dot_h = (v * h).sum(-1)
    l_z = 2 * v_dot_h * h[..., 2] - nv
    n_dot_l = np.clip(l_z, 0, 1)
    n_dot_h = np.clip(h[..., 2], 0, 1)
    v_dot_h = np.clip(v_dot_h, 0, 1)
    g = smith_g_ggx(nv, n_dot_l, roughness[:, None])
    g_vis = np.where(l_z > 0, g * v_dot_h / np.maximum(n_dot_h * nv, 1e-12), 0.0)
    fresnel = (1 - v_dot_h) ** 5
    return np.stack([((1 - fresnel) * g_vis).mean(-1), (fresnel * g_vis).mean(-1)], axis=-1)


def ggx_lut(resolution: int = 128, samples: int = 512) -> torch.Tensor:
    """(R, R, 2) float32 split-sum table: rows = roughness, columns = n·v, both sampled at texel
    centres (i + 0.5) / R; cached as .npy in cache_dir("lut")."""
    path = cache_dir("lut") / f"ggx_split_sum_{resolution}_{samples}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path))
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed below
    centres = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
    rough, nv = np.meshgrid(centres, centres, indexing="ij")
    table = integrate_ggx_brdf(nv.ravel(), rough.ravel(), samples).reshape(resolution, resolution, 2)
    table = table.astype(np.float32)
    with atomic_path(path) as tmp:
        np.save(tmp, table)
    return torch.from_numpy(table)


def lookup_lut(lut: torch.Tensor, n_dot_v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup, clamped at the outer texel centres. lut: (R, R, 2); n_dot_v, roughness:
    (..., 1) -> (..., 2)."""
    shape = n_dot_v.shape[:-1]
    grid = torch.stack([n_dot_v.reshape(-1) * 2 - 1, roughness.reshape(-1) * 2 - 1], dim=-1)
    image = lut.to(n_dot_v.device, n_dot_v.dtype).permute(2, 0, 1)[None]
    out = F.grid_sample(image, grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T.reshape(*shape, 2)


# --------------------------------------------------------------------------- cubemaps


def cube_directions(resolution: int, pad: int = 0, device=None) -> torch.Tensor:
    """(6, R + 2 pad, R + 2 pad, 3) unit directions through texel centres of each face; the pad
    ring extends past the face edge into its neighbours."""
    return _face_grid_directions(resolution, pad, 0.0, 0.0, device)


def _face_grid_directions(resolution: int, pad: int, dx: float, dy: float, device=None) -> torch.Tensor:
    """Directions through the points (j + 0.5 + dx, i + 0.5 + dy) of each padded face grid."""
    coords = torch.arange(-pad, resolution + pad, device=device, dtype=torch.float32) + 0.5
    t, s = torch.meshgrid((coords + dy) / resolution * 2 - 1, (coords + dx) / resolution * 2 - 1, indexing="ij")
    one = torch.ones_like(s)  # t grows downwards (row 0 = top)
    faces = [
        torch.stack([one, -t, -s], -1),  # +x
        torch.stack([-one, -t, s], -1),  # -x
        torch.stack([s, one, t], -1),  # +y
        torch.stack([s, -one, -t], -1),  # -y
        torch.stack([s, -t, one], -1),  # +z
        torch.stack([-s, -t, -one], -1),  # -z
    ]
    return F.normalize(torch.stack(faces), dim=-1)


def cube_solid_angles(resolution: int, device=None) -> torch.Tensor:
    """(6, R, R) solid angle of each texel (area (2/R)^2 projected onto the unit sphere)."""
    coords = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    t, s = torch.meshgrid(coords, coords, indexing="ij")
    omega = (2.0 / resolution) ** 2 / (1 + s**2 + t**2) ** 1.5
    return omega.expand(6, resolution, resolution)


def direction_to_cube(direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3) directions -> face index (N,) int64 and face coordinates s, t in [-1, 1] (N,)."""
    x, y, z = direction.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    use_x = (ax >= ay) & (ax >= az)
    use_y = ~use_x & (ay >= az)
    face = torch.where(use_x, torch.where(x >= 0, 0, 1), torch.where(use_y, torch.where(y >= 0, 2, 3), torch.where(z >= 0, 4, 5)))
    major = torch.where(use_x, ax, torch.where(use_y, ay, az)).clamp_min(1e-12)
    # Inverse of cube_directions' per-face mapping.
    s_num = torch.stack([-z, z, x, x, x, -x], -1).gather(-1, face[:, None])[:, 0]
    t_num = torch.stack([-y, -y, z, -z, -y, -y], -1).gather(-1, face[:, None])[:, 0]
    return face, s_num / major, t_num / major


def sample_cube(cube: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup in a padded cubemap. cube: (6, R + 2, R + 2, C) with a one-texel border;
    direction: (N, 3) -> (N, C). Differentiable in both the cube and the direction."""
    size = cube.shape[1]
    resolution = size - 2
    face, s, t = direction_to_cube(direction)
    # Texel-centre coordinates in the padded face: centre of texel j sits at j + 1.
    x = ((s + 1) * 0.5 * resolution - 0.5 + 1).clamp(0, size - 1 - 1e-4)
    y = ((t + 1) * 0.5 * resolution - 0.5 + 1).clamp(0, size - 1 - 1e-4)
    x0, y0 = x.floor(), y.floor()
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    flat = cube.reshape(-1, cube.shape[-1])
    base = face * size * size

    def at(yy, xx):
        return flat[base + yy * size + xx]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def direction_to_latlong(direction: torch.Tensor) -> torch.Tensor:
    """(N, 3) -> (N, 2) lat-long coordinates (u, v) in [0, 1] (v = 0 straight up)."""
    x, y, z = direction.unbind(-1)
    u = torch.atan2(x, -z) / (2 * math.pi) + 0.5
    v = torch.acos(y.clamp(-1, 1)) / math.pi
    return torch.stack([u, v], dim=-1)


def sample_latlong(latlong: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of an (H, W, C) lat-long map, wrapping in azimuth. direction (N, 3) -> (N, C)."""
    height, width, _ = latlong.shape
    wrapped = torch.cat([latlong[:, -1:], latlong, latlong[:, :1]], dim=1)  # one column each side
    uv = direction_to_latlong(direction)
    gx = (uv[:, 0] * width + 0.5) / (width + 2) * 2 - 1  # texel centres of the wrapped image
    gy = uv[:, 1] * 2 - 1
    grid = torch.stack([gx, gy], -1)[None, None]
    out = F.grid_sample(wrapped.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T


def latlong_to_cube(latlong: torch.Tensor, resolution: int, pad: int = 0, supersample: int = 2) -> torch.Tensor:
    """Resample a lat-long map into a (6, R + 2 pad, R + 2 pad, C) cubemap, averaging
    supersample^2 lookups per texel so small bright features (a sun) keep their energy."""
    size = resolution + 2 * pad
    offsets = [(k + 0.5) / supersample - 0.5 for k in range(supersample)]
    total = 0.0
    for dy in offsets:
        for dx in offsets:
            dirs = _face_grid_directions(resolution, pad, dx, dy, latlong.device).reshape(-1, 3)
            total = total + sample_latlong(latlong, dirs)
    return (total / supersample**2).reshape(6, size, size, -1)


def prefilter(source: torch.Tensor, resolution: int, weight_fn, chunk: int = 4096) -> torch.Tensor:
    """Convolve an unpadded (6, S, S, C) cubemap into a padded (6, R + 2, R + 2, C) one:
    out(n) = sum_l w(n·l) L(l) dω / sum_l w(n·l) dω, brute force over every source texel.
    weight_fn(cos (M, K) = n·l) -> (M, K) non-negative weights (both lobes here depend on n·l only)."""
    src_dirs = cube_directions(source.shape[1], device=source.device).reshape(-1, 3)
    src_omega = cube_solid_angles(source.shape[1], device=source.device).reshape(1, -1)
    src = source.reshape(-1, source.shape[-1])
    out_dirs = cube_directions(resolution, pad=1, device=source.device).reshape(-1, 3)
    rows = []
    for start in range(0, out_dirs.shape[0], chunk):
        w = weight_fn(out_dirs[start : start + chunk] @ src_dirs.T) * src_omega
        rows.append((w @ src) / w.sum(-1, keepdim=True).clamp_min(1e-20))
    return torch.cat(rows).reshape(6, resolution + 2, resolution + 2, -1)


def ggx_lobe(roughness: float):
    """Prefilter weight for the specular chain with n = v = r (Karis): D_GGX(n·h) n·l, where
    h = normalize(n + l) gives (n·h)^2 = (1 + n·l) / 2."""
    alpha2 = max(roughness, 1e-3) ** 4

    def weight(cos):
        n_dot_h2 = (1 + cos) * 0.5
        d = alpha2 / (math.pi * (n_dot_h2 * (alpha2 - 1) + 1) ** 2)
        return d * cos.clamp_min(0)

    return weight


def cosine_lobe(cos: torch.Tensor) -> torch.Tensor:
    return cos.clamp_min(0)


def box_downsample(cube: torch.Tensor, resolution: int) -> torch.Tensor:
    """(6, R, R, C) -> (6, r, r, C) by area averaging (R a multiple of r)."""
    factor = cube.shape[1] // resolution
    pooled = F.avg_pool2d(cube.permute(0, 3, 1, 2), factor)
    return pooled.permute(0, 2, 3, 1).contiguous()


@dataclass
class EnvironmentLight:
    """Prefiltered image-based light. base: padded (6, R+2, R+2, 3) mirror cubemap;
    specular_levels: padded cubes, one per SPECULAR_ROUGHNESS level (level 0 is `base`);
    irradiance: padded (6, r+2, r+2, 3) cosine-convolved cube (uniform radiance L gives L);
    lut: (128, 128, 2) GGX split-sum table."""

    base: torch.Tensor
    specular_levels: list[torch.Tensor]
    irradiance: torch.Tensor
    lut: torch.Tensor

    @staticmethod
    def from_latlong(latlong: torch.Tensor, scale: float = 2.0, resolution: int = 128) -> EnvironmentLight:
        """latlong: (H, W, 3) linear HDR radiance, multiplied by `scale`; resolution: base face size
        (a multiple of 32)."""
        if latlong.ndim != 3 or latlong.shape[-1] != 3:
            raise EnvironmentMapError(f"environment map must be (H, W, 3), got {tuple(latlong.shape)}")
        if resolution % 32:
            raise EnvironmentMapError(f"cubemap resolution must be a multiple of 32, got {resolution}")
        latlong = latlong.float() * scale
        base = latlong_to_cube(latlong, resolution, pad=1, supersample=2)
        fine = base[:, 1:-1, 1:-1].contiguous()
        specular = [base]
        for rough, res, src_res in zip(SPECULAR_ROUGHNESS[1:], SPECULAR_RESOLUTION[1:], SOURCE_RESOLUTION[1:]):
            specular.append(prefilter(box_downsample(fine, src_res), res, ggx_lobe(rough)))
        irradiance = prefilter(box_downsample(fine, 16), IRRADIANCE_RESOLUTION, cosine_lobe)
        return EnvironmentLight(base, specular, irradiance, ggx_lut())

    def to(self, device) -> EnvironmentLight:
        return EnvironmentLight(
            self.base.to(device),
            [s.to(device) for s in self.specular_levels],
            self.irradiance.to(device),
            self.lut.to(device),
        )

    def diffuse(self, normal: torch.Tensor) -> torch.Tensor:
        """Cosine-weighted irradiance / pi: normal (..., 3) unit -> (..., 3)."""
        return sample_cube(self.irradiance, normal.reshape(-1, 3)).reshape(*normal.shape[:-1], 3)

    def specular(self, reflect_dir: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        """GGX-prefiltered radiance, linear in roughness between the stored levels.
        reflect_dir: (..., 3) unit; roughness: (..., 1) in [0, 1] -> (..., 3)."""
        dirs = reflect_dir.reshape(-1, 3)
        level = roughness.reshape(-1, 1).clamp(0, 1) * (len(self.specular_levels) - 1)
        total = dirs.new_zeros(dirs.shape[0], 3)
        for index, cube in enumerate(self.specular_levels):
            weight = (1 - (level - index).abs()).clamp_min(0)
            # Each point reads only the two levels bracketing its roughness.
            active = (weight[:, 0] > 0).nonzero()[:, 0]
            if active.numel():
                total = total.index_add(0, active, weight[active] * sample_cube(cube, dirs[active]))
        return total.reshape(*reflect_dir.shape[:-1], 3)

    def split_sum_terms(self, n_dot_v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        """(..., 1), (..., 1) -> (..., 2) GGX (scale, bias)."""
        return lookup_lut(self.lut, n_dot_v, roughness)


def uniform_environment(radiance: float | tuple[float, float, float] = 1.0, resolution: int = 32) -> EnvironmentLight:
    """A constant environment (the white-furnace test): every direction has `radiance`."""
    value = torch.as_tensor(radiance, dtype=torch.float32).expand(3)
    latlong = value.expand(16, 32, 3).clone()
    return EnvironmentLight.from_latlong(latlong, scale=1.0, resolution=resolution)


def default_environment_map(height: int = 128) -> torch.Tensor:
    """(H, 2H, 3) procedural outdoor sky, linear radiance: a blue gradient sky brighter at the
    horizon, a sun disc with a soft halo, and a darker warm ground."""
    v = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(2 * height, dtype=torch.float32) + 0.5) / (2 * height)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    theta, phi = vv * math.pi, (uu - 0.5) * 2 * math.pi
    direction = torch.stack([torch.sin(theta) * torch.sin(phi), torch.cos(theta), -torch.sin(theta) * torch.cos(phi)], -1)
    up = direction[..., 1:2]
    zenith = torch.tensor([0.25, 0.45, 0.9])
    horizon = torch.tensor([0.85, 0.9, 1.0])
    sky = horizon + (zenith - horizon) * up.clamp(0, 1) ** 0.5
    ground = torch.tensor([0.35, 0.3, 0.25]) * (0.6 + 0.4 * (1 + up).clamp(0, 1))
    blend = torch.sigmoid(up * 40)  # soft horizon line
    radiance = ground + (sky - ground) * blend
    sun_dir = F.normalize(torch.tensor([0.5, 0.75, 0.45]), dim=0)
    cos_angle = (direction * sun_dir).sum(-1, keepdim=True)
    angle = torch.acos(cos_angle.clamp(-1, 1))
    disc = (angle < math.radians(4.0)).float() * 12.0
    halo = torch.exp(-((angle / math.radians(12.0)) ** 2)) * 1.5
    return radiance + (disc + halo) * torch.tensor([1.0, 0.95, 0.85])


def default_environment(scale: float = 2.0, resolution: int = 128) -> EnvironmentLight:
    """The project's built-in light: default_environment_map() prefiltered (nothing downloaded)."""
    return EnvironmentLight.from_latlong(default_environment_map(), scale=scale, resolution=resolution)


def read_hdr_image(path: str | Path) -> torch.Tensor:
    """(H, W, 3) float32 linear RGB from a .hdr / .exr file via OpenCV."""
    import os

    # OpenCV only decodes EXR when this is set before the module is first imported.
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    import cv2

    path = Path(path)
    if not path.is_file():
        raise EnvironmentMapError(f"environment map not found: {path}")
    if path.suffix.lower() not in (".hdr", ".exr", ".pic"):
        raise EnvironmentMapError(f"environment map must be .hdr or .exr, got {path.name}")
    exr_hint = ""
    if path.suffix.lower() == ".exr":
        exr_hint = " (this OpenCV may lack OpenEXR: set OPENCV_IO_ENABLE_OPENEXR=1 before starting, or convert to .hdr)"
    try:
        image = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as exc:
        raise EnvironmentMapError(f"cannot read environment map {path}: {str(exc).strip().splitlines()[-1]}{exr_hint}") from None
    if image is None:
        raise EnvironmentMapError(f"cannot read environment map {path}{exr_hint}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3][..., ::-1].astype(np.float32)  # BGR(A) -> RGB
    if not np.isfinite(image).all():
        raise EnvironmentMapError(f"environment map {path} has non-finite values")
    return torch.from_numpy(np.ascontiguousarray(image))


def load_environment(path: str | Path, scale: float = 2.0, resolution: int = 128) -> EnvironmentLight:
    """EnvironmentLight from a lat-long .hdr / .exr file, radiance multiplied by `scale`."""
    return EnvironmentLight.from_latlong(read_hdr_image(path), scale=scale, resolution=resolution)
