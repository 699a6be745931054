"""Non-essential logic of a run: previews, config snapshot, loggers, final export, mesh, report and metrics."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from recdreamer_gs.config import RunConfig, needs, to_dict
from recdreamer_gs.errors import warn
from recdreamer_gs.export import atomic_path, atomic_write_bytes
from recdreamer_gs.images import image_grid, preview_upscale, save_gif, save_mp4, save_png
from recdreamer_gs.mesh import MeshError, MeshOptions, extract_mesh
from recdreamer_gs.model_files import write_particles
from recdreamer_gs.outputs import output_named
from recdreamer_gs.report import write_report


class AtomicCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, but each save rewrites ``metrics.csv`` through a temp file: Lightning appends to
    it, or rewrites it in place when new keys appear, so a full disk would leave it cut short or empty."""

    def save(self) -> None:
        if not self.metrics:
            return
        target = self.metrics_file_path
        with atomic_path(target) as tmp:
            if os.path.isfile(target):
                shutil.copyfile(target, tmp)
            self.metrics_file_path = str(tmp)
            try:
                super().save()  # appends to (or rewrites) the copy
            finally:
                self.metrics_file_path = target


class CSVLog(CSVLogger):
    """``CSVLogger`` with :class:`AtomicCSVWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicCSVWriter(log_dir=self.log_dir)
        return self._experiment


def make_loggers(cfg: RunConfig, out_dir: Path, version: str) -> list:
    """CSV logs in ``logs/<stage>/metrics.csv`` (what ``report`` reads), plus TensorBoard events in
    ``tensorboard/<stage>/`` with ``output.logger=tensorboard``."""
    loggers: list = [CSVLog(save_dir=str(out_dir), name="logs", version=version)]
    if cfg.output.logger == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version=version,
                                         default_hp_metric=False))
    return loggers


class MetricsLog(L.Callback):
    """Every ``every`` iterations, one row to the loggers at Lightning's step for that batch: the terms of the
    iteration (``system.logged``) and, in a USD run, the rectifier's pose EMA p̄_t of every time interval and class
    (``pose_ema/t<lo>-<hi>/<class>``; with per-particle statistics particle i > 0 under ``pose_ema_p<i>/``).

    Not through ``LightningModule.log``: its bookkeeping costs about a third of a millisecond per key on every
    iteration, logged or not (measured: 1.4 s of a 300-iteration two-particle synthetic run, 13%, for its 14 terms);
    the pose EMA adds 40 keys with the default 10 intervals and 4 classes.
    """

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.iteration % self.every != 0:
            return
        values = {k: float(v) for k, v in pl_module.logged.items()}
        rectifier = getattr(pl_module, "rectifier", None)
        if rectifier is not None and needs(pl_module.cfg.distill.method).rectifier:
            values.update({k: float(v) for k, v in rectifier.log_dict().items()})
        for logger in trainer.loggers:  # Lightning's step for this batch: iteration - 1
            logger.log_metrics(values, step=pl_module.iteration - 1)


class ConfigSnapshot(L.Callback):
    """Writes the resolved config as ``config.yaml`` when training starts."""

    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        atomic_write_bytes(self.out_dir / "config.yaml", text.encode())


class PreviewImages(L.Callback):
    """Orbit previews as PNG grids at the start (iteration 0), every ``every`` iterations and at the end."""

    def __init__(self, out_dir: Path, every: int, prefix: str = ""):
        self.dir = out_dir / "preview"
        self.every = every
        self.prefix = prefix  # the stage name in a multi-stage run

    def write(self, pl_module: Any, name: str) -> Path:
        images = pl_module.render_preview()  # one row per particle
        path = self.dir / f"{self.prefix}{name}.png"
        save_png(image_grid(images, columns=images.shape[0] // len(pl_module.particles)), path,
                 preview_upscale(images.shape[-1]))
        return path

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # Iteration 0 of a fresh run: the starting Gaussians (the ball, the file or the Shap-E shape).
        if trainer.is_global_zero and self.every > 0 and pl_module.iteration == 0 and pl_module.stage == 0:
            self.write(pl_module, "iter_000000")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero and self.every > 0 and pl_module.iteration % self.every == 0:
            self.write(pl_module, f"iter_{pl_module.iteration:06d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self.write(pl_module, "final")


def write_meshes(pl_module: Any, out_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """``mesh.<ext>`` (or ``mesh_<i>.<ext>`` per particle) in the PLY's frame; sizes and time for metrics.json."""
    output = output_named(cfg.output.mesh, kind="mesh")
    names = ["mesh"] if cfg.train.particles == 1 else [f"mesh_{i}" for i in pl_module.particle_ids]
    info: dict[str, Any] = {}
    for name, gaussians in zip(names, pl_module.particles):
        # Twice the training resolution (within 32..256 px): finer than what the model was fitted at.
        resolution = min(256, max(32, 2 * pl_module.render_resolution))
        try:
            result = extract_mesh(gaussians, MeshOptions(faces=cfg.output.mesh_faces, resolution=resolution))
        except MeshError as err:  # e.g. a run stopped while still a cloud: the model and metrics still count
            warn(f"no {name}{output.suffix}: {err}")
            info[name] = {"file": None, "error": str(err)}
            continue
        output.write(out_dir / f"{name}{output.suffix}", result.mesh, cfg.output.ply_frame)
        info[name] = {"file": f"{name}{output.suffix}", "vertices": result.vertices, "faces": result.faces,
                      "views": result.views, "voxel_size": round(result.voxel_size, 6),
                      "seconds": round(result.seconds, 2)}
    return info


