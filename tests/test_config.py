"""Config loading: presets mirror the dataclasses, unknown keys and bad values are errors."""

import pytest

from recdreamer_gs.config import (PRESETS, ConfigError, RunConfig, load_config, option_overrides, parse_override,
                                  to_dict)


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
        ("gaussians.init=file", "gaussians.init: 'file' needs a file in gaussians.init_from"),
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


def test_init_options(tmp_path):
    cloud = tmp_path / "c.ply"
    cloud.write_text("ply")
    assert option_overrides(init_from=cloud) == {"gaussians": {"init": "file", "init_from": str(cloud)}}
    assert option_overrides(init="shap-e") == {"gaussians": {"init": "shap-e"}}
    with pytest.raises(ConfigError, match="--init shap-e and --init-from"):
        option_overrides(init="shap-e", init_from=cloud)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-2 as a string; float settings take it as the number it means."""
    cfg = load_config("preview", overrides=[parse_override("gaussians.lr_means=1e-2"),
                                            parse_override("distill.particle_score.lr=5E-5")])
    assert cfg.gaussians.lr_means == 0.01 and cfg.distill.particle_score.lr == 5e-5
    (tmp_path / "c.yaml").write_text("gaussians:\n  lr_sh0: 2e-3\n")
    assert load_config("preview", tmp_path / "c.yaml").gaussians.lr_sh0 == 0.002
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config("preview", overrides=[parse_override("train.steps=1e3")])  # not for integers
    with pytest.raises(ConfigError, match="gaussians.lr_means: expected a number, got '1e-2x'"):
        load_config("preview", overrides=[parse_override("gaussians.lr_means=1e-2x")])


def test_override_syntax():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("nonsense")


def test_synthetic_prior_specialises_the_config_once_and_idempotently():
    from recdreamer_gs.priors.synthetic import SyntheticPrior

    cfg = load_config("paper")
    prior = SyntheticPrior(cfg.prior.synthetic)
    s = cfg.prior.synthetic
    eff = prior.specialise(cfg)
    assert eff.camera.resolution == s.resolution and eff.densify.grow_grad2d == s.densify_grow_grad2d
    for distill in [eff.distill] + [st.distill for st in eff.stages]:  # every stage gets the prior's settings
        assert distill.rectifier.norm_coef == s.rectifier_norm_coef
        assert distill.view_prompts == s.view_conditioned
    assert prior.specialise(eff) == eff  # a run folder's config.yaml runs the same again
    off = load_config("preview", overrides=[parse_override("prior.synthetic.view_conditioned=false")])
    assert not prior.specialise(off).distill.view_prompts
    assert cfg.camera.resolution == load_config("paper").camera.resolution  # the config passed in is unchanged


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


def test_output_formats_name_entries_of_the_output_table():
    from recdreamer_gs.config import config_from_data, preset_path, read_yaml

    cfg = load_config("preview", overrides=[parse_override("output.formats=[ply,spz,sog]")])
    assert cfg.output.formats == ["ply", "spz", "sog"]
    for bad in ("[ply,las]", "[]", "[ply,ply]", "spz"):
        with pytest.raises(ConfigError, match="output.formats"):
            load_config("preview", overrides=[parse_override(f"output.formats={bad}")])
    old = read_yaml(preset_path("preview"))  # a run folder's config.yaml from before output.formats
    old.setdefault("output", {})["write_splat"] = True
    assert config_from_data(old).output.formats == ["ply", "splat"]


def test_a_file_without_init_means_init_file_as_in_run_folders_from_before_gaussians_init(tmp_path):
    from recdreamer_gs.config import config_from_data, preset_path, read_yaml

    cfg = load_config("preview", overrides=[parse_override("gaussians.init_from=/x.ply")])  # as --init-from
    assert cfg.gaussians.init == "file"
    with pytest.raises(ConfigError, match="is set but gaussians.init is 'sphere'; set gaussians.init=file"):
        load_config("preview", overrides=[parse_override("gaussians.init=sphere"),
                                          parse_override("gaussians.init_from=/x.ply")])

    old = read_yaml(preset_path("preview"))  # a run folder's config.yaml from before gaussians.init
    old["gaussians"].pop("init", None)
    old["gaussians"]["init_from"] = str(tmp_path / "cloud.ply")
    cfg = config_from_data(old)
    assert cfg.gaussians.init == "file" and cfg.gaussians.init_from == str(tmp_path / "cloud.ply")
    old["gaussians"]["init"] = "shap-e"  # said both ways: still an error
    with pytest.raises(ConfigError, match="gaussians.init_from"):
        config_from_data(old)


# ---- every field of the tree, generated from the dataclasses ----------------------------------


def _leaf_fields(cls, path=""):
    """(dotted key, annotation) of every non-dataclass field under ``cls``; stages via the paper preset."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, key)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from _leaf_fields(typing.get_args(tp)[0], f"{key}[0]")
        else:
            yield key, tp


