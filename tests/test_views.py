"""`render_mesh_views`: every file with the right shapes, and nerfstudio cameras that reproject."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from xdreamer.export.video import VideoError, write_video
from xdreamer.export.views import ViewsError, render_mesh_views
from xdreamer.mesh import save_mesh, Mesh


def test_views_write_every_file_and_the_cameras_reproject(tmp_path):
    # A small box away from the origin: it must be drawn where it is (no recentring).
    centre = np.array([0.45, 0.3, -0.2])
    box = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    box.apply_translation(centre)
    path = tmp_path / "box.obj"
    save_mesh(Mesh.from_arrays(box.vertices, box.faces), path)
    out = tmp_path / "views"
    views, size, frames = 4, 48, 5
    render_mesh_views(path, out, views=views, resolution=size, backend="torch", turntable_frames=frames, show_progress=False)

    transforms = json.loads((out / "transforms.json").read_text())
    assert transforms["camera_model"] == "OPENCV" and transforms["w"] == size and transforms["h"] == size
    assert len(transforms["frames"]) == views
    video = iio.imread(out / "turntable.mp4", index=None)
    assert video.shape == (frames, size, size, 3)
    fl_x, fl_y, cx, cy = (transforms[key] for key in ("fl_x", "fl_y", "cx", "cy"))
    for frame in transforms["frames"]:
        normal = iio.imread(out / frame["file_path"])
        mask = iio.imread(out / frame["mask_path"])
        depth = np.load(out / frame["depth_file_path"])
        assert normal.shape == (size, size, 3) and normal.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        assert depth.shape == (size, size) and depth.dtype == np.float32
        assert (normal[mask == 0] == 0).all() and (depth[mask == 0] == 0).all()
        # The box centre, projected with the intrinsics and the OpenGL camera-to-world, falls
        # inside the mask, at most a pixel from the mask's centroid.
        c2w = np.array(frame["transform_matrix"])
        camera = np.linalg.inv(c2w) @ np.append(centre, 1.0)
        u = fl_x * camera[0] / -camera[2] + cx
        v = fl_y * -camera[1] / -camera[2] + cy
        assert mask[int(v), int(u)] == 255
        rows, columns = np.nonzero(mask > 127)
        assert abs(columns.mean() + 0.5 - u) < 1.0 and abs(rows.mean() + 0.5 - v) < 1.0
        # The depth is the distance along the view axis: the nearest face is the box centre minus
        # at most half its diagonal.
        near = depth[mask == 255].min()
        assert -camera[2] - 0.26 < near < -camera[2] - 0.14


def test_bad_settings_raise_one_line_value_errors(tmp_path):
    mesh = Mesh.from_arrays(*(lambda b: (b.vertices, b.faces))(trimesh.creation.box()))
    for kwargs, word in (({"views": 0}, "--views"), ({"resolution": 3}, "--resolution"), ({"fov": 180.0}, "--fov")):
        with pytest.raises(ViewsError, match=word) as error:
            render_mesh_views(mesh, tmp_path, show_progress=False, **kwargs)
        assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())


def test_write_video_pads_odd_sizes_and_rejects_bad_frames(tmp_path):
    frames = [np.full((15, 21, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    path = write_video(frames, tmp_path / "clip.mp4", fps=10)
    video = iio.imread(path, index=None)
    assert video.shape == (4, 16, 22, 3)
    assert abs(float(video[3, :15, :21].mean()) - 120) < 3
    with pytest.raises(VideoError):
        write_video([], tmp_path / "empty.mp4")
    with pytest.raises(VideoError):
        write_video([np.zeros((8, 8), dtype=np.uint8)], tmp_path / "gray.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