class Checkpointer(L.Callback):
    """``checkpoints/last.ckpt`` every ``every`` iterations, at the end, and when Ctrl-C or an error stops the
    run (then also the model files), so that ``run --resume`` can continue. Written through a temp file: a
    failed write leaves the previous checkpoint whole and no partial file behind."""

    def __init__(self, cfg: RunConfig, out_dir: Path, every: int):
        self.cfg, self.out_dir, self.every = cfg, out_dir, every
        self.path = out_dir / "checkpoints" / "last.ckpt"

    def save(self, trainer: L.Trainer) -> None:
        if trainer.world_size > 1:
            return  # each rank holds other particles: resuming a data-parallel run is not supported yet
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            trainer.save_checkpoint(str(tmp))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every > 0 and pl_module.iteration % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        """Ctrl-C or a failure: keep what the run has reached (checkpoint and model files) for ``--resume``.

        Nothing is written when the failure was itself a failed write (``OSError``: a full disk, a lost
        folder), nor when the Gaussians are no longer finite: the files on disk stay the last good state.
        A save that fails here is kept as ``pl_module.save_error`` for the message (run_folder.kept_state).
        """
        pl_module.interrupted = isinstance(exception, KeyboardInterrupt)
        pl_module.saved_on_exception = False
        if isinstance(exception, OSError):
            return
        pl_module.non_finite = not all(bool(torch.isfinite(p).all()) for g in pl_module.particles
                                       for p in g.params.values())
        if pl_module.non_finite:
            return
        try:
            self.save(trainer)
            write_particles(pl_module, self.out_dir, self.cfg)
        except OSError as err:
            pl_module.save_error = err
            return
        pl_module.saved_on_exception = True


class ExportAndMetrics(L.Callback):
    """At the end: the model files (``output.formats``), the turntable GIF and MP4, the mesh if asked for,
    ``metrics.json`` and ``report.png``. ``metrics.json`` is written after the model files and the mesh: a
    run folder that has it is complete (``run --resume`` of a folder without it writes them again)."""

    def __init__(self, cfg: RunConfig, out_dir: Path, timings: Optional[dict[str, float]] = None,
                 stage: Optional[str] = None):
        self.cfg, self.out_dir = cfg, out_dir
        self.stage = stage  # "k/K" in a multi-stage run (every stage writes metrics.json; the last one stays)
        # Seconds per phase of the run, shared by the stages of a multi-stage run (they add train_s, export_s).
        self.timings = timings if timings is not None else {}
        self.start_time = 0.0
        self.start_iteration = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.start_time = time.perf_counter()
        self.start_iteration = pl_module.iteration

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.finish(pl_module, trainer.is_global_zero, trainer.loggers)

    def finish(self, pl_module: Any, global_zero: bool = True, loggers: Sequence[Any] = ()) -> None:
        """Write the files of the end of a run (also called without a Trainer by ``training.fit_stage`` for a resumed
        run whose training was done but whose files were not all written)."""
        export_start = time.perf_counter()
        # Time spent paused from the live viewer (viewer.TrainingViewer) is not training time.
        seconds = export_start - self.start_time - getattr(pl_module, "paused_seconds", 0.0)
        written = write_particles(pl_module, self.out_dir, self.cfg)  # every rank writes its own particles
        if not global_zero:
            return
        if self.cfg.output.turntable_frames > 0:
            frames = pl_module.render_preview(self.cfg.output.turntable_frames, particle=0)
            save_gif(frames, self.out_dir / "turntable.gif", upscale=preview_upscale(frames.shape[-1]))
            save_mp4(frames, self.out_dir / "turntable.mp4", upscale=preview_upscale(frames.shape[-1]))
        meshes = write_meshes(pl_module, self.out_dir, self.cfg) if self.cfg.output.mesh != "none" else {}
        for key, value in (("train_s", seconds), ("export_s", time.perf_counter() - export_start)):
            self.timings[key] = self.timings.get(key, 0.0) + value
        iterations = pl_module.iteration - self.start_iteration
        metrics = {
            "prompt": self.cfg.prompt,
            **({"stage": self.stage} if self.stage else {}),
            "prior": getattr(pl_module.prior, "name", "?"),
            "method": self.cfg.distill.method,
            "iterations": pl_module.iteration,
            "particles": len(pl_module.particles),
            "gaussians": sum(len(g) for g in pl_module.particles),
            # Gaussians in the files of the first format (non-finite ones are left out) and every file's size.
            "gaussians_written": sum(w.gaussians for w in written if w.path.suffix == written[0].path.suffix)
            if written else 0,
            "files": {w.path.name: w.path.stat().st_size for w in written},
            "train_seconds": round(seconds, 3),
            # None when no iteration ran here (the export of a run that stopped after its last iteration).
            "ms_per_iteration": round(1000.0 * seconds / iterations, 2) if iterations else None,
            "device": str(pl_module.device),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if pl_module.device.type == "cuda":  # the run's peak, loading and templates included
            metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, 3)
            metrics["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(pl_module.device) / 2**30, 3)
        metrics.update(getattr(pl_module, "final_metrics", lambda: {})())
        metrics.update(meshes)
        atomic_write_bytes(self.out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())

        for logger in loggers:
            logger.save()  # the CSV is otherwise flushed only after on_train_end
        write_report(self.out_dir)
