"""Initial shapes for the geometry stage: an ellipsoid or a user's mesh, as SDF targets the
DMTet network is fitted to with an MSE loss before score distillation starts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from xdreamer.geometry.dmtet import DMTetGeometry
from xdreamer.mesh import Mesh, MeshError

SDF = Callable[[torch.Tensor], torch.Tensor]


def _cut_ellipsoid(b: float, flat_base: float) -> tuple[float, float]:
    """An ellipsoid of vertical radius b cut flat `flat_base` below its centre: the latitude of
    the cut (radians, negative) and how far the centre moves down to centre the solid left."""
    return math.asin(-flat_base / b), (b - flat_base) / 2


class EllipsoidSDF:
    """Approximate signed distance to an axis-aligned ellipsoid centred at the origin, optionally
    cut flat underneath.

    Uses k0 (k0 - 1) / k1 with k0 = |p / r|, k1 = |p / r^2| (Quilez): exact zero set and sign,
    exact distance on the axes, and close to the true distance near the surface.

    `flat_base`: the ellipsoid is cut by the horizontal plane this far below its centre (world
    units, in (0, radii[1])) and the solid left above it is moved down to centre its bounding box
    on the origin; its SDF is then the larger of the two (exact sign, a bound on the distance
    near the base's rim). None: the whole ellipsoid."""

    def __init__(self, radii: Sequence[float], flat_base: float | None = None) -> None:
        radii = [float(r) for r in radii]
        if len(radii) != 3 or min(radii) <= 0:
            raise ValueError(f"ellipsoid needs 3 positive radii, got {radii}")
        if flat_base is not None and not 0 < flat_base < radii[1]:
            raise ValueError(f"a flat base must lie between the centre and the bottom (0, {radii[1]:g}), got {flat_base}")
        self.radii = torch.tensor(radii)
        self.flat_base = None if flat_base is None else float(flat_base)
        # (3,): where the ellipsoid's centre sits, so the cut solid's bounding box is centred
        lift = 0.0 if flat_base is None else _cut_ellipsoid(radii[1], flat_base)[1]
        self.centre = torch.tensor([0.0, -lift, 0.0])

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """points: (M, 3) -> (M,) signed distance, negative inside."""
        r = self.radii.to(points)
        p = points - self.centre.to(points)
        k0 = (p / r).norm(dim=-1)
        k1 = (p / (r * r)).norm(dim=-1)
        # at the centre the formula is 0/0; the scaled-sphere distance is finite there
        near_centre = k1 < 1e-9
        sdf = torch.where(near_centre, (k0 - 1) * r.min(), k0 * (k0 - 1) / k1.clamp_min(1e-9))
        if self.flat_base is None:
            return sdf
        return torch.maximum(sdf, -self.flat_base - p[:, 1])

    @property
    def area(self) -> float:
        """Surface area: the whole ellipsoid by Knud Thomsen's formula (within 1.1 %); cut flat,
        the part above the base by the midpoint rule over latitude and longitude (within 0.01 %
        at 512 x 512) plus the base's ellipse."""
        a, b, c = self.radii.tolist()
        if self.flat_base is None:
            p = 1.6075
            return 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
        n = 512
        lowest, _ = _cut_ellipsoid(b, self.flat_base)
        lat = lowest + (torch.arange(n, dtype=torch.float64) + 0.5) * (math.pi / 2 - lowest) / n
        lon = (torch.arange(n, dtype=torch.float64) + 0.5) * 2 * math.pi / n
        lat, lon = lat[:, None], lon[None, :]
        # |dr/dlat x dr/dlon| for r = (a cos lat cos lon, b sin lat, c cos lat sin lon)
        element = torch.cos(lat) * torch.sqrt(
            b**2 * torch.cos(lat) ** 2 * (c**2 * torch.cos(lon) ** 2 + a**2 * torch.sin(lon) ** 2)
            + a**2 * c**2 * torch.sin(lat) ** 2
        )
        side = float(element.sum()) * (math.pi / 2 - lowest) / n * 2 * math.pi / n
        shrink = 1 - (self.flat_base / b) ** 2
        return side + math.pi * a * c * shrink

    def sample_surface(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 3) points on the surface: unit-sphere directions scaled by the radii; cut flat,
        the points below the base are dropped onto it vertically (they land inside its ellipse,
        so the base is covered)."""
        directions = torch.randn(n, 3, generator=generator)
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        points = directions * self.radii
        if self.flat_base is not None:
            points[:, 1] = points[:, 1].clamp_min(-self.flat_base)
        return points + self.centre


def ellipsoid_reach(radii: Sequence[float], flat_base: float | None = None) -> float:
    """How far from the origin the initial ellipsoid (cut flat `flat_base` below its centre and
    re-centred, as `EllipsoidSDF` places it) reaches: the largest radius on a 0.5-degree grid of its
    side, which the base's rim bounds too."""
    a, b, c = (float(r) for r in radii)
    if flat_base is None:
        return max(a, b, c)
    lowest, lift = _cut_ellipsoid(b, flat_base)
    lat = np.linspace(lowest, math.pi / 2, 181)[:, None]
    lon = np.linspace(0.0, 2 * math.pi, 721)[None, :]
    x, y, z = a * np.cos(lat) * np.cos(lon), b * np.sin(lat) - lift, c * np.cos(lat) * np.sin(lon)
    return float(np.sqrt(x**2 + y**2 + z**2).max())


def ellipsoid_sdf(radii: Sequence[float], flat_base: float | None = None) -> EllipsoidSDF:
    """The ellipsoid initial shape, e.g. radii [0.56, 0.76, 0.56], optionally cut flat
    `flat_base` below its centre: callable (M, 3) -> (M,) with a `sample_surface(n, generator)`
    method and an `area`."""
    return EllipsoidSDF(radii, flat_base)


def normalize_mesh(mesh: Mesh) -> Mesh:
    """Centre the mesh on its bounding-box centre and scale it so the farthest vertex is at radius 1."""
    vertices = mesh.vertices
    if vertices.shape[0] == 0:
        raise MeshError("cannot normalize a mesh without vertices")
    centre = (vertices.min(dim=0).values + vertices.max(dim=0).values) / 2
    centred = vertices - centre
    radius = centred.norm(dim=-1).max()
    if not radius > 0:
        raise MeshError("cannot normalize a mesh whose vertices all coincide")
    return Mesh(vertices=centred / radius, faces=mesh.faces, uvs=mesh.uvs)


class MeshSDF:
    """Signed distance to a triangle mesh (libigl), the sign by generalized winding number so
    open or self-intersecting meshes still have a sensible inside."""

    def __init__(self, mesh: Mesh) -> None:
        if mesh.faces.shape[0] == 0 or mesh.vertices.shape[0] == 0:
            raise MeshError("cannot build a signed distance for a mesh without triangles")
        self.vertices = mesh.vertices.detach().cpu().double().numpy()
        self.faces = mesh.faces.detach().cpu().long().numpy()
        v0, v1, v2 = (self.vertices[self.faces[:, i]] for i in range(3))
        self.face_areas = 0.5 * np.linalg.norm(np.cross(v1 - v0, v2 - v0), axis=-1)
        if not self.face_areas.sum() > 0:
            raise MeshError("cannot build a signed distance for a mesh with zero area")

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """points: (M, 3) -> (M,) signed distance, negative inside, on the points' device."""
        import igl

        query = points.detach().cpu().double().numpy()
        smooth, _, closest, _ = igl.signed_distance(
            query, self.vertices, self.faces, sign_type=igl.SIGNED_DISTANCE_TYPE_WINDING_NUMBER
        )
        # libigl scales the distance by (1 - 2 w) for winding number w, which shrinks it on open
        # meshes; keep only its sign and take the true distance to the closest point.
        distance = np.linalg.norm(query - closest, axis=-1)
        signed = np.where(np.asarray(smooth) < 0, -distance, distance)
        return torch.from_numpy(signed).to(device=points.device, dtype=points.dtype)

    @property
    def area(self) -> float:
        return float(self.face_areas.sum())

    def sample_surface(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 3) float32 points uniform by area on the surface."""
        areas = torch.from_numpy(self.face_areas)
        face = torch.multinomial(areas, n, replacement=True, generator=generator)
        u, v = torch.rand(2, n, 1, generator=generator, dtype=torch.float64)
        # folding (u, v) back into the triangle keeps the samples uniform
        flip = (u + v) > 1
        u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
        tri = torch.from_numpy(self.vertices)[torch.from_numpy(self.faces)[face]]  # (n, 3, 3)
        points = tri[:, 0] + u * (tri[:, 1] - tri[:, 0]) + v * (tri[:, 2] - tri[:, 0])
        return points.float()


def fit_geometry_to_sdf(
    geometry: DMTetGeometry,
    target_sdf: SDF,
    sample_surface: Callable[[int, torch.Generator], torch.Tensor],
    generator: torch.Generator,
    steps: int = 400,
    lr: float = 1e-3,
    points_per_kind: int = 4096,
    noise_std: float = 0.05,
) -> list[float]:
    """Fit the geometry network's SDF to `target_sdf` by MSE (the paper's initialization).

    Each step draws `points_per_kind` surface samples, the same number of surface samples plus
    N(0, noise_std) noise, and the same number of uniform points in the grid's box; the targets
    are evaluated on CPU. AdamW with the paper's betas (0.9, 0.99) and eps 1e-15. Returns the loss
    of every step."""
    device = geometry.grid_vertices.device
    half = geometry.grid_scale / 2
    optimizer = torch.optim.AdamW(geometry.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-15)
    losses = []
    for _ in range(steps):
        surface = sample_surface(points_per_kind, generator)
        noisy = sample_surface(points_per_kind, generator) + noise_std * torch.randn(
            points_per_kind, 3, generator=generator
        )
        uniform = (torch.rand(points_per_kind, 3, generator=generator) * 2 - 1) * half
        points = torch.cat([surface, noisy, uniform]).float()
        with torch.no_grad():
            target = target_sdf(points)
        loss = torch.nn.functional.mse_loss(geometry.sdf_at(points.to(device)), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def volumetric_iou(
    sdf_a: SDF,
    sdf_b: SDF,
    bounds: float | tuple[float, float] = 1.0,
    resolution: int = 64,
    chunk: int = 1 << 16,
    device: torch.device | str = "cpu",
) -> float:
    """Intersection over union of the inside regions (SDF < 0) of two fields, measured at the
    cell centres of a resolution^3 grid over [lo, hi]^3 (bounds = hi gives [-hi, hi]^3); the
    fields are called with points on `device`."""
    lo, hi = (-bounds, bounds) if isinstance(bounds, (int, float)) else bounds
    axis = lo + (torch.arange(resolution, dtype=torch.float32) + 0.5) * (hi - lo) / resolution
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    intersection = union = 0
    for start in range(0, points.shape[0], chunk):
        p = points[start : start + chunk].to(device)
        inside_a = sdf_a(p).reshape(-1).cpu() < 0
        inside_b = sdf_b(p).reshape(-1).cpu() < 0
        intersection += (inside_a & inside_b).sum().item()
        union += (inside_a | inside_b).sum().item()
    return intersection / union if union else 1.0
