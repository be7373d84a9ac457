"""Rasterizer: coverage, perspective-correct interpolation, w <= 0 safety, gradients, backends."""

import math
import sys
import types
import warnings

import pytest
import torch

from xdreamer.render import _raster_nvdiffrast, _raster_torch, raster
from xdreamer.render.raster import RasterError, Rasterizer, antialias, edge_neighbors, interpolate, rasterize


def centres_inside(lo: float, hi: float, size: int, flip: bool = False) -> int:
    """How many pixel centres of a `size`-pixel axis fall in the NDC interval [lo, hi]."""
    ndc = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    if flip:
        ndc = -ndc
    return int(((ndc >= lo) & (ndc <= hi)).sum())


def quad(x0, x1, y0, y1, z=0.0, w=1.0, dtype=torch.float32):
    pos = torch.tensor([[x0, y0, z, 1.0], [x1, y0, z, 1.0], [x1, y1, z, 1.0], [x0, y1, z, 1.0]], dtype=dtype)
    pos = pos * torch.tensor([w, w, w, w], dtype=dtype)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return pos, faces


def test_square_covers_the_expected_pixel_count_and_antialiased_area():
    height, width = 40, 50
    x0, x1, y0, y1 = -0.31, 0.47, -0.53, 0.22
    pos, faces = quad(x0, x1, y0, y1)
    rast = rasterize(pos, faces, (height, width), backend="torch")
    covered = rast[0, ..., 3] > 0
    assert int(covered.sum()) == centres_inside(x0, x1, width) * centres_inside(y0, y1, height)
    # Row 0 is the top: the square sits below the centre line by more than it sits above it.
    rows = covered.any(1).nonzero()[:, 0]
    assert int(rows.min()) == round((1 - y1) / 2 * height - 0.5 + 0.5)
    mask = antialias(covered[None, ..., None].float(), rast, pos, faces, backend="torch")
    area = (x1 - x0) / 2 * width * (y1 - y0) / 2 * height
    assert abs(float(mask.sum()) - area) < 1.0  # exact along straight edges, a little off at corners
    assert torch.equal(rast[0, ..., 3].unique(), torch.tensor([0.0, 1.0, 2.0]))


def test_rast_layout_and_perspective_correct_barycentrics():
    # One triangle leaning in depth: w differs per vertex, so screen-space lerp would be wrong.
    pos = torch.tensor([[-0.8, -0.7, 0.2, 1.0], [0.9, -0.6, 0.5, 1.0], [0.1, 0.8, 0.1, 1.0]], dtype=torch.float64)
    pos = pos * torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)[:, None]
    faces = torch.tensor([[0, 1, 2]])
    rast = rasterize(pos, faces, (24, 32), backend="torch")
    covered = rast[0, ..., 3] > 0
    y, x = covered.nonzero().unbind(-1)
    u, v, zw = rast[0, y, x, 0], rast[0, y, x, 1], rast[0, y, x, 2]
    bary = torch.stack([u, v, 1 - u - v], -1)
    clip = bary @ pos  # the clip-space point these barycentrics name
    ndc_x, ndc_y = (x.double() + 0.5) / 32 * 2 - 1, 1 - (y.double() + 0.5) / 24 * 2
    assert torch.allclose(clip[:, 0] / clip[:, 3], ndc_x, atol=1e-9)
    assert torch.allclose(clip[:, 1] / clip[:, 3], ndc_y, atol=1e-9)
    assert torch.allclose(clip[:, 2] / clip[:, 3], zw, atol=1e-9)
    assert (bary > -1e-9).all()
    assert covered.sum() > 100


