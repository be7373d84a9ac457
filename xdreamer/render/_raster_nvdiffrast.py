"""nvdiffrast backend (CUDA): one RasterizeCudaContext per device and process, images flipped to
row 0 at the top.

nvdiffrast puts row 0 at NDC y = -1; flipping its outputs (and flipping back what goes into its
antialiaser) gives the project's layout with identical pixel centres."""

from __future__ import annotations

import functools

import torch

NOT_INSTALLED = "nvdiffrast is not installed (pip install 'xdreamer[cuda]')"


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


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@functools.cache
def context_for(device: torch.device) -> NvdiffrastContext | str:
    """`device`'s context, made once per process, or the one-line reason none can be made.

    The `cuda` extra's diffrp-nvdiffrast compiles its CUDA plugin (nvcc, ninja) when the first
    context is created, so a missing toolchain, driver or GPU shows up here, not mid-render."""
    try:
        import nvdiffrast.torch  # noqa: F401
    except ModuleNotFoundError as error:
        return NOT_INSTALLED if (error.name or "").startswith("nvdiffrast") else _one_line(error)
    except Exception as error:  # a broken install fails at import in many ways
        return _one_line(error)
    try:
        return NvdiffrastContext(device)
    except Exception as error:  # the plugin build (RuntimeError, OSError, ...) or the driver
        return _one_line(error)
