"""Cameras: OpenGL convention (camera looks down -z, +y up), world +y up, looking at the origin.

Spherical placement: elevation from the xz-plane towards +y, azimuth about +y with azimuth 0 on
the +z axis ("front"), azimuth +90 degrees on the +x axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Cameras:
    """A batch of B pinhole cameras.

    c2w: (B, 4, 4) OpenGL camera-to-world; fov_y: (B,) radians (square images use it for x too);
    elevation, azimuth: (B,) degrees; radius: (B,); shift: (B, 2) principal-point offset in NDC."""

    c2w: torch.Tensor
    fov_y: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    radius: torch.Tensor
    shift: torch.Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device) -> Cameras:
        return Cameras(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __getitem__(self, index) -> Cameras:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @property
    def position(self) -> torch.Tensor:
        """(B, 3) camera centres in world space."""
        return self.c2w[:, :3, 3]

    def w2c(self) -> torch.Tensor:
        return torch.linalg.inv(self.c2w)

    def projection(self, near: float = 0.1, far: float = 100.0, aspect: float = 1.0) -> torch.Tensor:
        """(B, 4, 4) OpenGL perspective matrices, principal point shifted by `shift`."""
        focal = 1.0 / torch.tan(self.fov_y / 2)
        proj = torch.zeros(len(self), 4, 4, device=self.device, dtype=self.c2w.dtype)
        proj[:, 0, 0] = focal / aspect
        proj[:, 1, 1] = focal
        proj[:, 0, 2] = -self.shift[:, 0]
        proj[:, 1, 2] = -self.shift[:, 1]
        proj[:, 2, 2] = -(far + near) / (far - near)
        proj[:, 2, 3] = -2.0 * far * near / (far - near)
        proj[:, 3, 2] = -1.0
        return proj

    def mvp(self, near: float = 0.1, far: float = 100.0, aspect: float = 1.0) -> torch.Tensor:
        """(B, 4, 4) world -> clip; `aspect` = width / height of the image."""
        return self.projection(near, far, aspect) @ self.w2c()

    def intrinsics(self, width: int, height: int) -> torch.Tensor:
        """(B, 4) pixel intrinsics (fl_x, fl_y, cx, cy), image row 0 at the top."""
        focal = 1.0 / torch.tan(self.fov_y / 2)
        fl_x = focal * height / 2  # same focal in pixels on both axes: square pixels
        fl_y = focal * height / 2
        cx = width / 2 * (1 + self.shift[:, 0])  # the shift is in NDC units of each axis
        cy = height / 2 * (1 - self.shift[:, 1])
        return torch.stack([fl_x, fl_y, cx, cy], dim=-1)

    def pixel_rays(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays through the pixel centres of a square size x size image (row 0 at the top, as
        the rasterizer's images): origins (B, 3) world camera positions, directions (B, size,
        size, 3) world unit vectors; the inverse of `projection`, principal-point shift included."""
        centres = (torch.arange(size, device=self.device, dtype=self.c2w.dtype) + 0.5) / size * 2 - 1
        y_ndc, x_ndc = -centres[:, None].expand(size, size), centres[None, :].expand(size, size)
        focal = (1.0 / torch.tan(self.fov_y / 2)).view(-1, 1, 1)
        x = (x_ndc[None] - self.shift[:, 0].view(-1, 1, 1)) / focal
        y = (y_ndc[None] - self.shift[:, 1].view(-1, 1, 1)) / focal
        camera = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # OpenGL: the camera looks down -z
        directions = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], camera)
        return self.position, directions / directions.norm(dim=-1, keepdim=True)

    def features(self) -> torch.Tensor:
        """(B, 6) normalized camera numbers for CG-LoRA's camera MLP: position / radius-scale
        squashed by tanh, elevation / 90, azimuth / 180, fov mapped from [15, 60] deg to [-1, 1]."""
        position = torch.tanh(self.position / 3.0)
        elevation = self.elevation / 90.0
        azimuth = self.azimuth / 180.0
        fov = (torch.rad2deg(self.fov_y) - 37.5) / 22.5
        return torch.cat([position, elevation[:, None], azimuth[:, None], fov[:, None]], dim=-1)

    def view_labels(self, overhead_elevation: float = 60.0) -> list[str]:
        """Direction of each view for direction-aware prompts: front / side / back / overhead."""
        labels = []
        for elevation, azimuth in zip(self.elevation.tolist(), self.azimuth.tolist()):
            azimuth = (azimuth + 180.0) % 360.0 - 180.0
            if elevation > overhead_elevation:
                labels.append("overhead")
            elif abs(azimuth) < 45.0:
                labels.append("front")
            elif abs(azimuth) < 135.0:
                labels.append("side")
            else:
                labels.append("back")
        return labels


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3) eyes -> (B, 4, 4) OpenGL camera-to-world matrices looking at `target` (origin)."""
    if target is None:
        target = torch.zeros_like(eye)
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], device=eye.device, dtype=eye.dtype).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.cross(forward, up, dim=-1)
    # Straight up or down: any right vector perpendicular to forward will do.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.tensor([1.0, 0.0, 0.0], device=eye.device, dtype=eye.dtype).expand_as(eye)
    right = torch.nn.functional.normalize(torch.where(degenerate, alt, right), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, device=eye.device, dtype=eye.dtype).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    return c2w


def spherical_cameras(
    elevation: torch.Tensor,
    azimuth: torch.Tensor,
    radius: torch.Tensor,
    fov_y: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> Cameras:
    """Cameras on a sphere around the origin; angles in degrees, fov_y in radians, all (B,)."""
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    eye = torch.stack(
        [radius * torch.cos(el) * torch.sin(az), radius * torch.sin(el), radius * torch.cos(el) * torch.cos(az)],
        dim=-1,
    )
    if shift is None:
        shift = torch.zeros(eye.shape[0], 2, device=eye.device, dtype=eye.dtype)
    return Cameras(look_at(eye), fov_y, elevation, azimuth, radius, shift)


@dataclass
class CameraSampling:
    """The random camera distribution of the geometry and appearance stages (METHOD.md)."""

    radius: tuple[float, float] = (3.0, 3.0)
    fov_deg: tuple[float, float] = (25.7, 45.0)
    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    jitter: float = 0.05  # max principal-point shift in NDC
    # Each view is drawn from overhead_elevation_deg instead with this probability.
    overhead_fraction: float = 0.0
    overhead_elevation_deg: tuple[float, float] = (60.0, 80.0)


def sample_cameras(
    batch: int,
    generator: torch.Generator,
    sampling: CameraSampling = CameraSampling(),
    strata: tuple[int, int] | None = None,
) -> Cameras:
    """B random cameras with azimuths stratified across the batch: view i draws from the i-th of
    B equal azimuth sectors. Each view's elevation comes from `sampling.overhead_elevation_deg`
    instead with probability `sampling.overhead_fraction`. `strata=(rank, world)` restricts the
    whole batch to the rank-th of `world` sectors first (each data-parallel rank takes its own
    quadrant, as the authors did)."""
    lo, hi = sampling.azimuth_deg
    if strata is not None:
        rank, world = strata
        width = (hi - lo) / world
        lo, hi = lo + rank * width, lo + (rank + 1) * width

    def uniform(bounds: tuple[float, float], n: int = batch) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=generator)

    sector = (hi - lo) / batch
    azimuth = lo + (torch.arange(batch) + torch.rand(batch, generator=generator)) * sector
    elevation = uniform(sampling.elevation_deg)
    radius = uniform(sampling.radius)
    fov = torch.deg2rad(uniform(sampling.fov_deg))
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * sampling.jitter
    if sampling.overhead_fraction > 0:
        # Drawn last, so the other draws are those of a sampling without overhead views.
        overhead = torch.rand(batch, generator=generator) < sampling.overhead_fraction
        elevation = torch.where(overhead, uniform(sampling.overhead_elevation_deg), elevation)
    return spherical_cameras(elevation, azimuth, radius, fov, shift)


def orbit_cameras(
    views: int, elevation: float = 15.0, radius: float = 3.0, fov_deg: float = 40.0, start_azimuth: float = 0.0
) -> Cameras:
    """`views` evenly spaced cameras on a circle (turntables, validation images)."""
    azimuth = start_azimuth + torch.arange(views, dtype=torch.float32) * 360.0 / views
    azimuth = (azimuth + 180.0) % 360.0 - 180.0
    full = lambda value: torch.full((views,), float(value))  # noqa: E731
    return spherical_cameras(full(elevation), azimuth, full(radius), torch.deg2rad(full(fov_deg)))
