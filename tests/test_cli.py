"""The command line: an end-to-end offline run, render/export, and one clear line per bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from recdreamer_gs.cli import app

runner = CliRunner()
FAST = ["--set", "gaussians.num_init=200", "--set", "output.turntable_frames=3", "--set", "train.progress_bar=false",
        "--set", "train.preview_every=2", "--resolution", "32", "--device", "cpu"]


def invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def assert_clean_error(result, fragment):
    assert result.exit_code == 2, result.output
    text = result.output
    assert "Traceback" not in text
    assert fragment in " ".join(text.split()), text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = invoke(["run", "a kangaroo wearing boxing gloves", "--steps", "3", "--out", str(out), *FAST,
                     "--set", "train.log_every=1", "--set", "output.formats=[ply,spz]"])
    assert result.exit_code == 0, result.output
    assert "wrote model.ply, model.spz in" in result.output
    (run_dir,) = list(out.iterdir())
    return run_dir


def test_run_writes_outputs(finished_run):
    assert finished_run.name.startswith("a-kangaroo-wearing-boxing-gloves-")
    for name in ("model.ply", "config.yaml", "metrics.json", "turntable.gif", "turntable.mp4", "report.png",
                 "preview/final.png", "preview/iter_000002.png"):
        assert (finished_run / name).is_file(), name
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["prior"] == "synthetic" and metrics["iterations"] == 3 and metrics["gaussians"] == 200
    timings = metrics["timings"]
    assert set(timings) == {"load_s", "templates_s", "compile_s", "train_s", "export_s"} and timings["train_s"] > 0
    assert timings["compile_s"] == 0.0  # perf.compile auto: nothing compiled on a CPU
    assert timings["export_s"] > 0 and "peak_gpu_memory_gib" not in metrics  # GPU memory on CUDA only
    assert "mesh" not in metrics and not list(finished_run.glob("mesh*"))  # output.mesh is none by default
    mp4 = (finished_run / "turntable.mp4").read_bytes()
    assert mp4[4:8] == b"ftyp" and b"avc1" in mp4  # an MP4 with an H.264 track
    from recdreamer_gs.report import read_logs

    (log,) = read_logs(finished_run)  # logged every iteration: one row with the terms and the rectifier's pose EMA
    assert log.iteration.tolist() == [1.0, 2.0, 3.0] and "pose_ema/t900-999/front" in log.columns
    for key in ("loss/usd", "loss/lora", "grad/rect_norm", "pose/front", "t", "gaussians/count"):
        assert key in log.columns and np.isfinite(log.columns[key]).all(), key
    assert (finished_run / "model.ply").stat().st_size > 200 * 248
    assert metrics["gaussians_written"] == 200 and set(metrics["files"]) == {"model.ply", "model.spz"}
    assert metrics["files"]["model.spz"] * 8 < metrics["files"]["model.ply"]
    assert not list(finished_run.rglob("*.tmp*"))


def test_render_and_export_commands(finished_run, tmp_path):
    ply = finished_run / "model.ply"
    result = invoke(["render", str(ply), "--out", str(tmp_path), "--views", "4", "--frames", "2",
                     "--resolution", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "orbit.png").is_file() and (tmp_path / "orbit.gif").is_file()
    assert not (tmp_path / "orbit.mp4").exists()
    result = invoke(["render", str(ply), "--out", str(tmp_path), "--views", "1", "--frames", "3",
                     "--resolution", "33", "--device", "cpu", "--video"])  # odd size: padded to even for yuv420p
    assert result.exit_code == 0, result.output
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(tmp_path / "orbit.mp4"))
    meta = next(reader)
    frames = list(reader)
    assert len(frames) == 3 and meta["size"] == (232, 232) and "h264" in meta["codec"]  # 33 x 7 = 231: padded to even
    assert_clean_error(invoke(["render", str(ply), "--frames", "0", "--video"]), "--video needs --frames 2")
    result = invoke(["export", str(ply), str(tmp_path / "m.splat")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.splat").stat().st_size == 200 * 32
    for suffix in (".spz", ".sog"):  # Spark; SuperSplat and PlayCanvas
        result = invoke(["export", str(ply), str(tmp_path / f"m{suffix}")])
        assert result.exit_code == 0, result.output
        # (without white space: the console wraps a long temporary path anywhere, even inside a name)
        assert f"wrote{tmp_path / f'm{suffix}'}(200Gaussians)" in "".join(result.output.split())


def test_empty_prompt(tmp_path):
    assert_clean_error(invoke(["run", "   ", "--out", str(tmp_path)]), "prompt is empty")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_bad_steps(tmp_path, steps):
    assert_clean_error(invoke(["run", "a cat", "--steps", steps, "--out", str(tmp_path)]),
                       "train.steps: expected a positive number")
    assert not list(tmp_path.iterdir())


def test_unknown_preset(tmp_path):
    assert_clean_error(invoke(["run", "a cat", "--preset", "turbo", "--out", str(tmp_path)]), "unknown preset 'turbo'")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    assert_clean_error(invoke(["run", "a cat", "--config", str(cfg), "--out", str(tmp_path / "o")]),
                       "unknown config key train.stepz")
    assert_clean_error(invoke(["run", "a cat", "--set", "distill.methd=usd", "--out", str(tmp_path / "o")]),
                       "unknown config key distill.methd")


def test_missing_init_from(tmp_path):
    assert_clean_error(invoke(["run", "a cat", "--init-from", str(tmp_path / "none.ply"), "--out", str(tmp_path)]),
                       "does not exist")


def test_corrupt_init_from(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat garbage\n")
    out = tmp_path / "out"
    assert_clean_error(invoke(["run", "a cat", "--init-from", str(bad), "--out", str(out), *FAST]),
                       "no readable points")
    assert not out.exists()


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(invoke(["run", "a cat", "--out", str(blocker / "sub"), *FAST]), "cannot create the run folder")


def test_missing_and_corrupt_ply(tmp_path):
    assert_clean_error(invoke(["render", str(tmp_path / "nope.ply"), "--device", "cpu"]), "nope.ply")
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"\x00\x01garbage")
    assert_clean_error(invoke(["render", str(bad), "--device", "cpu"]), "bad.ply")
    assert_clean_error(invoke(["export", str(bad), str(tmp_path / "x.splat")]), "bad.ply")
    assert not (tmp_path / "x.splat").exists()


def test_every_command_that_reads_a_ply_refuses_one_without_finite_gaussians(tmp_path):
    import numpy as np
    import torch
    from plyfile import PlyData, PlyElement

    from recdreamer_gs.export import ply_rows, prepare_for_export

    n = 12
    params = {"means": torch.randn(n, 3), "scales": torch.full((n, 3), -3.0), "quats": torch.randn(n, 4),
              "opacities": torch.zeros(n), "sh0": torch.zeros(n, 1, 3), "shN": torch.zeros(n, 0, 3)}
    rows = ply_rows(prepare_for_export(params))
    rows["opacity"][:] = np.nan
    ply = tmp_path / "nan.ply"
    PlyData([PlyElement.describe(rows, "vertex")]).write(str(ply))
    said = f"{ply}: all {n} Gaussians have NaN or infinite values (opacities: {n} Gaussians)"
    for args in (["render", str(ply), "--device", "cpu"], ["view", str(ply), "--port", "0"],
                 ["export", str(ply), str(tmp_path / "m.spz")], ["eval", str(ply), "--prior", "synthetic",
                                                                 "--device", "cpu"]):
        result = invoke(args)
        assert_clean_error(result, said)
        assert result.output.count("error:") == 1, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.ply"]


def test_cuda_requested_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_clean_error(invoke(["run", "a cat", "--device", "cuda", "--out", str(tmp_path)]), "no CUDA device")


def test_eval_matches_run_metrics(finished_run):
    """`eval --prior synthetic` scores a PLY with the same pose posterior that `run` used for metrics.json."""
    result = invoke(["eval", str(finished_run / "model.ply"), "--prior", "synthetic", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[result.output.index("{"):])
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert printed["pEnt"] == pytest.approx(metrics["pEnt"], abs=1e-3)


def test_eval_needs_something_to_evaluate(finished_run):
    assert_clean_error(invoke(["eval", str(finished_run / "model.ply")]), "nothing to evaluate")


def test_the_light_commands_load_no_training_code():
    """One fresh process, loading more step by step (each step only adds modules): the board of a prompt set (a
    Ray actor: Ray's worker for it imports its module) loads only the standard library; the CLI with the batch
    driver, which plans and waits, loads no Lightning (it loads in the runs' own processes) and no Ray until runs
    start; ``view``'s module loads neither Lightning nor viser (viser comes with the first viewer). That a run
    without ``--viewer`` loads no viewer module is checked by test_resume.py's Ctrl-C test."""
    root = Path(__file__).resolve().parent.parent
    heavy = ("[m for m in ('torch', 'lightning', 'ray', 'yaml', 'viser', 'recdreamer_gs.live_viewer') "
             "if m in sys.modules]")
    code = (f"import sys, recdreamer_gs.board; print({heavy}); "
            f"import recdreamer_gs.cli, recdreamer_gs.batch; print({heavy}); "
            f"import recdreamer_gs.viewer; print({heavy})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:3] == ["[]", "['torch', 'yaml']", "['torch', 'yaml']"], proc.stdout
