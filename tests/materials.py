"""An analytic material for the bake and export tests, in render_pbr's material contract."""

import torch
import torch.nn.functional as F


def smooth_material(positions: torch.Tensor, perturbation: tuple[float, float, float] = (0.0, 0.0, 1.0)) -> dict:
    """positions (N, 3) -> smoothly varying kd (N, 3), roughness, metallic, occlusion (N, 1), and one
    normal perturbation (N, 3) everywhere ((0, 0, 1): the shading normal is the mesh's own)."""
    n = positions.shape[0]
    return {
        "kd": 0.5 + 0.4 * positions,
        "roughness": 0.5 + 0.3 * positions[:, 1:2],
        "metallic": 0.5 + 0.3 * positions[:, 0:1],
        "occlusion": positions.new_zeros(n, 1),
        "normal_perturbation": F.normalize(positions.new_tensor(perturbation), dim=0).expand(n, 3),
    }