def test_triangles_crossing_behind_the_camera_are_cut_safely():
    # A ground plane y = -1 from far in front of the camera (z = -50) to behind it (z = +50).
    fov = math.radians(60.0)
    focal, near, far = 1 / math.tan(fov / 2), 0.1, 100.0
    projection = torch.tensor(
        [
            [focal, 0, 0, 0],
            [0, focal, 0, 0],
            [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
            [0, 0, -1.0, 0],
        ],
        dtype=torch.float64,
    )
    world = torch.tensor([[-50, -1, -50, 1], [50, -1, -50, 1], [50, -1, 50, 1], [-50, -1, 50, 1.0]], dtype=torch.float64)
    pos = world @ projection.T
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    size = 48
    rast = rasterize(pos, faces, (size, size), backend="torch")
    assert torch.isfinite(rast).all()
    depth = interpolate(pos[:, 3:], rast, faces, backend="torch")[0, ..., 0]
    # Ray through each pixel centre: direction (x tan, y tan, -1) hits y = -1 at view depth t.
    ndc = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    ray_y = -ndc[:, None] / focal * torch.ones(size, size, dtype=torch.float64)
    ray_x = ndc[None, :] / focal * torch.ones(size, size, dtype=torch.float64)
    t = torch.where(ray_y < 0, -1 / ray_y, torch.full_like(ray_y, torch.inf))
    hit = (t <= 50) & ((ray_x * t).abs() <= 50)
    covered = rast[0, ..., 3] > 0
    assert int((covered != hit).sum()) == 0
    assert torch.allclose(depth[hit], t[hit], rtol=1e-6)


def test_interpolate_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(0)
    pos = torch.tensor(
        [[-0.7, -0.6, 0.1, 1.0], [0.8, -0.5, 0.3, 1.3], [0.2, 0.7, -0.2, 0.9], [-0.5, 0.6, 0.0, 1.1]],
        dtype=torch.float64,
    )
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    attr = torch.rand(4, 3, generator=generator, dtype=torch.float64)
    weight = torch.rand(1, 10, 12, 3, generator=generator, dtype=torch.float64)

    def shade(pos, attr):
        rast = rasterize(pos, faces, (10, 12), backend="torch")
        return (interpolate(attr, rast, faces, backend="torch") * weight).sum() + (rast[..., :3] * weight).sum()

    assert torch.autograd.gradcheck(lambda a: shade(pos, a), (attr.requires_grad_(),), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda p: shade(p, attr.detach()), (pos.clone().requires_grad_(),), eps=1e-6, atol=1e-6)
    variable = pos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(shade(variable, attr.detach()), variable)
    assert grad.abs().sum() > 1.0  # the position gradient is not trivially zero


def test_silhouette_gradient_moves_the_edge():
    height, width = 32, 40
    x0, x1, y0, y1 = -0.43, 0.36, -0.51, 0.47
    pos, faces = quad(x0, x1, y0, y1, dtype=torch.float64)

    def coverage(pos):
        rast = rasterize(pos, faces, (height, width), backend="torch")
        return antialias((rast[..., 3:] > 0).double(), rast, pos, faces, backend="torch").sum()

    shift = torch.zeros_like(pos, requires_grad=True)
    (grad,) = torch.autograd.grad(coverage(pos + shift), shift)
    # Moving the right edge by dx NDC adds (covered rows) * dx * W / 2 pixels.
    # Moving the right edge by dx NDC adds (covered rows) * dx * W / 2 pixels. As in nvdiffrast, a
    # corner pixel whose centre lies across the quad's diagonal from the edge sees only the
    # (interior) diagonal, so up to one row per edge may be missed.
    rows = centres_inside(y0, y1, height)
    right, left = float(grad[1, 0] + grad[2, 0]), float(grad[0, 0] + grad[3, 0])
    assert (rows - 1) * width / 2 - 1e-9 <= right <= rows * width / 2 + 1e-9
    assert (rows - 1) * width / 2 - 1e-9 <= -left <= rows * width / 2 + 1e-9
    for vertices, analytic in (([1, 2], right), ([0, 3], left)):
        eps = 1e-3
        step = torch.zeros_like(pos)
        step[vertices, 0] = eps
        finite = (coverage(pos + step) - coverage(pos - step)) / (2 * eps)
        assert float(finite) == pytest.approx(analytic, rel=1e-6)


def test_silhouette_gradient_of_a_slanted_edge_over_another_surface():
    # A near slanted triangle over a far backdrop: colours differ, both pixels of a pair covered.
    near = torch.tensor([[-0.6, -0.7, -0.5, 1.0], [0.7, -0.2, -0.5, 1.0], [-0.1, 0.75, -0.5, 1.0]], dtype=torch.float64)
    far = torch.tensor([[-1.0, -1.0, 0.5, 1.0], [1.0, -1.0, 0.5, 1.0], [1.0, 1.0, 0.5, 1.0], [-1.0, 1.0, 0.5, 1.0]], dtype=torch.float64)
    pos = torch.cat([near, far])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [3, 5, 6]])
    color = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 4, dtype=torch.float64)

    def image_sum(pos):
        rast = rasterize(pos, faces, (24, 24), backend="torch")
        assert bool((rast[..., 3] > 0).all())  # the backdrop fills the frame
        shaded = interpolate(color, rast, faces, backend="torch")
        return antialias(shaded, rast, pos, faces, backend="torch")[..., 0].sum()

    variable = pos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(image_sum(variable), variable)
    for vertex, axis in ((1, 0), (2, 1), (0, 0)):
        eps = 1e-5
        step = torch.zeros_like(pos)
        step[vertex, axis] = eps
        finite = (image_sum(pos + step) - image_sum(pos - step)) / (2 * eps)
        assert abs(float(grad[vertex, axis]) - float(finite)) < 1e-3 * max(1.0, abs(float(finite)))
        assert abs(float(finite)) > 1.0


