"""Silhouette carving: how the geometry stage opens a hole that SDS on a rasterized normal map
cannot.

SDS reaches a rasterized mesh through its shading and, for coverage, only through the
antialiased pixels on the silhouette's edge: a pixel inside the silhouette can change colour but
never turn into background. So a disc never becomes a ring, however clearly the guidance asks for
one — and it does: from the normal map of a flat disc, the toy model's denoised image
(`GuideOutput.denoised`) shows a torus' hole (docs/toy_model/carving.png). The carving term
reads that image, takes the pixels where it shows background well inside the render's
silhouette, and pushes the SDF along those pixels' camera rays outward:

    L = sum over the carved rays r and K samples p_rk inside the grid of relu(-sdf(p_rk)) / (R K)

Each step lowers the inside of the object along those rays a little; where the guidance keeps
asking, the two sides meet and the hole opens (a topology change marching tetrahedra then
extracts). What counts as a hole is kept narrow, because every false one drills a tunnel:

- the denoised image is predicted at a moderate guidance scale (the geometry stage's
  `carve_guidance_scale`, 4): at the stage's own 20 its colours overshoot into black patches
  inside cubes and spheres too (docs/toy_model.md);
- only clearly black pixels count (`threshold`), so a dark normal is not mistaken for background;
- only background the object encloses (`enclosed_background`): background joined to the image's
  border is the guidance asking for a smaller silhouette, which SDS handles at the edge;
- only patches of at least 3x3 pixels (`min_hole`), and not on the silhouette's rim (`erosion`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _erode(region: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, h, w) bool -> True where the whole (2 radius + 1)^2 neighbourhood is True."""
    outside = (~region).float()[:, None]
    return F.max_pool2d(outside, 2 * radius + 1, stride=1, padding=radius)[:, 0] == 0


