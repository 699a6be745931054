"""Checkpoints and resume: an interrupted and resumed run ends where an uninterrupted one does."""

from pathlib import Path

import lightning as L
import pytest
import torch
from typer.testing import CliRunner

from recdreamer_gs import pipeline
from recdreamer_gs.cli import app
from recdreamer_gs.config import load_config, parse_override

SETTINGS = [
    "train.steps=8", "train.progress_bar=false", "output.turntable_frames=0", "train.preview_every=0",
    "gaussians.num_init=300", "prior.synthetic.resolution=32", "prior.kind=synthetic", "train.device=cpu",
    "distill.method=usd", "densify.refine_start=0", "densify.refine_every=2", "train.seed=3",
    "prior.synthetic.densify_grow_grad2d=0.5",
]


class StopAt(L.Callback):
    """Simulates Ctrl-C after a given iteration."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.iteration == self.iteration:
            raise KeyboardInterrupt


def train(out: Path, stop_at=None):
    cfg = load_config("preview", overrides=[parse_override(s) for s in SETTINGS])
    device = torch.device("cpu")
    out.mkdir(parents=True)
    choice = pipeline.build_prior(cfg, device)
    callbacks = [StopAt(stop_at)] if stop_at is not None else []
    return cfg, pipeline.fit(cfg, out, choice, device, extra_callbacks=callbacks)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    _, full = train(tmp_path / "full")
    with pytest.raises(pipeline.Interrupted, match="--resume"):
        train(tmp_path / "cut", stop_at=4)
    cut = tmp_path / "cut"
    assert (cut / "checkpoints" / "last.ckpt").is_file() and (cut / "model.ply").is_file()
    cfg, checkpoint = pipeline.read_resume(cut)
    assert checkpoint["iteration"] == 4
    resumed = pipeline.fit(cfg, cut, pipeline.build_prior(cfg, torch.device("cpu")), torch.device("cpu"),
                           resume=checkpoint)
    assert resumed.iteration == full.iteration == 8
    assert len(resumed.gaussians) == len(full.gaussians)
    assert full.densifiers[0].n_grown > 0 or full.densifiers[0].n_pruned > 0  # the densifier state mattered
    for name, value in full.gaussians.params.items():
        assert torch.allclose(resumed.gaussians.params[name], value, atol=1e-5), name
    assert torch.allclose(resumed.pose_stats.marginal, full.pose_stats.marginal, atol=1e-6)


def test_resume_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "config.yaml and checkpoints/last.ckpt" in " ".join(result.output.split())
    result = runner.invoke(app, ["run", "--resume", str(tmp_path), "--seed", "3"])
    assert result.exit_code == 2 and "takes only --steps and --device" in " ".join(result.output.split())
