"""A failure during training keeps the last good state: checkpoint + model.ply, one line with --resume."""

from pathlib import Path

import lightning as L
import pytest
import torch
from test_resume import SETTINGS  # the same small synthetic USD run as the resume tests

from recdreamer_gs import errors, prior_choice, run_folder, training
from recdreamer_gs.config import load_config, parse_override


class FailAt(L.Callback):
    """Raises ``error`` when iteration ``k`` starts (optionally after spoiling the Gaussians)."""

    def __init__(self, k: int, error: BaseException, spoil: bool = False):
        self.k, self.error, self.spoil = k, error, spoil

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.iteration == self.k:
            if self.spoil:
                with torch.no_grad():
                    pl_module.gaussians.params["means"].fill_(float("nan"))
            raise self.error


def fit(out: Path, callbacks=(), resume=None, settings=()):
    cfg = load_config("preview", overrides=[parse_override(s) for s in [*SETTINGS, *settings]])
    if resume is not None:
        cfg, resume = run_folder.read_resume(out)
    else:
        out.mkdir(parents=True)
    device = torch.device("cpu")
    return training.fit(cfg, out, prior_choice.build_prior(cfg, device), device, resume=resume,
                        extra_callbacks=list(callbacks))


def test_error_at_iteration_k_keeps_checkpoint_and_ply_and_resume_finishes(tmp_path):
    full = fit(tmp_path / "full")
    cut = tmp_path / "cut"
    with pytest.raises(errors.TrainingFailed) as info:
        fit(cut, [FailAt(5, RuntimeError("boom\nsecond line"))])
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 1
    assert "iteration 5" in message and "RuntimeError: boom" in message
    assert f"recdreamer-gs run --resume {cut}" in message
    assert "boom" in (cut / "error.log").read_text()  # the traceback is kept for a bug report
    assert (cut / "model.ply").is_file()
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=False)["iteration"] == 5
    resumed = fit(cut, resume=True)
    assert resumed.iteration == full.iteration == 8
    for name, value in full.gaussians.params.items():
        assert torch.allclose(resumed.gaussians.params[name], value, atol=1e-5), name


def test_out_of_memory_names_the_settings_to_lower(tmp_path):
    with pytest.raises(errors.TrainingFailed) as info:
        fit(tmp_path / "run", [FailAt(2, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))])
    message = str(info.value)
    assert info.value.exit_code == 2 and "out of memory" in message
    for key in ("camera.batch_size (now 4)", "camera.resolution", "densify.max_gaussians", "--resume"):
        assert key in message, key
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_non_finite_gaussians_are_not_written(tmp_path):
    with pytest.raises(errors.TrainingFailed, match="no longer finite; no checkpoint was written; start the run again"):
        fit(tmp_path / "run", [FailAt(3, RuntimeError("nan everywhere"), spoil=True)])
    assert not (tmp_path / "run" / "model.ply").exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_cli_reports_a_failure_in_one_line_with_the_resume_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from recdreamer_gs.cli import app
    from recdreamer_gs.system import TextTo3DSystem

    original = TextTo3DSystem.training_step

    def fail_at_3(self, batch, batch_idx):
        if self.iteration == 3:
            raise RuntimeError("injected failure")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(TextTo3DSystem, "training_step", fail_at_3)
    args = ["run", "a cat", "--out", str(tmp_path), "--steps", "6", "--device", "cpu"]
    for s in SETTINGS[1:]:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    (run_dir,) = list(tmp_path.iterdir())
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert "injected failure" in lines[-1] and f"recdreamer-gs run --resume {run_dir}" in " ".join(lines)
    assert "Traceback" not in result.output
    assert (run_dir / "model.ply").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


class FillDiskAt(L.Callback):
    """The disk fills up when iteration ``k`` starts."""

    def __init__(self, k: int, disk):
        self.k, self.disk = k, disk

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.iteration == self.k:
            self.disk.fill()


def no_partial_files(run: Path) -> None:
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    assert not (run / "error.log").exists()  # a full disk is not a bug: no (empty) traceback file


def test_disk_full_in_the_middle_of_a_run_keeps_the_last_checkpoint_and_resumes(tmp_path, full_disk):
    run = tmp_path / "run"
    settings = ["train.checkpoint_every=2", "output.formats=[ply,spz]"]
    with pytest.raises(errors.TrainingFailed) as info:  # the checkpoint of iteration 6 is the first write that fails
        fit(run, [FillDiskAt(5, full_disk)], settings=settings)
    full_disk.free()
    assert info.value.exit_code == 2
    assert str(info.value) == (
        f"training stopped at iteration 6: cannot write {run / 'checkpoints' / 'last.ckpt'}: the disk is full (No "
        "space left on device); nothing more could be written; kept checkpoints/last.ckpt (iteration 4); free some "
        f"space, then continue with: recdreamer-gs run --resume {run}")
    no_partial_files(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["iteration"] == 4
    resumed = fit(run, resume=True)
    assert resumed.iteration == 8
    assert (run / "model.ply").is_file() and (run / "model.spz").is_file() and (run / "metrics.json").is_file()


def test_disk_full_while_writing_the_model_keeps_what_was_written_and_resume_writes_the_rest(
        tmp_path, full_disk, monkeypatch):
    import dataclasses

    from recdreamer_gs import outputs

    def fill_then_write(path, params, frame):  # the disk fills up after model.ply, as model.spz is written
        full_disk.fill()
        return outputs.write_spz(path, params, frame)

    run = tmp_path / "run"
    with monkeypatch.context() as m, pytest.raises(errors.TrainingFailed) as info:
        m.setattr(outputs, "OUTPUTS", tuple(dataclasses.replace(o, write=fill_then_write) if o.name == "spz" else o
                                            for o in outputs.OUTPUTS))
        fit(run, settings=["output.formats=[ply,spz]"])
    full_disk.free()
    assert str(info.value) == (
        f"training stopped at iteration 8: cannot write {run / 'model.spz'}: the disk is full (No space left on "
        "device); nothing more could be written; kept checkpoints/last.ckpt (iteration 8) and model.ply; free some "
        f"space, then continue with: recdreamer-gs run --resume {run}")
    no_partial_files(run)
    assert not (run / "model.spz").exists() and not (run / "metrics.json").exists()
    ply = (run / "model.ply").read_bytes()
    cfg, checkpoint, where = run_folder.prepare_resume(run)
    assert where == "at iteration 8 of 8 (training done; writing its files)"
    resumed = fit(run, resume=True)
    assert resumed.iteration == 8 and (run / "model.ply").read_bytes() == ply
    assert (run / "model.spz").is_file() and (run / "metrics.json").is_file()


def test_what_is_said_when_permission_is_lost_or_the_folder_is_gone(tmp_path):
    import errno

    from recdreamer_gs.errors import os_cause

    class Stopped:  # a system that stopped on a failed write
        iteration = 3

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.spz").write_bytes(b"kept")
    denied = PermissionError(errno.EACCES, "Permission denied", str(run / "model.ply"))
    assert os_cause(denied) == "Permission denied"
    assert run_folder.kept_state(Stopped(), run, denied) == (
        "nothing more could be written; no checkpoint was written (kept model.spz); restore write permission on the "
        "folder, then start the run again")
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "removed" / "model.ply"))
    assert os_cause(gone) == "No such file or directory"
    assert run_folder.kept_state(Stopped(), tmp_path / "removed", gone) == (
        "nothing was kept: the run folder is gone; start the run again")