def _dilate(region: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(region.float()[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def enclosed_background(background: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool background -> the background pixels the object encloses: those no path of
    background pixels (4-connected) joins to the image's border. A hole through the object is
    enclosed; background that only eats into the silhouette from outside (the guidance asking
    for a smaller or differently shaped object, which SDS handles at the edge) is not."""
    border = torch.zeros_like(background)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
    outside = background & border
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=background.device)[None, None]
    while True:
        grown = (F.conv2d(outside.float()[:, None], cross, padding=1)[:, 0] > 0) & background
        if torch.equal(grown, outside):
            return background & ~outside
        outside = grown


def background_pixels(
    denoised: torch.Tensor, mask: torch.Tensor, threshold: float = 0.1, erosion: int = 1, min_hole: int = 1
) -> torch.Tensor:
    """Where to carve: (B, h, w) bool, True where the denoised image denoised (B, h, w, 3) in
    [0, 1] shows enclosed background (every channel below `threshold`, the renders' background
    being black; `enclosed_background`) while the render's coverage mask (B, h, w, 1), shrunk by
    `erosion` pixels, is fully inside.
    Patches of background narrower than 2 min_hole + 1 pixels are dropped (a morphological
    opening): at high t the denoised image has dark specks that would drill thin tunnels."""
    inside = mask[..., 0] > 0.99
    if erosion > 0:
        inside = _erode(inside, erosion)
    carve = inside & enclosed_background(denoised.max(dim=-1).values < threshold)
    if min_hole > 0:
        carve = _dilate(_erode(carve, min_hole), min_hole) & carve
    return carve


def carved_rays(
    origins: torch.Tensor, directions: torch.Tensor, carve: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The camera rays of the True pixels of `carve` (B, h, w): origins (R, 3) and unit directions
    (R, 3), in pixel order (view, row, column). origins (B, 3) and directions (B, h, w, 3): the
    pixels' rays (`Cameras.pixel_rays`)."""
    view, row, col = carve.nonzero(as_tuple=True)
    return origins[view], directions[view, row, col]


def ray_carve_loss(
    sdf_at: Callable[[torch.Tensor], torch.Tensor],
    origins: torch.Tensor,
    directions: torch.Tensor,
    half_extent: float,
    samples: int = 32,
    max_rays: int = 1024,
) -> torch.Tensor:
    """The carving loss (module docstring) along the rays origins (R, 3), unit directions (R, 3).

    sdf_at: world points (M, 3) -> SDF (M,), negative inside. The SDF is sampled at `samples`
    evenly spaced points of each ray's stretch inside the grid's box [-half_extent,
    half_extent]^3. At most `max_rays` rays, evenly strided, keep the cost bounded. Zero (still
    connected to the SDF) without rays."""
    if origins.shape[0] == 0:
        return sdf_at(origins.new_zeros(1, 3)).sum() * 0.0 + 0.0  # + 0.0: a plain zero, not -0.0
    o, d = origins, directions
    if o.shape[0] > max_rays:
        keep = torch.linspace(0, o.shape[0] - 1, max_rays, device=o.device).round().long()
        o, d = o[keep], d[keep]
    # Slab intersection of each ray with the box; every carved pixel lies inside the silhouette,
    # so its ray crosses the box.
    inverse = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0, t1 = (-half_extent - o) * inverse, (half_extent - o) * inverse
    near = torch.minimum(t0, t1).max(dim=-1).values.clamp_min(0.0)
    far = torch.maximum(t0, t1).min(dim=-1).values
    fractions = (torch.arange(samples, device=o.device, dtype=o.dtype) + 0.5) / samples
    depths = near[:, None] + (far - near).clamp_min(0.0)[:, None] * fractions[None]  # (R, K)
    points = o[:, None] + depths[..., None] * d[:, None]  # (R, K, 3)
    return torch.relu(-sdf_at(points.reshape(-1, 3))).mean()


class CarvedRays:
    """The rays carving found in the last `memory` steps, each with the step it was found at.

    The guidance shows a hole only now and then: in a 150-step toy run of "a yellow torus"
    the denoised image showed one on 18-20 steps, and between them SDS fills back what carving
    opened (with every t weighted alike it filled every torus' hole). Carving along the rays
    of the last `memory` steps keeps what the guidance asked for open until it asks again;
    memory 1 carves only what the current step found.

    A hole is remembered only once it has been seen on `confirm` steps: while the rays in memory
    were found on fewer, only the current step's rays are carved. False holes (dark patches of a
    denoised image) come alone or in pairs — in the toy runs that a 20-step memory drilled, a gray
    cube and a white cylinder, the guidance showed background on 3 and 1 of 150 steps (the cube's
    at steps 50, 127 and 134) — whereas a torus' hole is shown on step after step (10 of its
    first 25 steps)."""

    def __init__(self, memory: int, device: torch.device | str = "cpu", confirm: int = 2) -> None:
        if memory < 1:
            raise ValueError(f"carving memory must be at least 1 step, got {memory}")
        if confirm < 1:
            raise ValueError(f"a hole must be seen on at least 1 step to be remembered, got {confirm}")
        self.memory, self.confirm = memory, confirm
        self.steps = torch.zeros(0, dtype=torch.long, device=device)
        self.origins = torch.zeros(0, 3, device=device)
        self.directions = torch.zeros(0, 3, device=device)

    def add(self, step: int, origins: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Remember the rays origins (R, 3), directions (R, 3) found at `step`, forget those found
        `memory` or more steps before it, and return the rays to carve now: the remembered ones,
        oldest first, when they were found on `confirm` steps or more, else the given ones."""
        steps = torch.full((origins.shape[0],), step, dtype=torch.long, device=self.steps.device)
        self.steps = torch.cat([self.steps, steps])
        self.origins = torch.cat([self.origins, origins.detach().to(self.origins)])
        self.directions = torch.cat([self.directions, directions.detach().to(self.directions)])
        recent = self.steps > step - self.memory
        self.steps, self.origins, self.directions = self.steps[recent], self.origins[recent], self.directions[recent]
        if self.steps.unique().numel() < self.confirm:
            return origins, directions
        return self.origins, self.directions

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"steps": self.steps, "origins": self.origins, "directions": self.directions}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.steps.device
        self.steps, self.origins, self.directions = (state[k].to(device) for k in ("steps", "origins", "directions"))