def _set(data: dict, key: str, value) -> dict:
    """``data`` with ``key`` (dots, ``name[i]`` list items) set to ``value``; creates missing mappings."""
    import copy
    import re

    data = copy.deepcopy(data)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        node = node.setdefault(m.group(1), [])[int(m.group(2))] if m else node.setdefault(part, {})
        if node is None:
            raise AssertionError(key)
    node[parts[-1]] = value
    return data


def _bad_values(tp):
    """Values the annotation ``tp`` must refuse: out of range (and NaN), or not one of the Literal choices."""
    import typing

    from recdreamer_gs.config_base import range_of, strip

    base = strip(tp)
    if typing.get_origin(base) is typing.Literal:
        return ["not-a-choice"]
    allowed = range_of(tp)
    numeric_pair = typing.get_origin(base) is tuple and typing.get_args(base) == (float, float)
    if base in (int, float) or numeric_pair:
        assert allowed is not None, "a numeric config field must declare its range (config_base.Range)"
        values = allowed.outside()
        if base is int:
            values = [v for v in values if v == v]  # NaN is not an integer: the type check refuses it anyway
        if numeric_pair:
            ok = allowed.lo if allowed.lo is not None and not allowed.lo_open else 1.0
            return [[v, v] for v in values] + [[ok + 1, ok]]  # each end out of range, and max < min
        return values
    return []


NUMERIC_OR_CHOICE = [(k, tp) for k, tp in _leaf_fields(RunConfig) if _bad_values(tp)]


def test_the_generated_list_covers_the_tree():
    keys = {k for k, _ in NUMERIC_OR_CHOICE}
    assert {"train.steps", "distill.rectifier.rectify_every", "densify.prune_opa", "camera.fovy_range",
            "stages[0].distill.t_max", "distill.rectifier.classifier.tau_pose", "output.mesh"} <= keys
    assert len(keys) > 100


@pytest.mark.parametrize("key, tp", NUMERIC_OR_CHOICE, ids=[k for k, _ in NUMERIC_OR_CHOICE])
def test_every_bad_value_is_refused_naming_its_key(key, tp):
    from recdreamer_gs.config import config_from_data, preset_path, read_yaml

    data = read_yaml(preset_path("paper"))  # a preset with stages, so stages[0].* exist
    for value in _bad_values(tp):
        with pytest.raises(ConfigError) as err:
            config_from_data(_set(data, key, value))
        assert key.split(".")[-1] in str(err.value) and "\n" not in str(err.value), (key, value, str(err.value))


def test_empty_time_ranges_are_refused_for_every_stage():
    from recdreamer_gs.config import config_from_data, preset_path, read_yaml

    with pytest.raises(ConfigError, match="distill.time_schedule=bnf .* empty at iteration 0"):
        load_config("preview", overrides=[parse_override("distill.time_schedule=bnf"),
                                          parse_override("distill.t_max=0.5")])
    with pytest.raises(ConfigError, match="fewer bnf_intervals"):
        load_config("preview", overrides=[parse_override("distill.time_schedule=bnf"),
                                          parse_override("distill.bnf_intervals=100")])
    data = _set(_set(read_yaml(preset_path("paper")), "stages[2].distill.t_max", 0.45), "stages[2].distill.t_anneal_to", 0.4)
    with pytest.raises(ConfigError, match=r"stages\[2\]\.distill\.time_schedule=bnf"):
        config_from_data(data)
    load_config("preview", overrides=[parse_override("distill.time_schedule=bnf")])  # the defaults are fine
