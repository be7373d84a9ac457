"""nvdiffrast backend (CUDA): one RasterizeCudaContext per device, images flipped to row 0 at the top.

nvdiffrast puts row 0 at NDC y = -1; flipping its outputs (and flipping back what goes into its
antialiaser) gives the project's layout with identical pixel centres."""

from __future__ import annotations

import torch


def available() -> bool:
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError:
        return False
    return True


class NvdiffrastContext:
    """The CUDA rasterization context of one device."""

    def __init__(self, device: torch.device):
        import nvdiffrast.torch as dr

        self.dr = dr
        self.context = dr.RasterizeCudaContext(device=device)

    def rasterize(self, pos_clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        rast, _ = self.dr.rasterize(
            self.context, pos_clip.float().contiguous(), faces.int().contiguous(), resolution=list(resolution)
        )
        return rast.flip(1)

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        # Interpolation is per pixel, so the flipped rast can go in as it is.
        out, _ = self.dr.interpolate(attr.float().contiguous(), rast.contiguous(), faces.int().contiguous())
        return out

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, faces: torch.Tensor
    ) -> torch.Tensor:
        out = self.dr.antialias(
            color.float().flip(1).contiguous(),
            rast.flip(1).contiguous(),
            pos_clip.float().contiguous(),
            faces.int().contiguous(),
        )
        return out.flip(1)
