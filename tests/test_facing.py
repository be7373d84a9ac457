import numpy as np
import pytest
import torch

from xdreamer.mesh import Mesh, save_mesh
from xdreamer.toy.facing import (
    SIDES,
    count_front_colour,
    count_handles,
    sample_glb,
    sample_mesh,
    score_front_run,
    side_index,
)
from xdreamer.toy.world import COLOURS, SHAPES, ToyObject, ToyWorldError, mug_mesh, primitive_mesh

HALF_SIDE = 1 / np.sqrt(3)  # the canonical cube's faces lie at +-1/sqrt(3)


def test_sides_follow_the_camera_azimuths():
    directions = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.6, 0.3, 0.7]])
    assert [SIDES[i] for i in side_index(directions)] == ["front", "right", "back", "left", "front"]


def _cube_colours(points: np.ndarray, body: str, front: str, faces: list[tuple[int, float]]) -> np.ndarray:
    """sRGB (N, 3): the front colour on the cube faces given as (axis, sign), the body elsewhere."""
    colours = np.tile(np.array(COLOURS[body]), (len(points), 1))
    for axis, sign in faces:
        colours[sign * points[:, axis] > 0.999 * HALF_SIDE] = COLOURS[front]
    return colours


def test_front_colour_on_the_world_cube_is_one_at_the_front():
    points, normals = sample_mesh(primitive_mesh("cube"))
    colours = ToyObject("cube", "red", "blue").albedo(torch.as_tensor(points)).numpy()
    count = count_front_colour(normals, colours, "red", "blue")
    assert count.found == ["front"] and count.count == 1 and count.at_front and count.correct
    assert count.sides["front"] == pytest.approx(1.0)
    assert max(count.sides["right"], count.sides["back"], count.sides["left"]) < 0.01


@pytest.mark.parametrize(
    ("faces", "found"),
    [
        ([(2, 1.0), (2, -1.0)], ["front", "back"]),  # the two-faced (Janus) cube
        ([(2, -1.0)], ["back"]),  # one front, on the wrong side
        ([(0, 1.0), (0, -1.0), (2, 1.0), (2, -1.0)], ["front", "right", "back", "left"]),
        ([], []),
    ],
)
def test_front_colour_counts_every_side_that_has_it(faces, found):
    points, normals = sample_mesh(primitive_mesh("cube"))
    count = count_front_colour(normals, _cube_colours(points, "yellow", "red", faces), "yellow", "red")
    assert count.found == found and count.count == len(found)
    assert count.multi_face == (len(found) > 1) and count.at_front == ("front" in found)


def test_front_colour_tolerates_washed_out_baking():
    # SDS bakes colours off the palette: a pinkish red and a light blue still tell front from body.
    points, normals = sample_mesh(primitive_mesh("cube"))
    colours = _cube_colours(points, "red", "blue", [(2, 1.0)])
    colours = 0.6 * colours + 0.4 * np.array([0.9, 0.8, 0.8])
    assert count_front_colour(normals, colours, "red", "blue").correct


def test_handles_on_the_world_mug_and_on_a_two_handled_mug():
    one = count_handles(sample_mesh(primitive_mesh("mug"))[0])
    assert one.found == ["front"] and one.correct
    assert one.sides["front"] == pytest.approx(0.76, abs=0.03)  # (0.45 + 0.345) / 0.45 - 1
    assert max(one.sides[s] for s in ("right", "back", "left")) < 0.05
    two = count_handles(sample_mesh(mug_mesh((0.0, 180.0)))[0])
    assert two.found == ["front", "back"] and two.count == 2 and two.multi_face and not two.correct
    turned = count_handles(sample_mesh(mug_mesh((90.0,)))[0])
    assert turned.found == ["right"] and not turned.at_front


@pytest.mark.parametrize("shape", SHAPES)
def test_primitives_have_no_handles(shape):
    count = count_handles(sample_mesh(primitive_mesh(shape))[0])
    assert count.count == 0
    assert max(count.sides.values()) < 0.4  # square cross-sections reach 0.29 at their corners


def _write_two_colour_glb(path, mesh: Mesh, on_front: np.ndarray, body: str, front: str) -> None:
    """A GLB of `mesh` textured like xdreamer's baked exports: a base colour texture whose left
    half is the body colour and right half the front colour; vertices where `on_front` (V,) map
    into the right half, the others into the left."""
    import trimesh
    from PIL import Image

    texels = np.round(np.array([[COLOURS[body]] * 4 + [COLOURS[front]] * 4] * 4) * 255).astype(np.uint8)
    uv = np.where(on_front[:, None], [0.75, 0.5], [0.25, 0.5])
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texels))
    surface = trimesh.Trimesh(
        mesh.vertices.numpy(), mesh.faces.numpy(), visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
        process=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    surface.export(path)


def test_glb_samples_carry_the_baked_colour(tmp_path):
    mesh = primitive_mesh("cube")
    on_front = mesh.vertices[:, 2].numpy() > 0.999 * HALF_SIDE
    _write_two_colour_glb(tmp_path / "model.glb", mesh, on_front, "red", "blue")
    points, normals, colours = sample_glb(tmp_path / "model.glb", count=4000)
    assert points.shape == normals.shape == colours.shape == (4000, 3)
    back, front = points[:, 2] < -0.999 * HALF_SIDE, points[:, 2] > 0.999 * HALF_SIDE
    assert np.abs(colours[back] - np.array(COLOURS["red"])).max() < 1 / 255
    assert np.abs(colours[front] - np.array(COLOURS["blue"])).max() < 1 / 255
    assert count_front_colour(normals, colours, "red", "blue").correct


def test_score_front_run_reads_a_run_directory(tmp_path):
    cube = primitive_mesh("cube")
    two_faced = cube.vertices[:, 2].abs().numpy() > 0.999 * HALF_SIDE
    _write_two_colour_glb(tmp_path / "cube" / "export" / "model.glb", cube, two_faced, "red", "blue")
    count = score_front_run(tmp_path / "cube", "a red cube with a blue front")
    assert count.found == ["front", "back"]

    (tmp_path / "mug" / "geometry").mkdir(parents=True)
    save_mesh(mug_mesh((0.0, 180.0)), tmp_path / "mug" / "geometry" / "mesh.ply")
    assert score_front_run(tmp_path / "mug", "a blue mug").found == ["front", "back"]
    save_mesh(primitive_mesh("mug"), tmp_path / "mug" / "geometry" / "mesh.ply")
    result = score_front_run(tmp_path / "mug", "a yellow mug, front view").to_dict()
    assert result["found"] == ["front"] and result["count"] == 1 and result["correct"]
    with pytest.raises(ToyWorldError):
        score_front_run(tmp_path / "mug", "a red cube")