def _coverage(pos, faces, size, backend="torch"):
    """The antialiased mask's sum: the area `faces` cover, in pixels."""
    rast = rasterize(pos, faces, size, backend=backend)
    ones = torch.ones(pos.shape[-2], 1, dtype=pos.dtype, device=pos.device)
    return antialias(interpolate(ones, rast, faces, backend=backend), rast, pos, faces, backend=backend).sum()


def _coverage_growth(pos, faces, size, backend="torch"):
    """(d coverage / ds, coverage) for the image scaled by s about its centre (clip x, y times s),
    by autograd; the area grows as s², so the rate should be 2 x coverage."""
    variable = pos.clone().requires_grad_(True)
    total = _coverage(variable, faces, size, backend)
    (grad,) = torch.autograd.grad(total, variable)
    return float((grad[..., :2] * pos[..., :2]).sum()), float(total.detach())


def test_antialiased_coverage_moves_as_fast_as_the_silhouette_area():
    # A triangle over the background: its antialiased mask sums to its area in pixels, and the
    # sum's gradient is the area's (each edge taken by one pair direction, as in nvdiffrast; taken
    # by both, the gradient was 2x the area's: 1.93x on the sphere below).
    pos = torch.tensor([[-0.6, -0.7, 0.0, 1.0], [0.7, -0.2, 0.0, 1.0], [-0.1, 0.75, 0.0, 1.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    size = (48, 48)

    def area(pos):
        p = pos[:, :2] * (size[0] / 2)
        return 0.5 * ((p[1] - p[0])[0] * (p[2] - p[0])[1] - (p[2] - p[0])[0] * (p[1] - p[0])[1]).abs()

    variable = pos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_coverage(variable, faces, size), variable)
    (expected,) = torch.autograd.grad(area(variable), variable)
    assert abs(float(_coverage(pos, faces, size)) / float(area(pos)) - 1) < 0.01
    assert float((grad[:, :2] - expected[:, :2]).abs().max()) < 0.08 * float(expected[:, :2].abs().max())
    rate, _ = _coverage_growth(pos, faces, size)  # d(area)/ds = 2 x area
    assert abs(rate / (2 * float(area(pos))) - 1) < 0.02

    # A closed sphere (silhouette between front- and back-facing triangles).
    import trimesh

    from xdreamer.render.camera import orbit_cameras

    sphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.tensor(sphere.faces)
    pos = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1) @ orbit_cameras(2).mvp().transpose(1, 2)
    size = (64, 80)
    rate, total = _coverage_growth(pos, faces, size)
    scale = torch.zeros_like(pos)
    scale[..., :2] = pos[..., :2]
    finite = float(_coverage(pos + 1e-3 * scale, faces, size) - _coverage(pos - 1e-3 * scale, faces, size)) / 2e-3
    assert abs(rate / (2 * total) - 1) < 0.02
    assert abs(rate / finite - 1) < 0.02


def test_antialias_leaves_interior_edges_and_constant_images_alone():
    pos, faces = quad(-0.6, 0.6, -0.6, 0.6)
    rast = rasterize(pos, faces, (32, 32), backend="torch")
    covered = (rast[..., 3:] > 0).float()
    mask = antialias(covered, rast, pos, faces, backend="torch")
    interior = torch.zeros_like(covered, dtype=torch.bool)
    interior[:, 8:24, 8:24] = True
    assert torch.equal(mask[interior], torch.ones(int(interior.sum())))
    flat = torch.full_like(covered, 0.25)
    assert torch.equal(antialias(flat, rast, pos, faces, backend="torch"), flat)


def test_antialias_each_equals_one_call_per_image_in_values_and_gradients():
    # A sphere from two cameras: a normal-like image and its mask, as the geometry pass draws them.
    import trimesh

    from xdreamer.render.camera import orbit_cameras
    from xdreamer.render.raster import antialias_each

    sphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.tensor(sphere.faces)
    neighbors = edge_neighbors(faces)

    def images_and_gradient(together: bool):
        variable = vertices.clone().requires_grad_(True)
        pos = torch.cat([variable, torch.ones_like(variable[:, :1])], -1) @ orbit_cameras(2).mvp().transpose(1, 2)
        rast = rasterize(pos, faces, (40, 40), backend="torch")
        shade = interpolate(variable * 0.5 + 0.5, rast, faces, backend="torch")
        covered = (rast[..., 3:] > 0).float()
        if together:
            images = antialias_each([shade, covered], rast, pos, faces, "torch", neighbors)
        else:
            images = [antialias(image, rast, pos, faces, "torch", neighbors) for image in (shade, covered)]
        weights = torch.linspace(-1, 1, 3), torch.tensor([2.0])
        loss = sum((image * weight).sum() for image, weight in zip(images, weights))
        (gradient,) = torch.autograd.grad(loss, variable)
        return images, gradient

    (shade, mask), gradient = images_and_gradient(True)
    (shade_alone, mask_alone), gradient_alone = images_and_gradient(False)
    assert torch.equal(shade, shade_alone) and torch.equal(mask, mask_alone)
    assert torch.equal(gradient, gradient_alone)
    # The silhouette is there to blend: some mask pixels are partial, the gradient is not zero.
    assert int(((mask > 0.01) & (mask < 0.99)).sum()) > 50
    assert float(gradient.abs().max()) > 0


def test_edge_neighbors_of_a_closed_mesh():
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])  # a tetrahedron
    neighbors = edge_neighbors(faces)
    assert (neighbors >= 0).all()
    for face in range(4):
        for i in range(3):
            shared = {int(faces[face, (i + 1) % 3]), int(faces[face, (i + 2) % 3])}
            assert shared <= set(faces[neighbors[face, i]].tolist())
    assert torch.equal(edge_neighbors(faces[:1]), torch.full((1, 3), -1))


