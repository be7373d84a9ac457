import math

import pytest
import torch

from xdreamer.render.camera import orbit_cameras
from xdreamer.render.light import default_environment
from xdreamer.toy.dataset import (
    OBJECT_SHAPES,
    OVERHEAD_EVERY,
    ToyDataset,
    build_dataset,
    downsample,
    is_overhead,
    render_object,
    render_placed,
)
from xdreamer.toy.train import ToyTrainingConfig
from xdreamer.toy.world import (
    BOX_DEPTH,
    BOX_HEIGHTS,
    COLOURS,
    CONTRAST_SHAPES,
    FRONT_COLOURS,
    FRONT_SHAPES,
    FRONT_YAW_JITTER,
    HELD_OUT,
    HELD_OUT_OBJECTS,
    SHAPES,
    VIEWS,
    Placement,
    ToyObject,
    ToyWorldError,
    caption,
    box_stretch,
    caption_words,
    colour_difference,
    front_objects,
    ground_truth_sdf,
    mug_mesh,
    parse_caption,
    primitive_mesh,
    sample_placement,
    training_objects,
    training_pairs,
)

CONVEX = ("sphere", "cube", "cylinder", "cone", "pyramid")


@pytest.fixture(scope="module")
def light():
    return default_environment()


@pytest.mark.parametrize("shape", SHAPES + FRONT_SHAPES)
def test_primitive_is_closed_outward_and_unit_bounded(shape):
    mesh = primitive_mesh(shape)
    surface = mesh.to_trimesh()
    assert surface.is_watertight and surface.is_winding_consistent
    assert float(mesh.volume()) > 0.1  # positive: faces point outward
    assert float(mesh.vertices.norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-6)
    centre = (mesh.vertices.min(0).values + mesh.vertices.max(0).values) / 2
    assert centre.abs().max().item() < 1e-6
    if shape in CONVEX:
        # Every face of a convex solid around the origin faces away from it.
        centroids = mesh.vertices[mesh.faces].mean(1)
        assert ((mesh.face_normals() * centroids).sum(-1) > 0).all()


def test_primitive_volumes_match_closed_forms():
    # cube: half-diagonal 1 -> side 2/sqrt(3); pyramid: base half-width 1, height 1.6, scaled by
    # 1/sqrt(2.64) (the base corners are farthest from the box centre).
    assert float(primitive_mesh("cube").volume()) == pytest.approx((2 / math.sqrt(3)) ** 3, rel=1e-5)
    assert float(primitive_mesh("pyramid").volume()) == pytest.approx(4 * 1.6 / 3 / 2.64**1.5, rel=1e-5)
    # Polygonal approximations of round solids lose under 1%.
    assert float(primitive_mesh("sphere").volume()) == pytest.approx(4 / 3 * math.pi, rel=0.01)
    r = 1 / math.sqrt(2)  # cylinder of height 2r inscribed in the unit sphere
    assert float(primitive_mesh("cylinder").volume()) == pytest.approx(math.pi * r * r * 2 * r, rel=0.01)


@pytest.mark.parametrize("shape", ["cone", "pyramid"])
def test_pointed_shapes_point_up(shape):
    vertices = primitive_mesh(shape).vertices
    apex = vertices[vertices[:, 1].argmax()]
    assert apex[[0, 2]].abs().max().item() < 1e-6
    top = vertices[vertices[:, 1] > apex[1] - 0.2]
    bottom = vertices[vertices[:, 1] < vertices[:, 1].min() + 0.01]
    assert top[:, [0, 2]].norm(dim=-1).max() < 0.3 * bottom[:, [0, 2]].norm(dim=-1).max()


def test_ground_truth_sdf_signs_and_distances():
    points = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    sphere = ground_truth_sdf("sphere", points[:2])
    assert sphere[0].item() == pytest.approx(-1.0, abs=0.01)
    assert sphere[1].item() == pytest.approx(1.0, abs=1e-6)
    assert ground_truth_sdf("cube", points[:1]).item() == pytest.approx(-1 / math.sqrt(3), abs=1e-6)
    # The torus hole is outside the solid: distance from the centre to the tube is major - minor.
    torus = ground_truth_sdf("torus", points[:1]).item()
    assert torus == pytest.approx((1.0 - 0.4) / 1.4, abs=0.01)


