"""A run folder's config.yaml runs the same run again, and ``eval`` scores the views ``run`` scored."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recdreamer_gs.cli import app

SMALL = ["--set", "gaussians.num_init=200", "--set", "output.turntable_frames=0", "--set", "train.progress_bar=false",
         "--set", "train.preview_every=100", "--device", "cpu", "--prior", "synthetic"]


def invoke(args):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def one_run(out: Path, *args: str) -> Path:
    result = invoke(["run", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = list(out.iterdir())
    return run_dir


def test_config_yaml_of_a_run_runs_it_again_without_a_prompt(tmp_path):
    first = one_run(tmp_path / "a", "a red teapot", "--steps", "3", "--seed", "7", "--resolution", "32", *SMALL)
    again = one_run(tmp_path / "b", "--config", str(first / "config.yaml"))
    assert again.name.startswith("a-red-teapot-")  # the prompt came from config.yaml
    assert (again / "model.ply").read_bytes() == (first / "model.ply").read_bytes()
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
    # PROMPT on the command line still wins over the config's.
    other = one_run(tmp_path / "c", "a blue kettle", "--config", str(first / "config.yaml"), "--steps", "1")
    assert other.name.startswith("a-blue-kettle-") and "prompt: a blue kettle" in (other / "config.yaml").read_text()


def test_config_without_a_prompt_still_needs_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 2\n")
    result = invoke(["run", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "prompt is empty" in result.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory) -> Path:
    """The standard preset's camera ranges (elevation -10..45, radius 2.5..3, fovy 40..60), small and short."""
    return one_run(tmp_path_factory.mktemp("standard"), "a cat", "--preset", "standard", "--steps", "3",
                   "--set", "camera.batch_size=1", *SMALL)


def eval_pent(*args: str) -> dict:
    result = invoke(["eval", *args, "--prior", "synthetic", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def test_eval_scores_the_views_of_the_run(standard_run, tmp_path):
    metrics = json.loads((standard_run / "metrics.json").read_text())
    # config.yaml next to the PLY: the run's settings, and the same metric views as the run's metrics.json.
    assert eval_pent(str(standard_run / "model.ply"))["pEnt"] == pytest.approx(metrics["pEnt"], abs=1e-3)
    # A PLY alone: the preset's cameras, here the same standard ones.
    alone = tmp_path / "model.ply"
    shutil.copy(standard_run / "model.ply", alone)
    printed = eval_pent(str(alone), "--preset", "standard")
    assert printed["pEnt"] == pytest.approx(metrics["pEnt"], abs=1e-3)
    assert printed["pose_histogram"] == pytest.approx(metrics["pose_histogram"], abs=1e-3)


def test_eval_with_the_synthetic_prior_scores_its_reference_orbit_whatever_the_run(tmp_path):
    """The exact posterior knows the synthetic prior's reference views only: eval --prior synthetic measures pEnt on
    their orbit (radius 2.5, fovy 40, elevation 15) even when the config next to the PLY is the standard preset's
    (radius 2.75, fovy 50 on average), so the reference object scores as on its own views."""
    import torch
    import yaml

    from recdreamer_gs.cameras import orbit
    from recdreamer_gs.config import load_config, to_dict
    from recdreamer_gs.export import write_ply
    from recdreamer_gs.metrics import metric_cameras, view_scores
    from recdreamer_gs.priors.synthetic import SyntheticPrior, reference_object
    from recdreamer_gs.render import render

    cfg = load_config("standard", overrides=[{"prompt": "a cat", "prior": {"kind": "sd", "synthetic": {
        "resolution": 32}}, "camera": {"resolution": 32}, "train": {"device": "cpu"}}])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    ref = reference_object()
    write_ply(tmp_path / "model.ply", ref.params)
    pose = SyntheticPrior(cfg.prior.synthetic).pose_setup(cfg, need=False)

    def pent(cameras) -> float:
        with torch.no_grad():
            rgb = render(ref, cameras, torch.ones(len(cameras), 3)).rgb
        return view_scores(rgb, pose.metric_classifier, pose.class_names)["pEnt"]

    expected, run_cameras = pent(orbit(10, 15.0, 2.5, 40.0, 32)), pent(metric_cameras(cfg.camera, 32))
    assert expected > 0.95 and abs(expected - run_cameras) > 0.1  # the check below tells the two apart
    assert eval_pent(str(tmp_path / "model.ply"))["pEnt"] == pytest.approx(expected, abs=1e-3)
