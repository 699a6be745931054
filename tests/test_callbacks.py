"""Run outputs (recdreamer_gs.callbacks): the MP4 writer and the loggers."""

from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import torch

from recdreamer_gs.callbacks import make_loggers
from recdreamer_gs.images import save_mp4
from recdreamer_gs.config import load_config, parse_override


def test_save_mp4_writes_h264_with_even_sizes(tmp_path):
    frames = torch.zeros(5, 3, 15, 21)
    frames[:, 0, :, :10] = 1.0  # red on the left half
    path = tmp_path / "clip.mp4"
    save_mp4(frames, path, fps=10, upscale=3)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    decoded = [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]
    assert meta["codec"].startswith("h264") and meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (64, 46) and len(decoded) == 5  # 63 x 45 padded to even
    left, right = decoded[2][20, 10], decoded[2][20, 50]
    assert left[0] > 200 and left[1] < 60 and right.max() < 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cfg = load_config("preview")
    (csv_logger,) = make_loggers(cfg, tmp_path, "stage1")
    assert isinstance(csv_logger, CSVLogger) and csv_logger.log_dir == str(tmp_path / "logs" / "stage1")
    cfg = load_config("preview", overrides=[parse_override("output.logger=tensorboard")])
    csv_logger, tb = make_loggers(cfg, tmp_path, "")
    assert type(tb).__name__ == "TensorBoardLogger"
    tb.log_metrics({"loss/usd": 1.5}, step=3)
    tb.save()
    csv_logger.log_metrics({"loss/usd": 1.5}, step=3)
    csv_logger.save()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0] == "loss/usd,step"


def test_write_meshes_at_the_end_of_a_run(tmp_path, capsys):
    import json
    from types import SimpleNamespace

    from test_mesh import ball_params

    from recdreamer_gs.callbacks import write_meshes
    from recdreamer_gs.config import GaussiansConfig
    from recdreamer_gs.gaussians import Gaussians

    cfg = load_config("preview", overrides=[parse_override("output.mesh=obj")])
    fog = Gaussians(ball_params(opacity_logit=-8.0), GaussiansConfig())
    module = SimpleNamespace(particles=[fog], particle_ids=[0], render_resolution=16)
    info = write_meshes(module, tmp_path, cfg)  # a model with no surface: a warning, not a failed run
    assert info["mesh"]["file"] is None and "opacity" in info["mesh"]["error"]
    assert "warning: no mesh.obj" in capsys.readouterr().err and not list(tmp_path.iterdir())
    module.particles = [Gaussians(ball_params(), GaussiansConfig())]
    info = write_meshes(module, tmp_path, cfg)
    assert info["mesh"]["file"] == "mesh.obj" and info["mesh"]["views"] >= 36 and json.dumps(info)
    assert (tmp_path / "mesh.obj").read_text().count("\nv ") == info["mesh"]["vertices"]