def test_batches_chunks_and_errors():
    pos, faces = quad(-0.5, 0.6, -0.4, 0.3)
    batch = torch.stack([pos, pos * torch.tensor([1.0, -1.0, 1.0, 1.0])])
    rast = rasterize(batch, faces, (16, 20), backend="torch")
    assert rast.shape == (2, 16, 20, 4)
    assert torch.equal(rast[1, ..., 3] > 0, (rast[0, ..., 3] > 0).flip(0))  # y mirrored = rows flipped
    chunked = _raster_torch.rasterize(batch, faces.long(), (16, 20), max_pixels=7)
    assert torch.equal(chunked, rast)
    with pytest.raises(RasterError, match="backend"):
        Rasterizer("opengl")
    with pytest.raises(RasterError, match="pos_clip"):
        rasterize(pos[:, :3], faces, 8, backend="torch")
    with pytest.raises(RasterError, match="resolution"):
        rasterize(pos, faces, (0, 8), backend="torch")


def _fake_nvdiffrast(monkeypatch, make_context) -> types.ModuleType:
    """Install a fake `nvdiffrast.torch` whose RasterizeCudaContext is `make_context`, with the
    rasterizer's per-process probes reset (and reset again after the test)."""
    package, module = types.ModuleType("nvdiffrast"), types.ModuleType("nvdiffrast.torch")
    module.RasterizeCudaContext = make_context
    package.torch = module
    monkeypatch.setitem(sys.modules, "nvdiffrast", package)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", module)
    for cache in (_raster_nvdiffrast.context_for, raster._warn_once):
        cache.cache_clear()
    return module


