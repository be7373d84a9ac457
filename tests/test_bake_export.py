"""Export: xatlas unwrap, texture baking (orientation, gutters, render round trip), OBJ and GLB
files that other tools read back, and the Khronos glTF-Validator."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from materials import smooth_material

from xdreamer.appearance.material import MaterialNetwork
from xdreamer.export.bake import bake_textures, fill_gutters, texture_images, unwrap
from xdreamer.export.gltf import write_glb
from xdreamer.export.obj import write_obj
from xdreamer.mesh import Mesh
from xdreamer.render.camera import orbit_cameras
from xdreamer.render.light import default_environment
from xdreamer.render.shade import linear_to_srgb, render_pbr, render_textured, sample_texture, srgb_to_linear

VALIDATOR = Path(__file__).resolve().parents[1] / "tools" / "gltf-validator"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def mesh():
    # A lumpy sphere: curved everywhere, several xatlas charts.
    s = trimesh.creation.icosphere(3, radius=0.7)
    v = torch.tensor(s.vertices, dtype=torch.float32)
    v = v * (1 + 0.15 * torch.sin(3 * v[:, :1]) * torch.cos(2 * v[:, 1:2]))
    return Mesh(v, torch.tensor(s.faces, dtype=torch.int64))


@pytest.fixture(scope="module")
def material(mesh):
    """A smooth, colourful material with varying roughness, metal and normal perturbation."""
    torch.manual_seed(0)
    net = MaterialNetwork.for_mesh(mesh, encoding="frequency")
    return net.eval()


@pytest.fixture(scope="module")
def baked(mesh, material):
    atlas = unwrap(mesh, texture_size=512)
    return atlas, bake_textures(atlas, material, size=512, backend="torch")


@pytest.fixture(scope="module")
def light():
    return default_environment(resolution=32)


def test_unwrap_keeps_the_surface(mesh, baked):
    atlas, _ = baked
    assert atlas.uvs.shape == (atlas.vertices.shape[0], 2)
    assert float(atlas.uvs.min()) >= 0 and float(atlas.uvs.max()) <= 1
    assert atlas.faces.shape == mesh.faces.shape
    assert atlas.vertices.shape[0] > mesh.vertices.shape[0]  # seams duplicate vertices
    assert abs(float(atlas.area() - mesh.area())) < 1e-5 * float(mesh.area())
    assert abs(float(atlas.volume() - mesh.volume())) < 1e-5 * float(mesh.volume())


def test_fill_gutters_copies_the_nearest_covered_texel():
    texture = torch.zeros(5, 5, 1)
    texture[1, 1], texture[3, 4] = 1.0, 2.0
    covered = texture[..., 0] > 0
    filled = fill_gutters(texture, covered)[..., 0]
    assert filled[1, 1] == 1 and filled[3, 4] == 2  # covered texels untouched
    assert filled[0, 0] == 1 and filled[4, 4] == 2 and filled[2, 0] == 1 and filled[4, 3] == 2


def test_baked_texels_sit_where_the_uvs_point(baked):
    atlas, _ = baked
    maps = bake_textures(atlas, smooth_material, size=256, backend="torch")
    # Texture lookups at each vertex's uv return the material at that vertex: checks the UV
    # raster orientation (row 0 = v = 0) and the gutter fill at chart borders (vertices are
    # chart corners, so every lookup there touches gutter texels).
    expected = smooth_material(atlas.vertices)
    for name in ("kd", "roughness", "metallic"):
        error = (sample_texture(maps[name], atlas.uvs) - expected[name]).abs()
        assert float(error.mean()) < 0.003 and float(error.max()) < 0.02, name
    coverage = float(maps["mask"].mean())
    assert 0.3 < coverage < 0.95
    # The unperturbed normal is +z in the UV tangent frame on every texel, gutters included.
    assert float((maps["normal"] - torch.tensor([0.0, 0.0, 1.0])).abs().max()) < 1e-4


def test_bake_round_trip_renders_match(mesh, baked, material, light):
    atlas, maps = baked
    cameras = orbit_cameras(4, elevation=20)
    with torch.no_grad():
        neural = render_pbr(mesh, cameras, 96, material, light, backend="torch")
        textured = render_textured(atlas, cameras, 96, maps, light, backend="torch")
    value = psnr(neural["rgb"], textured["rgb"])
    print(f"bake round trip PSNR {value:.1f} dB")
    assert value >= 30
    assert psnr(neural["normal"], textured["normal"]) >= 30


def assets_from_images(images):
    """Decoded 8-bit images -> the float maps render_textured reads."""
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32) / 255.0)  # noqa: E731
    orm = f(images["orm"])
    return {
        "kd": srgb_to_linear(f(images["base_color"])[..., :3]),
        "occlusion": 1 - orm[..., 0:1],
        "roughness": orm[..., 1:2],
        "metallic": orm[..., 2:3],
        "normal": f(images["normal"])[..., :3] * 2 - 1,
    }


def test_glb_reloads_with_pbr_textures_and_renders_the_same(tmp_path, baked, material, light):
    atlas, maps = baked
    path = write_glb(tmp_path / "asset.glb", atlas, maps)
    scene = trimesh.load(path)
    geometry = next(iter(scene.geometry.values()))
    pbr = geometry.visual.material
    assert isinstance(pbr, trimesh.visual.material.PBRMaterial)
    for texture in (pbr.baseColorTexture, pbr.metallicRoughnessTexture, pbr.normalTexture):
        assert texture is not None and texture.size == (512, 512)
    assert geometry.vertices.shape == atlas.vertices.shape
    assert np.allclose(geometry.vertices, atlas.vertices.numpy(), atol=1e-6)
    # trimesh stores uvs with v up; glTF's (and Mesh.uvs') origin is the top-left.
    assert np.allclose(geometry.visual.uv[:, 0], atlas.uvs[:, 0].numpy(), atol=1e-6)
    assert np.allclose(geometry.visual.uv[:, 1], 1 - atlas.uvs[:, 1].numpy(), atol=1e-6)
    expected = texture_images(maps)
    assert np.array_equal(np.asarray(pbr.baseColorTexture.convert("RGB")), expected["base_color"])

    reloaded = Mesh(
        torch.tensor(geometry.vertices, dtype=torch.float32),
        torch.tensor(geometry.faces, dtype=torch.int64),
        torch.tensor(np.stack([geometry.visual.uv[:, 0], 1 - geometry.visual.uv[:, 1]], -1), dtype=torch.float32),
    )
    images = {
        "base_color": pbr.baseColorTexture.convert("RGB"),
        "orm": pbr.metallicRoughnessTexture.convert("RGB"),
        "normal": pbr.normalTexture.convert("RGB"),
    }
    cameras = orbit_cameras(3, elevation=10)
    with torch.no_grad():
        original = render_pbr(atlas, cameras, 96, material, light, backend="torch")
        exported = render_textured(reloaded, cameras, 96, assets_from_images(images), light, backend="torch")
    value = psnr(original["rgb"], exported["rgb"])
    print(f"GLB (8-bit textures) round trip PSNR {value:.1f} dB")
    assert value >= 30


def test_glb_layout_follows_the_spec(tmp_path, baked):
    import pygltflib

    atlas, maps = baked
    path = write_glb(tmp_path / "asset.glb", atlas, maps)
    gltf = pygltflib.GLTF2().load(str(path))
    blob = gltf.binary_blob()
    assert len(blob) % 4 == 0 and gltf.buffers[0].byteLength == len(blob)
    for view in gltf.bufferViews:
        assert view.byteOffset % 4 == 0
    primitive = gltf.meshes[0].primitives[0]
    position = gltf.accessors[primitive.attributes.POSITION]
    assert np.allclose(position.min, atlas.vertices.min(0).values.numpy()) and np.allclose(position.max, atlas.vertices.max(0).values.numpy())
    targets = {gltf.bufferViews[gltf.accessors[a].bufferView].target for a in (primitive.attributes.POSITION, primitive.attributes.NORMAL, primitive.attributes.TANGENT, primitive.attributes.TEXCOORD_0)}
    assert targets == {34962}
    assert gltf.bufferViews[gltf.accessors[primitive.indices].bufferView].target == 34963
    tangent_view = gltf.bufferViews[gltf.accessors[primitive.attributes.TANGENT].bufferView]
    tangents = np.frombuffer(blob[tangent_view.byteOffset : tangent_view.byteOffset + tangent_view.byteLength], np.float32).reshape(-1, 4)
    assert set(np.unique(tangents[:, 3]).tolist()) <= {-1.0, 1.0}
    assert np.allclose(np.linalg.norm(tangents[:, :3], axis=-1), 1, atol=1e-5)
    material = gltf.materials[0]
    assert material.pbrMetallicRoughness.metallicRoughnessTexture.index == material.occlusionTexture.index
    assert material.normalTexture is not None


def test_glb_passes_the_khronos_validator(tmp_path, baked):
    node = shutil.which("node")
    if node is None or not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("glTF-Validator not installed: run `npm ci --prefix tools/gltf-validator` (needs node)")
    atlas, maps = baked
    path = write_glb(tmp_path / "asset.glb", atlas, maps)
    result = subprocess.run([node, str(VALIDATOR / "validate.js"), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    issues = json.loads(result.stdout)
    print("glTF-Validator:", issues["numErrors"], "errors,", issues["numWarnings"], "warnings")
    assert issues["numErrors"] == 0, issues["messages"]
    assert issues["numWarnings"] == 0, issues["messages"]


def test_obj_writes_pbr_mtl_and_flipped_vt(tmp_path, baked):
    atlas, maps = baked
    written = write_obj(tmp_path / "asset.obj", atlas, maps)
    assert {p.name for p in written} == {
        "asset.obj", "asset.mtl", "asset_basecolor.png", "asset_roughness.png", "asset_metallic.png", "asset_normal.png",
    }
    mtl = (tmp_path / "asset.mtl").read_text()
    for key in ("map_Kd asset_basecolor.png", "map_Pr asset_roughness.png", "map_Pm asset_metallic.png", "norm asset_normal.png", "map_Bump -bm 1.000000 asset_normal.png"):
        assert key in mtl
    vt = np.array([[float(x) for x in line.split()[1:]] for line in (tmp_path / "asset.obj").read_text().splitlines() if line.startswith("vt ")])
    assert np.allclose(vt[:, 0], atlas.uvs[:, 0].numpy(), atol=1e-6)
    assert np.allclose(vt[:, 1], 1 - atlas.uvs[:, 1].numpy(), atol=1e-6)
    loaded = trimesh.load(tmp_path / "asset.obj", process=False, maintain_order=True)
    assert loaded.faces.shape == tuple(atlas.faces.shape)
    assert abs(loaded.area - float(atlas.area())) < 1e-4
    image = np.asarray(loaded.visual.material.image.convert("RGB"))
    kd_srgb = linear_to_srgb(maps["kd"]).numpy()
    assert np.abs(image / 255.0 - kd_srgb).max() <= 0.5 / 255 + 1e-6


def test_obj_shares_positions_across_uv_seams(tmp_path, mesh, baked):
    """Each position is written once and the seam copies differ only in vt: every edge of the
    closed input is shared by exactly two faces, running opposite ways, in the reloaded OBJ."""
    atlas, maps = baked
    write_obj(tmp_path / "asset.obj", atlas, maps)
    lines = (tmp_path / "asset.obj").read_text().splitlines()
    v = np.array([[float(x) for x in line.split()[1:]] for line in lines if line.startswith("v ")])
    vt = np.array([[float(x) for x in line.split()[1:]] for line in lines if line.startswith("vt ")])
    vn = np.array([[float(x) for x in line.split()[1:]] for line in lines if line.startswith("vn ")])
    corners = np.array([[[int(i) - 1 for i in c.split("/")] for c in line.split()[1:]] for line in lines if line.startswith("f ")])
    assert v.shape[0] == mesh.vertices.shape[0] < atlas.vertices.shape[0]  # the seam copies are gone
    assert vt.shape[0] == atlas.vertices.shape[0] and vn.shape[0] == v.shape[0]
    faces = atlas.faces.numpy()
    assert np.array_equal(corners[..., 1], faces)  # vt keeps the unwrap's indexing
    assert np.abs(v[corners[..., 0]] - atlas.vertices.numpy()[faces]).max() < 1e-6
    assert np.abs(vt[:, 0] - atlas.uvs[:, 0].numpy()).max() < 1e-6
    assert np.abs(vt[:, 1] - (1 - atlas.uvs[:, 1].numpy())).max() < 1e-6
    assert np.array_equal(corners[..., 2], corners[..., 0])

    position = corners[..., 0]
    directed = np.stack([position, np.roll(position, -1, axis=1)], -1).reshape(-1, 2)
    _, counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    assert (counts == 2).all()
    assert np.unique(directed, axis=0).shape[0] == directed.shape[0]
    reloaded = trimesh.Trimesh(v, position, process=False)
    assert reloaded.is_watertight and reloaded.is_winding_consistent and reloaded.euler_number == 2
    assert abs(reloaded.volume - float(mesh.volume())) < 1e-4 * float(mesh.volume())
