import math

import pytest
from omegaconf import OmegaConf

from xdreamer.config import ConfigError, load_config, preset_names


def test_presets_ship_and_resolve():
    assert {"paper", "fast", "toy"} <= set(preset_names())
    paper = load_config(preset="paper", prompt="a red cube")
    assert paper.model == "stabilityai/stable-diffusion-2-1-base"
    assert paper.views == 4 and paper.geometry.iters == 3000 and paper.appearance.iters == 2000
    assert paper.geometry.render_resolution == 512 and paper.cg_lora.rank == 4
    assert paper.ama.weight == pytest.approx(0.1)
    toy = load_config(preset="toy", prompt="a red cube")
    assert toy.model == "toy"
    # The paper's view words in both stages; the toy preset's in the appearance stage only.
    assert paper.direction_prompts and paper.geometry.direction_prompts
    assert toy.direction_prompts and not toy.geometry.direction_prompts


def test_toy_geometry_finest_wave_is_four_grid_cells():
    """The toy preset's geometry encoding stops at a wave of 4 grid cells: the 2-cell octave
    ribbed every surface and tunnelled cubes on fresh seeds (docs/benchmarks.md)."""
    from xdreamer.geometry.dmtet import DMTetGeometry

    g = load_config(preset="toy", prompt="a red cube").geometry
    geometry = DMTetGeometry(g.grid_resolution, g.grid_scale, g.encoding, frequency_count=g.frequency_count)
    # The network reads the grid as [0, 1] per axis: a frequency f has a period of
    # (2 pi / f) * grid_resolution cells.
    finest = float(geometry.encoding.frequencies.max())
    assert 2 * math.pi / finest * g.grid_resolution == pytest.approx(4.0)
    assert float(geometry.encoding.frequencies.min()) == pytest.approx(math.pi)  # coarsest: 2 grids


def test_precedence_preset_flags_overrides():
    cfg = load_config(preset="fast", prompt="a cat", seed=7, overrides=["geometry.iters=12", "ama.weight=0.2"])
    assert cfg.seed == 7 and cfg.geometry.iters == 12 and cfg.ama.weight == pytest.approx(0.2)
    assert cfg.appearance.iters == 600  # from the preset


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match="geometry.iters"):
        load_config(prompt="x", overrides=["geometry.itres=5"])


def test_bad_type_and_bad_choice():
    with pytest.raises(ConfigError, match="geometry.iters"):
        load_config(prompt="x", overrides=["geometry.iters=many"])
    with pytest.raises(ConfigError, match="ama.norm"):
        load_config(prompt="x", overrides=["ama.norm=l3"])
    with pytest.raises(ConfigError, match="t_range"):
        load_config(prompt="x", overrides=["geometry.t_range=[0.6,0.2]"])


def test_the_early_silhouette_weight_is_checked_like_the_weight():
    early = ["geometry.silhouette_weight_early=3", "geometry.silhouette_switch=75"]
    cfg = load_config(preset="toy", prompt="x", overrides=early)
    assert cfg.geometry.silhouette_weight_early == 3.0 and cfg.geometry.silhouette_switch == 75
    assert load_config(preset="toy", prompt="x").geometry.silhouette_weight_early is None
    with pytest.raises(ConfigError, match="geometry.silhouette_weight_early must be >= 0"):
        load_config(prompt="x", overrides=["geometry.silhouette_weight_early=-1"])
    with pytest.raises(ConfigError, match="geometry.silhouette_switch must be >= 0"):
        load_config(prompt="x", overrides=["geometry.silhouette_switch=-5"])