@pytest.fixture
def clean_probes():
    yield
    _raster_nvdiffrast.context_for.cache_clear()
    raster._warn_once.cache_clear()


def test_auto_falls_back_to_torch_once_when_no_context_can_be_made(monkeypatch, clean_probes):
    attempts = []

    def failing_build(device):
        attempts.append(device)
        raise RuntimeError("Error building extension 'nvdiffrast_plugin': ninja: build stopped\nnvcc not found")

    _fake_nvdiffrast(monkeypatch, failing_build)
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = Rasterizer("auto"), Rasterizer("auto")
        assert [first.backend_for(cuda), second.backend_for(cuda), first.backend_for(cuda)] == ["torch"] * 3
    assert attempts == [cuda]  # probed once per process and device, however many rasterizers
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "nvdiffrast_plugin" in messages[0] and "torch rasterizer" in messages[0]
    with pytest.raises(RasterError) as info:
        Rasterizer("nvdiffrast").backend_for(cuda)
    assert "\n" not in str(info.value) and "nvdiffrast_plugin" in str(info.value)
    assert attempts == [cuda]

    # what the auto rasterizer draws is the torch backend's, value for value
    pos, faces = quad(-0.5, 0.6, -0.4, 0.3)
    attr = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    images = []
    for rasterizer in (first, Rasterizer("torch")):
        rast = rasterizer.rasterize(pos, faces, (16, 20))
        images.append(rasterizer.antialias(rasterizer.interpolate(attr, rast, faces), rast, pos, faces))
    assert torch.equal(images[0], images[1]) and images[0].abs().sum() > 0


def test_missing_nvdiffrast_falls_back_and_explicit_request_fails(monkeypatch, clean_probes):
    monkeypatch.setitem(sys.modules, "nvdiffrast", None)  # import raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)
    _raster_nvdiffrast.context_for.cache_clear()
    raster._warn_once.cache_clear()
    cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=r"not installed \(pip install 'xdreamer\[cuda\]'\)"):
        assert Rasterizer("auto").backend_for(cuda) == "torch"
    with pytest.raises(RasterError, match="cannot run on cuda:0: nvdiffrast is not installed"):
        Rasterizer("nvdiffrast").backend_for(cuda)
    with pytest.raises(RasterError, match="needs CUDA tensors"):
        Rasterizer("nvdiffrast").backend_for("cpu")


def test_plugin_built_but_not_importable_by_name_is_imported_from_its_build_folder(
    monkeypatch, tmp_path, clean_probes
):
    # nvdiffrast 0.3.3 on torch >= 2.x: the plugin builds, then `import <plugin name>` fails because
    # the build folder is not on sys.path (seen on an H200, torch 2.11).
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    plugin = "nvdiffrast_plugin_0_3_3_1_torch2_11_0_cu130"
    folder = str(tmp_path / plugin)
    attempts = []

    def make_context(device):
        attempts.append(folder in sys.path)
        if folder not in sys.path:
            raise ModuleNotFoundError(f"No module named '{plugin}'", name=plugin)
        return "context"

    _fake_nvdiffrast(monkeypatch, make_context)
    cuda = torch.device("cuda", 0)
    assert Rasterizer("nvdiffrast").backend_for(cuda) == "nvdiffrast"
    assert attempts == [False, True] and sys.path.count(folder) == 1
    assert _raster_nvdiffrast.context_for(cuda).context == "context"

    # another missing module is not this defect: one line, no retry
    _raster_nvdiffrast.context_for.cache_clear()
    attempts.clear()

    def missing_dependency(device):
        attempts.append(device)
        raise ModuleNotFoundError("No module named 'ninja'", name="ninja")

    _fake_nvdiffrast(monkeypatch, missing_dependency)
    with pytest.raises(RasterError, match=r"cannot run on cuda:0: ModuleNotFoundError: No module named 'ninja'$"):
        Rasterizer("nvdiffrast").backend_for(cuda)
    assert attempts == [cuda]


