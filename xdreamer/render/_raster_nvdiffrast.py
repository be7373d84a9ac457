"""nvdiffrast backend (CUDA): one RasterizeCudaContext per device and process, images flipped to
row 0 at the top.

nvdiffrast puts row 0 at NDC y = -1; flipping its outputs (and flipping back what goes into its
antialiaser) gives the project's layout with identical pixel centres."""

from __future__ import annotations

import functools
import sys

import torch

NOT_INSTALLED = "nvdiffrast is not installed (pip install 'xdreamer[cuda]')"


class NvdiffrastContext:
    """The CUDA rasterization context of one device."""

    def __init__(self, device: torch.device):
        import nvdiffrast.torch as dr

        self.dr = dr
        self.context = _make_context(dr, device)

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


def _make_context(dr, device: torch.device):
    """nvdiffrast's RasterizeCudaContext, past a defect of nvdiffrast 0.3.3 on current PyTorch.

    Its first context builds the CUDA plugin with `torch.utils.cpp_extension.load` and then imports
    the plugin by name; current PyTorch loads the built module without putting its build folder on
    `sys.path`, so that import fails with ModuleNotFoundError although the build succeeded (seen on
    an H200 with torch 2.11; NVlabs/nvdiffrast pull request 228). The folder is then put on the path
    and the context made again, which imports the plugin already built."""
    try:
        return dr.RasterizeCudaContext(device=device)
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("nvdiffrast_plugin"):
            raise
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(error.name, verbose=False)
        if folder in sys.path:
            raise
        sys.path.append(folder)
        return dr.RasterizeCudaContext(device=device)


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
