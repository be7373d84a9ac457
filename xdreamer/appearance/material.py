"""The appearance stage's material: a neural field over the fixed mesh's bounding box giving the
PBR parameters at every surface point (Fantasia3D / X-Dreamer)."""

from __future__ import annotations

import math

import torch
from torch import nn

from xdreamer.encoding import FrequencyEncoding, HashEncoding, MLP
from xdreamer.mesh import Mesh


class MaterialError(ValueError):
    """A bad material option (unknown encoding or metallic mode, empty box)."""


class MaterialNetwork(nn.Module):
    """positions (N, 3) world -> dict of PBR channels, `render_pbr`'s material_fn contract:
    kd (N, 3) in kd_range, occlusion (N, 1) in occlusion_range, roughness (N, 1) in
    roughness_range, metallic (N, 1) in [0, 1] (or 0 with metallic="zero", as the authors' code),
    normal_perturbation (N, 3): tangent-space normal, xy in [-1, 1], z in [0, 1] (METHOD's), or
    with `max_normal_tilt_deg` < 90: z = 1 and xy in [-a, a], a = tan(max tilt) / sqrt(2), so the
    perturbed normal leans at most that far from the surface normal.

    Positions are normalized to [0, 1] over `bbox` (the mesh's box padded by `padding` of its
    size), encoded by a hash grid (or frequencies) and decoded by one hidden layer of 32 into
    9 sigmoid outputs."""

    def __init__(
        self,
        bbox: torch.Tensor,
        encoding: str = "hash",
        metallic: str = "learned",
        kd_range: tuple[float, float] = (0.03, 0.97),
        roughness_range: tuple[float, float] = (0.08, 0.9),
        occlusion_range: tuple[float, float] = (0.0, 1.0),
        hidden: int = 32,
        log2_table_size: int = 19,
        max_normal_tilt_deg: float = 90.0,
        frequency_count: int = 8,
    ) -> None:
        super().__init__()
        if metallic not in ("learned", "zero"):
            raise MaterialError(f"metallic must be 'learned' or 'zero', got {metallic!r}")
        if not 0.0 < max_normal_tilt_deg <= 90.0:
            raise MaterialError(f"max_normal_tilt_deg must be in (0, 90], got {max_normal_tilt_deg}")
        self.max_normal_tilt_deg = float(max_normal_tilt_deg)
        if encoding == "hash":
            self.encoding = HashEncoding(
                n_levels=16, features_per_level=2, log2_table_size=log2_table_size, base_resolution=16, finest_resolution=4096
            )
        elif encoding == "frequency":
            self.encoding = FrequencyEncoding(n_frequencies=frequency_count)
        else:
            raise MaterialError(f"encoding must be 'hash' or 'frequency', got {encoding!r}")
        bbox = torch.as_tensor(bbox, dtype=torch.float32)
        if bbox.shape != (2, 3) or not bool((bbox[1] > bbox[0]).all()):
            raise MaterialError("material bbox must be (2, 3) [min, max] with max > min on every axis")
        self.register_buffer("bbox", bbox)
        self.metallic = metallic
        self.ranges = {"kd": kd_range, "roughness": roughness_range, "occlusion": occlusion_range}
        self.net = MLP(self.encoding.output_dim, 9, hidden=hidden, n_hidden_layers=1)

    @staticmethod
    def for_mesh(mesh: Mesh, padding: float = 0.05, **options) -> MaterialNetwork:
        """A network over `mesh`'s bounding box grown by `padding` x its extent on each side."""
        vertices = mesh.vertices.detach()
        low, high = vertices.min(0).values, vertices.max(0).values
        margin = (high - low).clamp_min(1e-3) * padding
        return MaterialNetwork(torch.stack([low - margin, high + margin]), **options).to(mesh.device)

    def forward(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """positions: (N, 3) world -> dict(kd, occlusion, roughness, metallic, normal_perturbation)."""
        x = ((positions - self.bbox[0]) / (self.bbox[1] - self.bbox[0])).clamp(0, 1)
        out = torch.sigmoid(self.net(self.encoding(x).to(positions.dtype)))

        def ranged(values: torch.Tensor, name: str) -> torch.Tensor:
            low, high = self.ranges[name]
            return low + (high - low) * values

        # Fantasia3D's channel order: kd (3), ks = (occlusion, roughness, metallic), normal (3).
        metallic = out[:, 5:6] if self.metallic == "learned" else torch.zeros_like(out[:, 5:6])
        return {
            "kd": ranged(out[:, 0:3], "kd"),
            "occlusion": ranged(out[:, 3:4], "occlusion"),
            "roughness": ranged(out[:, 4:5], "roughness"),
            "metallic": metallic,
            "normal_perturbation": self._normal_perturbation(out[:, 6:9]),
        }

    def _normal_perturbation(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, 3) sigmoid outputs -> tangent-space normals within the tilt bound."""
        if self.max_normal_tilt_deg >= 90.0:
            return torch.cat([raw[:, :2] * 2 - 1, raw[:, 2:3]], dim=-1)
        half_width = math.tan(math.radians(self.max_normal_tilt_deg)) / math.sqrt(2)
        return torch.cat([(raw[:, :2] * 2 - 1) * half_width, torch.ones_like(raw[:, 2:3])], dim=-1)