class _TorchAsNvdiffrast:
    """nvdiffrast.torch's functions on the CPU, in nvdiffrast's layout (row 0 at NDC y = -1)."""

    made = []

    def RasterizeCudaContext(device):  # noqa: N802 - nvdiffrast's name
        _TorchAsNvdiffrast.made.append(device)
        return "context"

    def rasterize(context, pos, tri, resolution):
        assert context == "context" and tri.dtype == torch.int32
        return _raster_torch.rasterize(pos, tri.long(), tuple(resolution)).flip(1), None

    def interpolate(attr, rast, tri):
        return _raster_torch.interpolate(attr, rast, tri.long()), None

    def antialias(color, rast, pos, tri):
        return _raster_torch.antialias(color.flip(1), rast.flip(1), pos, tri.long(), None).flip(1)


def test_nvdiffrast_adapter_flips_rows_exactly_once_each_way(monkeypatch, clean_probes):
    module = _fake_nvdiffrast(monkeypatch, _TorchAsNvdiffrast.RasterizeCudaContext)
    for name in ("rasterize", "interpolate", "antialias"):
        setattr(module, name, getattr(_TorchAsNvdiffrast, name))
    _TorchAsNvdiffrast.made = []
    context = _raster_nvdiffrast.context_for(torch.device("cpu"))  # the CPU stands in for a GPU
    assert _raster_nvdiffrast.context_for(torch.device("cpu")) is context
    assert _TorchAsNvdiffrast.made == [torch.device("cpu")]
    pos, faces = quad(-0.7, 0.2, -0.1, 0.8)  # off-centre vertically: a missing flip shows
    pos = pos[None]
    attr = torch.rand(1, 4, 2, generator=torch.Generator().manual_seed(1))
    rast = context.rasterize(pos, faces, (12, 10))
    assert torch.equal(rast, _raster_torch.rasterize(pos, faces, (12, 10)))
    color = context.interpolate(attr, rast, faces)
    assert torch.equal(color, _raster_torch.interpolate(attr, rast, faces))
    assert torch.equal(context.antialias(color, rast, pos, faces), _raster_torch.antialias(color, rast, pos, faces, None))


def _nvdiffrast_missing() -> str:
    if not torch.cuda.is_available():
        return "needs CUDA (no GPU here)"
    if Rasterizer("auto").backend_for(torch.device("cuda")) != "nvdiffrast":
        return "needs nvdiffrast (pip install 'xdreamer[cuda]')"
    return ""


@pytest.mark.skipif(bool(_nvdiffrast_missing()), reason=_nvdiffrast_missing() or "ok")
def test_nvdiffrast_and_torch_backends_agree():
    import trimesh

    from xdreamer.render.camera import orbit_cameras

    sphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32, device="cuda")
    faces = torch.tensor(sphere.faces, device="cuda")
    mvp = orbit_cameras(2).mvp().cuda()
    pos = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1) @ mvp.transpose(1, 2)
    results = {}
    for backend in ("torch", "nvdiffrast"):
        rasterizer = Rasterizer(backend)
        rast = rasterizer.rasterize(pos, faces, (64, 80))
        color = rasterizer.interpolate(vertices, rast, faces)
        results[backend] = rast, color, rasterizer.antialias(color, rast, pos, faces)
    (rast_t, color_t, image_t), (rast_n, color_n, image_n) = results["torch"], results["nvdiffrast"]
    # nvdiffrast snaps vertices to 1/16 pixel (CR_SUBPIXEL_LOG2 = 4), so pixel centres that close
    # to an edge may fall in the other triangle: 0.994 of pixels agree here (H200, torch 2.11).
    same = rast_t[..., 3] == rast_n[..., 3]
    assert float(same.float().mean()) > 0.99
    assert torch.allclose(rast_t[..., :3][same], rast_n[..., :3][same], atol=1e-4)  # measured 9e-6
    assert torch.allclose(color_t[same], color_n[same], atol=1e-4)  # measured 1.2e-6
    # measured 0.0056 when the torch antialiaser still took each edge in both pair directions
    assert (image_t - image_n).abs().mean() < 0.01
    # Both antialiasers move coverage as fast as the silhouette area grows: scaling the image by s
    # about its centre, d(coverage)/ds = 2 x coverage (the torch one within 1 %, on the CPU too).
    for backend in ("torch", "nvdiffrast"):
        rate, total = _coverage_growth(pos, faces, (64, 80), backend)
        assert abs(rate / (2 * total) - 1) < 0.05, backend