def test_captions_and_articles():
    assert caption("cube", "red") == "a red cube"
    assert caption("torus", "orange") == "an orange torus"
    assert caption("pyramid", "gray", "overhead") == "a gray pyramid, overhead view"
    assert caption("cube", "red", "front", front="blue", normal_map=True) == "a red cube with a blue front, normal map, front view"
    assert caption("mug", "orange", normal_map=True) == "an orange mug, normal map"
    assert caption("cube", "gray", front="white") == "a gray cube with a white front"
    with pytest.raises(ToyWorldError):
        caption("dodecahedron", "red")
    with pytest.raises(ValueError):
        caption("cube", "red", "left")


def test_each_caption_word_is_one_token(tmp_path):
    from xdreamer.guidance.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(tmp_path, caption_words())
    assert tokenizer.tokenize(caption("torus", "orange", "overhead")) == [
        "an</w>", "orange</w>", "torus</w>", ",</w>", "overhead</w>", "view</w>"
    ]
    assert tokenizer.tokenize(caption("cube", "yellow", "back", front="red", normal_map=True)) == [
        "a</w>", "yellow</w>", "cube</w>", "with</w>", "a</w>", "red</w>", "front</w>", ",</w>", "normal</w>", "map</w>",
        ",</w>", "back</w>", "view</w>",
    ]
    assert tokenizer.tokenize("a white mug") == ["a</w>", "white</w>", "mug</w>"]
    assert tokenizer.tokenize("a gray box") == ["a</w>", "gray</w>", "box</w>"]


def test_parse_caption_reads_back_every_caption():
    things = [ToyObject(s, c) for s in SHAPES for c in COLOURS] + front_objects()
    for thing in things:
        for view in (None, *VIEWS):
            for normal_map in (False, True):
                assert parse_caption(thing.caption(view, normal_map)) == thing
    assert parse_caption("A Red Cube with a Blue Front, front view") == ToyObject("cube", "red", "blue")
    for text in ("a red blue cube", "a cube", "a red cube with a blue front with a white front", "a red cube, normal map, mug"):
        with pytest.raises(ToyWorldError):
            parse_caption(text)


def test_objects_with_a_front():
    # A front only on cubes, in FRONT_COLOURS, and never too close to the body's colour.
    for bad in (("sphere", "red", "blue"), ("cube", "red", "green"), ("cube", "red", "orange"), ("cube", "purple", "blue")):
        with pytest.raises(ToyWorldError):
            ToyObject(*bad)
    fronts = front_objects()
    cubes = [o for o in fronts if o.front is not None]
    assert len(fronts) == 32 and len(cubes) == 24 and all(o.has_front for o in fronts)
    assert min(colour_difference(o.colour, o.front) for o in cubes) >= 60
    assert {o.front for o in cubes} == set(FRONT_COLOURS)
    assert not ToyObject("cube", "red").has_front and ToyObject("mug", "red").has_front


def test_held_out_pairs_and_objects_never_reach_training(light):
    pairs = training_pairs()
    assert len(pairs) == len(SHAPES) * len(COLOURS) - len(HELD_OUT) == 42
    assert not set(pairs) & HELD_OUT
    # Each held-out shape and colour still appears in training, only the combination is new.
    assert {s for s, _ in HELD_OUT} <= {s for s, _ in pairs}
    assert {c for _, c in HELD_OUT} <= {c for _, c in pairs}
    objects = training_objects()
    assert len(objects) == 42 + 7 + 23 + 8 and not set(objects) & HELD_OUT_OBJECTS
    for held in HELD_OUT_OBJECTS:
        assert any(o.shape == held.shape and o.colour != held.colour for o in objects)
        assert any(o.colour == held.colour and o.shape != held.shape for o in objects)
        if held.front is not None:
            assert any(o.front == held.front and o.colour != held.colour for o in objects)
            assert any(o.colour == held.colour and o.front not in (None, held.front) for o in objects)
    dataset = build_dataset(len(objects), 4, torch.Generator().manual_seed(0), views_per_placement=1, supersample=2, light=light)
    assert len(dataset) == 2 * len(objects)
    assert {dataset.object(i) for i in range(len(dataset))} == set(objects)
    captions = {dataset.caption(i, with_view=False) for i in range(len(dataset))}
    held = {caption(s, c) for s, c in HELD_OUT} | {o.caption() for o in HELD_OUT_OBJECTS}
    assert not {c.removesuffix(", normal map") for c in captions} & held
    # The mode word marks exactly the normal-map images.
    assert all(dataset.caption(i).endswith(" view") for i in range(len(dataset)))
    assert [", normal map" in dataset.caption(i) for i in range(len(dataset))] == dataset.normal_map.tolist()


