"""Several particles: one shared ε_φ and rectifier, every particle exported."""

import json

import torch
from typer.testing import CliRunner

from recdreamer_gs import prior_choice, training
from recdreamer_gs.cli import app
from recdreamer_gs.config import load_config, parse_override


def test_two_particles_have_their_own_statistics_and_are_exported(tmp_path):
    overrides = ["train.particles=2", "train.steps=4", "prior.kind=synthetic", "train.device=cpu",
                 "prior.synthetic.resolution=32", "gaussians.num_init=200", "train.progress_bar=false",
                 "output.turntable_frames=0", "train.preview_every=0", "distill.method=usd", "train.log_every=1",
                 "distill.time_schedule=bnf"]
    cfg = load_config("preview", overrides=[parse_override(s) for s in overrides])
    device = torch.device("cpu")
    system = training.fit(cfg, tmp_path, prior_choice.build_prior(cfg, device), device)
    assert len(system.particles) == 2 and system.bnf_intervals == 10  # n_i = 10 for several particles
    a, b = (g.params["means"] for g in system.particles)
    assert a.shape == b.shape and not torch.allclose(a, b)  # separate sets, different seeds
    # One statistic per particle (distill.rectifier.statistics=per_particle), each updated once per iteration.
    assert [int(s.counts.sum()) for s in system.rectifier.groups] == [4, 4]
    assert not torch.equal(*(s.marginal for s in system.rectifier.groups))  # each moved by its own views
    for name in ("model_0.ply", "model_1.ply"):
        assert (tmp_path / name).stat().st_size > 200 * 248
    assert not (tmp_path / "model.ply").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["particles"] == 2 and len(metrics["pEnt_per_particle"]) == 2


def test_particles_flag(tmp_path):
    result = CliRunner().invoke(app, ["run", "a cat", "--particles", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "train.particles: expected a positive number" in " ".join(result.output.split())
