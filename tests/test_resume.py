"""Checkpoints and resume: an interrupted and resumed run ends where an uninterrupted one does."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from typer.testing import CliRunner

from recdreamer_gs import errors, prior_choice, run_folder, training
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
    choice = prior_choice.build_prior(cfg, device)
    callbacks = [StopAt(stop_at)] if stop_at is not None else []
    return cfg, training.fit(cfg, out, choice, device, extra_callbacks=callbacks)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    _, full = train(tmp_path / "full")
    with pytest.raises(errors.Interrupted, match="--resume"):
        train(tmp_path / "cut", stop_at=4)
    cut = tmp_path / "cut"
    assert (cut / "checkpoints" / "last.ckpt").is_file() and (cut / "model.ply").is_file()
    cfg, checkpoint = run_folder.read_resume(cut)
    assert checkpoint["iteration"] == 4
    resumed = training.fit(cfg, cut, prior_choice.build_prior(cfg, torch.device("cpu")), torch.device("cpu"),
                           resume=checkpoint)
    assert resumed.iteration == full.iteration == 8
    assert len(resumed.gaussians) == len(full.gaussians)
    assert full.densifiers[0].n_grown > 0 or full.densifiers[0].n_pruned > 0  # the densifier state mattered
    for name, value in full.gaussians.params.items():
        assert torch.allclose(resumed.gaussians.params[name], value, atol=1e-5), name
    assert torch.allclose(resumed.pose_stats.marginal, full.pose_stats.marginal, atol=1e-6)
    # Stopped after its last checkpoint, during the export (a batch task lost there): resuming only exports.
    (cut / "metrics.json").unlink()
    cfg, checkpoint = run_folder.read_resume(cut)
    training.fit(cfg, cut, prior_choice.build_prior(cfg, torch.device("cpu")), torch.device("cpu"), resume=checkpoint)
    metrics = json.loads((cut / "metrics.json").read_text())
    assert metrics["iterations"] == 8 and metrics["gaussians"] == len(full.gaussians)
    assert metrics["ms_per_iteration"] is None  # no iteration ran in that attempt


def test_resume_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "config.yaml and checkpoints/last.ckpt" in " ".join(result.output.split())
    result = runner.invoke(app, ["run", "--resume", str(tmp_path), "--seed", "3"])
    assert result.exit_code == 2 and "takes only --steps and --device" in " ".join(result.output.split())


def test_ctrl_c_writes_checkpoint_and_ply_then_resume_finishes(tmp_path):
    """A real SIGINT to a running ``recdreamer-gs run``: checkpoint + PLY first, exit 130, then --resume. The
    process also says at exit which viewer modules it loaded: a run without ``--viewer`` loads none."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    argv = ["recdreamer-gs", "run", "a cat", "--steps", "100000", "--device", "cpu", "--out", str(tmp_path),
            "--set", "train.progress_bar=false", "--set", "train.preview_every=2", "--set", "gaussians.num_init=150",
            "--set", "prior.synthetic.resolution=32", "--set", "output.turntable_frames=0"]
    # `python -m recdreamer_gs.cli ARGS`, with an exit hook that lists the viewer modules in memory.
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('viewer modules:', [m for m in ('viser', "
            "'recdreamer_gs.viewer', 'recdreamer_gs.live_viewer') if m in sys.modules], flush=True)); "
            f"sys.argv = {argv!r}; runpy.run_module('recdreamer_gs.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/preview/iter_000002.png")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    assert "viewer modules: []" in output, output[-2000:]
    (run_dir,) = list(tmp_path.iterdir())
    assert "--resume" in output and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "model.ply").is_file()
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["iteration"]
    assert 2 <= stopped_at < 100000
    # The resume in this process (the signal was the part that needed a process of its own).
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--steps", str(stopped_at + 2)])
    assert result.exit_code == 0, result.output[-2000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["iteration"] == stopped_at + 2