def test_dataset_round_trip_and_views(tmp_path, light):
    dataset = build_dataset(2, 4, torch.Generator().manual_seed(1), views_per_placement=4, supersample=2, light=light)
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (16, 4, 4, 3)
    assert dataset.normal_map.sum().item() == 8
    assert set(dataset.view.tolist()) <= set(range(len(VIEWS)))
    assert dataset.front.tolist() == [-1] * 16 and set(dataset.shape.tolist()) <= set(range(len(OBJECT_SHAPES)))
    dataset.save(tmp_path / "d.pt")
    loaded = ToyDataset.load(tmp_path / "d.pt")
    for field in ("images", "shape", "colour", "front", "view", "normal_map"):
        assert torch.equal(getattr(loaded, field), getattr(dataset, field))


def test_every_object_is_seen_from_above_one_placement_in_eight():
    # The dataset: 1600 placements of the 80 training objects (20 each). Dataset v2 counted
    # placements only, so 9 objects (the red cube, the yellow torus, ...) got 20 of 20 from above.
    objects, placements = len(training_objects()), ToyTrainingConfig().dataset_size
    assert placements == 20 * objects == 1600
    per_object = [0] * objects
    for i in range(placements):
        per_object[i % objects] += is_overhead(i, objects)
    assert sum(per_object) == placements // OVERHEAD_EVERY
    assert min(per_object) == 2 and max(per_object) == 3
    # Any number of objects: within each object's first 8 placements exactly one is from above.
    for count in (5, 8, 13):
        for thing in range(count):
            assert sum(is_overhead(thing + count * k, count) for k in range(OVERHEAD_EVERY)) == 1


def test_objects_with_a_front_face_the_front_camera():
    generator = torch.Generator().manual_seed(0)
    turns = [sample_placement(generator, facing=True).rotation for _ in range(200)]
    assert max(abs(t) for t in turns) <= FRONT_YAW_JITTER and max(turns) - min(turns) > FRONT_YAW_JITTER
    placement = Placement(0.7, 0.5, (0.01, 0.02, -0.03))
    mesh = primitive_mesh("mug")
    assert torch.allclose(placement.to_local(placement.apply(mesh).vertices), mesh.vertices, atol=1e-6)


def test_mug_has_one_handle_at_the_front():
    mug = primitive_mesh("mug")
    assert mug.to_trimesh().euler_number == 0  # genus 1: the handle is a loop
    x, z = mug.vertices[:, 0], mug.vertices[:, 2]
    # Sideways and behind only the body shows: its radius is the x extent, its axis that far in
    # front of the back. The handle reaches (0.27 + 0.075) / 0.45 radii in front of the wall.
    radius = float(x.max())
    assert float(-x.min()) == pytest.approx(radius, rel=1e-3)
    axis = float(z.min()) + radius
    assert (float(z.max()) - axis) / radius == pytest.approx(1 + 0.345 / 0.45, rel=0.02)
    two = mug_mesh((0.0, 180.0))
    assert two.to_trimesh().is_watertight and two.to_trimesh().euler_number == -2  # genus 2
    # Normalized like the world's mug: the body keeps its place, the second handle adds the back.
    assert float(two.vertices[:, 2].max()) == pytest.approx(float(z.max()), abs=1e-3)
    assert float(two.vertices[:, 2].min()) == pytest.approx(2 * axis - float(z.max()), abs=1e-3)  # the mirror image
    assert float(two.volume()) > float(mug.volume())


def test_front_colour_is_seen_from_the_front_only(light):
    cameras = orbit_cameras(4, elevation=10.0)  # front, right side, back, left side
    out = render_placed(ToyObject("cube", "red", "blue"), Placement(0.8, 0.2, (0.0, 0.0, 0.0)), cameras, 16, 0.6, light)
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    seen = []
    for image, coverage in zip(out["shaded"], out["mask"][..., 0]):
        mean = image[coverage > 0.99].mean(0)
        seen.append(names[(palette - mean).norm(dim=-1).argmin()])
    assert seen == ["blue", "red", "red", "red"]


def test_placement_jitter_bounds():
    generator = torch.Generator().manual_seed(0)
    mesh = primitive_mesh("cone")
    for _ in range(20):
        placement = sample_placement(generator)
        assert 0.6 <= placement.scale <= 0.85
        assert max(abs(o) for o in placement.offset) <= 0.05
        placed = placement.apply(mesh)
        # A rotation about +y keeps heights and radial distances.
        offset = torch.tensor(placement.offset)
        local = (placed.vertices - offset) / placement.scale
        assert torch.allclose(local[:, 1], mesh.vertices[:, 1], atol=1e-5)
        assert torch.allclose(local[:, [0, 2]].norm(dim=-1), mesh.vertices[:, [0, 2]].norm(dim=-1), atol=1e-5)