def test_the_geometry_final_t_range_is_checked_like_the_others():
    # The toy preset refines at low noise over its last 50 geometry steps; the others have no final phase.
    toy = load_config(preset="toy", prompt="x").geometry
    assert list(toy.t_range_final) == [0.02, 0.3] and toy.t_final_from == 100 and toy.t_final_from < toy.iters
    assert load_config(preset="paper", prompt="x").geometry.t_range_final is None
    with pytest.raises(ConfigError, match=r"geometry.t_range_final must satisfy 0 <= min <= max <= 1, got \[0.5, 0.3\]"):
        load_config(prompt="x", overrides=["geometry.t_range_final=[0.5,0.3]"])
    with pytest.raises(ConfigError, match=r"geometry.t_range_final must satisfy 0 < min"):
        load_config(prompt="x", overrides=["geometry.t_range_final=[0,0.3]"])
    with pytest.raises(ConfigError, match="geometry.t_final_from must be >= 0"):
        load_config(prompt="x", overrides=["geometry.t_final_from=-1"])


def test_the_overhead_views_are_checked():
    cfg = load_config(prompt="x", overrides=["camera.overhead_fraction=0.125"])
    assert cfg.camera.overhead_fraction == 0.125 and list(cfg.camera.overhead_elevation_deg) == [60.0, 80.0]
    with pytest.raises(ConfigError, match="camera.overhead_fraction must be in \\[0, 1\\], got 1.5"):
        load_config(prompt="x", overrides=["camera.overhead_fraction=1.5"])
    with pytest.raises(ConfigError, match="camera.overhead_elevation_deg"):
        load_config(prompt="x", overrides=["camera.overhead_elevation_deg=[80,60]"])
    # overhead views drawn below the elevation that labels a view overhead would be prompted by azimuth
    lower = ["camera.overhead_fraction=0.125", "camera.overhead_elevation_deg=[50,70]"]
    with pytest.raises(ConfigError) as error:
        load_config(prompt="x", overrides=lower)
    assert str(error.value) == (
        "camera.overhead_elevation_deg starts at 50, below camera.overhead_elevation (60), above which views are "
        "prompted as overhead: lower that too"
    )
    assert load_config(prompt="x", overrides=lower + ["camera.overhead_elevation=50"]).camera.overhead_elevation == 50
    assert load_config(prompt="x", overrides=lower + ["direction_prompts=false"]).camera.overhead_fraction == 0.125
    assert load_config(prompt="x", overrides=["camera.overhead_elevation_deg=[50,70]"]).camera.overhead_fraction == 0


@pytest.mark.parametrize(
    "key, closed",
    [("camera.overhead_fraction", True), ("camera.jitter", False), ("cg_lora.dropout", False),
     ("geometry.collapse_fraction", False), ("geometry.min_piece_fraction", False)],
)
def test_shares_are_checked_to_lie_in_the_unit_interval(key, closed):
    """Each share takes 0 and 0.5; 1 only where the interval is closed; never 1.5 or -0.1."""
    for value in (0.0, 0.5) + ((1.0,) if closed else ()):
        assert OmegaConf.select(load_config(prompt="x", overrides=[f"{key}={value}"]), key) == value
    bad = (1.5, -0.1) if closed else (1.0, 1.5, -0.1)
    for value in bad:
        with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
            load_config(prompt="x", overrides=[f"{key}={value}"])
    message = f"{key} must be in [0, 1{']' if closed else ')'}, got 1.5"
    with pytest.raises(ConfigError) as error:
        load_config(prompt="x", overrides=[f"{key}=1.5"])
    assert str(error.value) == message


def test_empty_prompt_and_unknown_preset():
    with pytest.raises(ConfigError, match="prompt is empty"):
        load_config(prompt="   ")
    with pytest.raises(ConfigError, match="unknown preset 'papr'"):
        load_config(preset="papr", prompt="x")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(preset="toy", prompt="a blue cone", overrides=["seed=3"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    again = load_config(config_file=path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_override_values_yaml_cannot_read_are_plain_strings():
    """The shell strips quotes: `geometry.prompt_suffix=", normal map"` arrives as `, normal map`."""
    cfg = load_config(prompt="x", overrides=["geometry.prompt_suffix=, normal map", "negative_prompt=[blurry"])
    assert cfg.geometry.prompt_suffix == ", normal map" and cfg.negative_prompt == "[blurry"
    with pytest.raises(ConfigError, match="geometry.iters"):
        load_config(prompt="x", overrides=["geometry.iters=[3"])
