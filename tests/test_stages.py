"""Multi-stage runs (the paper preset's shape): stages run in order, colour-only stages freeze geometry."""

import json

import pytest
import torch

from recdreamer_gs import prior_choice, training
from recdreamer_gs.config import ConfigError, load_config, parse_override


def tiny(extra=()):
    overrides = ["prior.kind=synthetic", "train.device=cpu", "prior.synthetic.resolution=32", "gaussians.num_init=150",
                 "train.progress_bar=false", "output.turntable_frames=0", "train.preview_every=0",
                 "train.log_every=1", *extra]
    return load_config("paper", overrides=[parse_override(s) for s in overrides])


def test_paper_preset_has_three_stages():
    cfg = load_config("paper")
    assert [s.distill.method for s in cfg.stages] == ["usd", "sds", "usd"]
    assert cfg.stages[1].distill.guidance_scale == 100.0 and cfg.stages[1].distill.view_prompts
    assert [s.params for s in cfg.stages] == ["all", "all", "colour"]


def test_three_stages_run_in_order_and_freeze_geometry(tmp_path):
    cfg = tiny()
    for stage in cfg.stages:
        stage.steps = 2
    device = torch.device("cpu")
    captured = {}

    original = training.fit_stage

    def spy(run, stage, stage_cfg, particles, *args, **kwargs):
        before = None
        if particles is not None:
            before = {k: v.detach().clone() for k, v in particles[0].params.items()}
        system = original(run, stage, stage_cfg, particles, *args, **kwargs)
        captured[stage] = (stage_cfg.distill.method, stage_cfg.distill.guidance_scale, before,
                           {k: v.detach().clone() for k, v in system.particles[0].params.items()})
        return system

    training.fit_stage = spy
    try:
        system = training.fit(cfg, tmp_path, prior_choice.build_prior(cfg, device), device)
    finally:
        training.fit_stage = original
    assert [captured[k][:2] for k in range(3)] == [("usd", 7.5), ("sds", 100.0), ("usd", 7.5)]
    _, _, before, after = captured[2]
    for name in ("means", "scales", "quats", "opacities"):
        assert torch.equal(before[name], after[name]), name  # frozen in the colour stage
    assert not torch.equal(before["sh0"], after["sh0"])  # colour still trains
    assert system.stage == 2 and (tmp_path / "model.ply").is_file()
    for name in ("stage1-usd_final.png", "stage2-sds_final.png", "stage3-colour_final.png"):
        assert (tmp_path / "preview" / name).is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["iterations"] == 2


def test_bad_stage_values():
    with pytest.raises(ConfigError, match=r"stages\[0\].steps"):
        tiny(["stages=[{steps: 0}]"])
    with pytest.raises(ConfigError, match="unknown config key stages"):
        tiny(["stages=[{stepz: 3}]"])


def test_steps_flag_is_refused_for_staged_presets(tmp_path):
    from typer.testing import CliRunner

    from recdreamer_gs.cli import app

    result = CliRunner().invoke(app, ["run", "a cat", "--preset", "paper", "--steps", "10", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "stages[i].steps" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())


def test_paper_preset_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from recdreamer_gs.cli import app

    stages = ("stages=[{name: a, steps: 2, distill: {method: usd}}, "
              "{name: b, steps: 2, distill: {method: sds, guidance_scale: 100}}, "
              "{name: c, steps: 2, distill: {method: usd}, params: colour}]")
    result = CliRunner().invoke(app, ["run", "a cat", "--preset", "paper", "--prior", "synthetic", "--device", "cpu",
                                      "--out", str(tmp_path), "--set", stages, "--set", "gaussians.num_init=100",
                                      "--set", "prior.synthetic.resolution=32", "--set", "train.progress_bar=false",
                                      "--set", "output.turntable_frames=0", "--set", "train.log_every=1"],
                             catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.iterdir())
    assert (run_dir / "model.ply").is_file() and (run_dir / "preview" / "c_final.png").is_file()
    from recdreamer_gs.report import read_logs

    logs = read_logs(run_dir)  # logs/a, logs/b, logs/c on one iteration axis; report.png drawn from them
    assert [s.name for s in logs] == ["a", "b", "c"]
    assert [s.iteration.tolist() for s in logs] == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert (run_dir / "report.png").is_file()