def test_shaded_renders_have_their_colour_on_black(light):
    cameras = orbit_cameras(4, elevation=20.0)
    mesh = Placement(0.8, 0.3, (0.0, 0.0, 0.0)).apply(primitive_mesh("cube"))
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    for colour in names:
        out = render_object(mesh, colour, cameras, 16, 0.6, light)
        coverage = out["mask"][..., 0]
        assert 0.2 < coverage.mean().item() < 0.4
        assert out["shaded"][coverage == 0].abs().max().item() == 0.0
        mean = out["shaded"][coverage > 0.99].mean(0)
        assert (mean - palette[names.index(colour)]).abs().max().item() < 0.15
        assert names[(palette - mean).norm(dim=-1).argmin()] == colour


def test_normal_maps_encode_unit_world_normals(light):
    cameras = orbit_cameras(2, elevation=0.0)
    out = render_object(Placement(0.8, 0.0, (0.0, 0.0, 0.0)).apply(primitive_mesh("sphere")), "red", cameras, 16, 0.5, light)
    coverage = out["mask"][..., 0]
    assert out["normal"][coverage == 0].abs().max().item() == 0.0
    normal = out["normal"][coverage > 0.999] * 2 - 1
    assert normal.norm(dim=-1).min().item() > 0.95
    # Seen from the front (+z) the visible hemisphere faces +z on average.
    front = out["normal"][0][coverage[0] > 0.999] * 2 - 1
    assert front.mean(0)[2].item() > 0.5


def test_downsample_is_the_guidance_loaders_resize():
    from xdreamer.guidance.loader import GuidanceModel

    guidance = GuidanceModel(
        unet=None, vae=None, text_encoder=None, tokenizer=None, alphas_cumprod=torch.ones(1000), channels=3,
        sample_size=16, scaling_factor=1.0, device=torch.device("cpu"), dtype=torch.float32,
    )
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    expected = guidance.encode_images(images)
    assert torch.equal(downsample(images, 16).permute(0, 3, 1, 2) * 2 - 1, expected)


def test_a_box_is_a_cuboid_whose_sides_differ_from_a_cube():
    # Its stretch keeps bounding radius 1: the corners of the canonical cube stay at distance 1.
    stretch = torch.tensor(box_stretch(0.7, 0.8))
    assert stretch[1] / stretch[0] == pytest.approx(0.7) and stretch[2] / stretch[0] == pytest.approx(0.8)
    assert float(stretch.norm()) == pytest.approx(math.sqrt(3))
    generator = torch.Generator().manual_seed(0)
    heights, canonical = [], primitive_mesh("box")
    assert torch.equal(canonical.vertices, primitive_mesh("cube").vertices)
    for _ in range(200):
        placement = sample_placement(generator, box=True)
        placed = placement.apply(canonical)
        extent = placed.vertices.max(0).values - placed.vertices.min(0).values
        local = placed.vertices - torch.tensor(placement.offset)
        assert float(local.norm(dim=-1).max()) == pytest.approx(placement.scale, rel=1e-5)
        # to_local undoes the placement, stretch included.
        assert torch.allclose(placement.to_local(placed.vertices), canonical.vertices, atol=1e-5)
        height = placement.stretch[1] / placement.stretch[0]
        assert float(extent[1]) == pytest.approx(2 * placement.scale * placement.stretch[1] / math.sqrt(3), rel=1e-5)
        assert any(low - 1e-9 <= height <= high + 1e-9 for low, high in BOX_HEIGHTS)
        assert BOX_DEPTH[0] - 1e-9 <= placement.stretch[2] / placement.stretch[0] <= BOX_DEPTH[1] + 1e-9
        heights.append(height)
    # Both sides of the cube, about half the time each; never within a fifth of it.
    lower = sum(h < 1 for h in heights)
    assert 80 <= lower <= 120 and min(abs(h - 1) for h in heights) >= 0.2
    # Every other object keeps its proportions.
    assert sample_placement(generator).stretch == (1.0, 1.0, 1.0)


def test_boxes_are_trained_on_but_never_scored():
    assert CONTRAST_SHAPES == ("box",) and "box" not in SHAPES + FRONT_SHAPES
    boxes = [o for o in training_objects() if o.shape == "box"]
    assert {o.colour for o in boxes} == set(COLOURS) and len(boxes) == len(COLOURS)
    assert parse_caption("a gray box, normal map, side view") == ToyObject("box", "gray")
    assert caption_words()[-1] == "box"  # added last: the earlier words keep their tokens' order
    with pytest.raises(ToyWorldError, match="no fixed proportions"):
        ground_truth_sdf("box", torch.zeros(1, 3))
