"""MaterialNetwork: output ranges and options, and fitting it through the PBR renderer to target
images of a coloured mesh."""

import pytest
import torch
import trimesh

from xdreamer.appearance.material import MaterialError, MaterialNetwork
from xdreamer.mesh import Mesh
from xdreamer.render.camera import orbit_cameras
from xdreamer.render.light import default_environment
from xdreamer.render.raster import Rasterizer
from xdreamer.render.shade import render_pbr


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def sphere():
    s = trimesh.creation.icosphere(3, radius=0.8)
    return Mesh.from_arrays(s.vertices, s.faces)


def coloured_material(positions):
    """The target: smoothly varying colour, rough dielectric, flat normals."""
    n = positions.shape[0]
    x, y, z = positions.unbind(-1)
    kd = torch.stack([0.5 + 0.4 * torch.sin(3 * x), 0.5 + 0.4 * torch.cos(2 * y), 0.5 + 0.3 * torch.sin(2 * z + 1)], -1)
    return {
        "kd": kd,
        "roughness": positions.new_full((n, 1), 0.6),
        "metallic": positions.new_zeros(n, 1),
        "occlusion": positions.new_zeros(n, 1),
        "normal_perturbation": positions.new_tensor([0.0, 0.0, 1.0]).expand(n, 3),
    }


@pytest.mark.parametrize("encoding", ["hash", "frequency"])
def test_outputs_have_the_papers_ranges(sphere, encoding):
    net = MaterialNetwork.for_mesh(sphere, encoding=encoding, log2_table_size=12)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 10)  # saturate the sigmoids both ways
        out = net(torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert set(out) == {"kd", "occlusion", "roughness", "metallic", "normal_perturbation"}
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"kd": (4000, 3), "occlusion": (4000, 1), "roughness": (4000, 1), "metallic": (4000, 1), "normal_perturbation": (4000, 3)}
    for name, (low, high) in {"kd": (0.03, 0.97), "roughness": (0.08, 0.9), "metallic": (0, 1), "occlusion": (0, 1)}.items():
        assert float(out[name].min()) >= low - 1e-6 and float(out[name].max()) <= high + 1e-6
        assert float(out[name].max()) - float(out[name].min()) > 0.5 * (high - low)  # the range is used
    normal = out["normal_perturbation"]
    assert float(normal[:, :2].min()) >= -1 and float(normal[:, :2].max()) <= 1
    assert float(normal[:, 2].min()) >= 0 and float(normal[:, 2].max()) <= 1


def test_metallic_zero_option_and_bad_options(sphere):
    net = MaterialNetwork.for_mesh(sphere, metallic="zero", encoding="frequency")
    assert float(net(torch.randn(100, 3))["metallic"].abs().max()) == 0.0
    with pytest.raises(MaterialError, match="metallic"):
        MaterialNetwork.for_mesh(sphere, metallic="maybe")
    with pytest.raises(MaterialError, match="encoding"):
        MaterialNetwork.for_mesh(sphere, encoding="fourier")
    with pytest.raises(ValueError, match="bbox"):
        MaterialNetwork(torch.zeros(2, 3))


def test_bounding_box_is_the_padded_mesh_box(sphere):
    net = MaterialNetwork.for_mesh(sphere, padding=0.05, encoding="frequency")
    low, high = sphere.vertices.min(0).values, sphere.vertices.max(0).values
    margin = (high - low) * 0.05
    assert torch.allclose(net.bbox, torch.stack([low - margin, high + margin]))


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def fit(net, sphere, light, steps, resolution, lr):
    cameras = orbit_cameras(4, elevation=20)
    rasterizer = Rasterizer("torch")
    with torch.no_grad():
        target = render_pbr(sphere, cameras, resolution, coloured_material, light, backend=rasterizer)["rgb"]
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = ((render_pbr(sphere, cameras, resolution, net, light, backend=rasterizer)["rgb"] - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return psnr(render_pbr(sphere, cameras, resolution, net, light, backend=rasterizer)["rgb"], target)


def test_fitting_through_the_renderer_converges(sphere):
    # Frequency encoding: the pure-PyTorch hash grid's backward costs about a second per step on
    # a busy 2-core CPU; the hash path is checked for learning below.
    torch.manual_seed(0)
    light = default_environment(resolution=32)
    net = MaterialNetwork.for_mesh(sphere, encoding="frequency", metallic="zero")
    value = fit(net, sphere, light, steps=30, resolution=32, lr=3e-2)
    print(f"material fit PSNR {value:.1f} dB")
    assert value >= 28


def test_hash_material_learns_through_the_renderer(sphere):
    torch.manual_seed(0)
    light = default_environment(resolution=32)
    net = MaterialNetwork.for_mesh(sphere, encoding="hash", log2_table_size=12, metallic="zero")
    before = fit(net, sphere, light, steps=0, resolution=24, lr=3e-2)
    after = fit(net, sphere, light, steps=8, resolution=24, lr=3e-2)
    print(f"hash material PSNR {before:.1f} -> {after:.1f} dB after 8 steps")
    assert after > before + 5
    assert float(net.encoding.table.detach().abs().max()) > 1e-2  # the grid itself moved, not just the MLP
