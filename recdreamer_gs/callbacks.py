"""Non-essential logic of a run: previews, config snapshot, loggers, final export, mesh, report and metrics."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image

from recdreamer_gs.config import RunConfig, to_dict
from recdreamer_gs.export import atomic_path, atomic_write_bytes, write_ply, write_splat


def image_grid(images: torch.Tensor, columns: Optional[int] = None) -> Image.Image:
    """[N,3,H,W] in [0,1] -> one PIL image, ``columns`` per row."""
    n, _, h, w = images.shape
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * h, columns * w)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i].detach().float().cpu().clamp(0, 1)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_png(image: Image.Image, path: Path, upscale: int = 1) -> None:
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def save_gif(frames: torch.Tensor, path: Path, fps: int = 12, upscale: int = 1) -> None:
    """[N,3,H,W] in [0,1] -> looping GIF (written atomically)."""
    images = [image_grid(frames[i:i + 1], 1) for i in range(frames.shape[0])]
    if upscale > 1:
        images = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in images]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    atomic_write_bytes(path, buffer.getvalue())


def save_mp4(frames: torch.Tensor, path: Path, fps: int = 12, upscale: int = 1) -> None:
    """[N,3,H,W] in [0,1] -> H.264 MP4 (yuv420p, written atomically) with the ffmpeg that imageio-ffmpeg ships."""
    import imageio_ffmpeg

    images = [np.asarray(image_grid(frames[i:i + 1], 1)) for i in range(frames.shape[0])]
    if upscale > 1:
        images = [im.repeat(upscale, axis=0).repeat(upscale, axis=1) for im in images]
    h, w = images[0].shape[:2]
    # yuv420p halves the chroma planes: both sides must be even, so repeat the last row/column if odd.
    images = [np.pad(im, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for im in images]
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(str(tmp), (w + w % 2, h + h % 2), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
                                             output_params=["-movflags", "+faststart"])
        writer.send(None)  # start the ffmpeg process
        for im in images:
            writer.send(np.ascontiguousarray(im))
        writer.close()


def preview_upscale(resolution: int) -> int:
    """Small renders are enlarged in the PNGs so they can be looked at."""
    return max(1, 256 // resolution)


def make_loggers(cfg: RunConfig, out_dir: Path, version: str) -> list:
    """CSV logs in ``logs/<stage>/metrics.csv`` (what ``report`` reads), plus TensorBoard events in
    ``tensorboard/<stage>/`` with ``output.logger=tensorboard``."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=str(out_dir), name="logs", version=version)]
    if cfg.output.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version=version,
                                         default_hp_metric=False))
    return loggers


class PoseEMALog(L.Callback):
    """The rectifier's pose EMA p̄_t of every time interval and class (``pose_ema/t<lo>-<hi>/<class>``; with
    per-particle statistics particle i > 0 under ``pose_ema_p<i>/``), every ``every`` iterations of a USD
    run, straight to the loggers at the step Lightning logs too.

    Not through ``LightningModule.log``: its bookkeeping costs about half a millisecond per key on every
    iteration (measured), and these are 40 keys with the default 10 intervals and 4 classes.
    """

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rectifier = getattr(pl_module, "rectifier", None)
        if rectifier is None or pl_module.cfg.distill.method != "usd" or self.every <= 0:
            return
        if pl_module.iteration % self.every == 0:
            values = {k: float(v) for k, v in rectifier.log_dict().items()}
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


def write_particles(pl_module: Any, out_dir: Path, cfg: RunConfig) -> int:
    """This process's particles as ``model.ply`` (one particle) or ``model_<i>.ply`` (and .splat if
    configured); returns the rows written."""
    rows = 0
    names = ["model"] if cfg.train.particles == 1 else [f"model_{i}" for i in pl_module.particle_ids]
    for name, gaussians in zip(names, pl_module.particles):
        params = {k: v.detach().cpu() for k, v in gaussians.params.items()}
        rows += write_ply(out_dir / f"{name}.ply", params, frame=cfg.output.ply_frame)
        if cfg.output.write_splat:
            write_splat(out_dir / f"{name}.splat", params, frame=cfg.output.ply_frame)
    return rows


def write_meshes(pl_module: Any, out_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """``mesh.<ext>`` (or ``mesh_<i>.<ext>`` per particle) in the PLY's frame; sizes and time for metrics.json."""
    from recdreamer_gs.mesh import MeshError, MeshOptions, extract_mesh, write_mesh

    ext = cfg.output.mesh
    names = ["mesh"] if cfg.train.particles == 1 else [f"mesh_{i}" for i in pl_module.particle_ids]
    info: dict[str, Any] = {}
    for name, gaussians in zip(names, pl_module.particles):
        # Twice the training resolution (within 32..256 px): finer than what the model was fitted at.
        resolution = min(256, max(32, 2 * pl_module.render_resolution))
        try:
            result = extract_mesh(gaussians, MeshOptions(faces=cfg.output.mesh_faces, resolution=resolution))
        except MeshError as err:  # e.g. a run stopped while still a cloud: the model and metrics still count
            print(f"warning: no {name}.{ext}: {err}", file=sys.stderr)
            info[name] = {"file": None, "error": str(err)}
            continue
        write_mesh(out_dir / f"{name}.{ext}", result.mesh, frame=cfg.output.ply_frame)
        info[name] = {"file": f"{name}.{ext}", "vertices": result.vertices, "faces": result.faces,
                      "views": result.views, "voxel_size": round(result.voxel_size, 6),
                      "seconds": round(result.seconds, 2)}
    return info


class Checkpointer(L.Callback):
    """``checkpoints/last.ckpt`` every ``every`` iterations, at the end, and when Ctrl-C stops the run
    (then also ``model.ply``), so that ``run --resume`` can continue. Written atomically."""

    def __init__(self, cfg: RunConfig, out_dir: Path, every: int):
        self.cfg, self.out_dir, self.every = cfg, out_dir, every
        self.path = out_dir / "checkpoints" / "last.ckpt"

    def save(self, trainer: L.Trainer) -> None:
        if trainer.world_size > 1:
            return  # each rank holds other particles: resuming a data-parallel run is not supported yet
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(str(tmp))
        os.replace(tmp, self.path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every > 0 and pl_module.iteration % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        """Ctrl-C or a failure: keep what the run has reached (checkpoint and PLY) for ``--resume``. Gaussians
        that are no longer finite are not written: the checkpoint already on disk stays the last good one."""
        pl_module.interrupted = isinstance(exception, KeyboardInterrupt)
        finite = all(bool(torch.isfinite(p).all()) for g in pl_module.particles for p in g.params.values())
        pl_module.saved_on_exception = finite
        if finite:
            self.save(trainer)
            write_particles(pl_module, self.out_dir, self.cfg)


class ExportAndMetrics(L.Callback):
    """At the end: ``model.ply`` (+ ``model.splat``), the turntable GIF and MP4, the mesh if asked for,
    ``metrics.json`` and ``report.png``."""

    def __init__(self, cfg: RunConfig, out_dir: Path, timings: Optional[dict[str, float]] = None):
        self.cfg, self.out_dir = cfg, out_dir
        # Seconds per phase of the run, shared by the stages of a multi-stage run (they add train_s, export_s).
        self.timings = timings if timings is not None else {}
        self.start_time = 0.0
        self.start_iteration = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.start_time = time.perf_counter()
        self.start_iteration = pl_module.iteration

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        export_start = time.perf_counter()
        # Time spent paused from the live viewer (viewer.TrainingViewer) is not training time.
        seconds = export_start - self.start_time - getattr(pl_module, "paused_seconds", 0.0)
        rows = write_particles(pl_module, self.out_dir, self.cfg)  # every rank writes its own particles
        if not trainer.is_global_zero:
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
            "prior": getattr(pl_module.prior, "name", "?"),
            "method": self.cfg.distill.method,
            "iterations": pl_module.iteration,
            "particles": len(pl_module.particles),
            "gaussians": sum(len(g) for g in pl_module.particles),
            "gaussians_written": rows,
            "train_seconds": round(seconds, 3),
            "ms_per_iteration": round(1000.0 * seconds / max(iterations, 1), 2),
            "device": str(pl_module.device),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if pl_module.device.type == "cuda":  # the run's peak, loading and templates included
            metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, 3)
            metrics["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(pl_module.device) / 2**30, 3)
        metrics.update(getattr(pl_module, "final_metrics", lambda: {})())
        metrics.update(meshes)
        atomic_write_bytes(self.out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        from recdreamer_gs.report import write_report

        for logger in trainer.loggers:
            logger.save()  # the CSV is otherwise flushed only after on_train_end
        write_report(self.out_dir)


@torch.no_grad()
def write_orbit(gaussians: Any, out_dir: Path, views: int = 8, frames: int = 36, resolution: int = 128,
                elevation: float = 15.0, radius: float = 2.5, fovy: float = 40.0, video: bool = False) -> list[Path]:
    """``recdreamer-gs render``: orbit.png (a grid of ``views``), orbit.gif of ``frames`` (and orbit.mp4 with
    ``video``) of a ``Gaussians`` on white; returns the files written."""
    from recdreamer_gs.cameras import orbit
    from recdreamer_gs.errors import UserError
    from recdreamer_gs.render import render

    if views < 1 or frames < 0 or resolution < 8 or radius <= 0 or not 1 <= fovy < 170:
        raise UserError("expected --views >= 1, --frames >= 0, --resolution >= 8, --radius > 0, 1 <= --fovy < 170")
    if video and frames < 2:
        raise UserError(f"--video needs --frames 2 or more, got {frames}")
    device = gaussians.means.device
    out_dir.mkdir(parents=True, exist_ok=True)
    upscale = preview_upscale(resolution)

    def rgb(n: int) -> torch.Tensor:
        return render(gaussians, orbit(n, elevation, radius, fovy, resolution).to(device),
                      torch.ones(n, 3, device=device)).rgb

    save_png(image_grid(rgb(views)), out_dir / "orbit.png", upscale)
    written = [out_dir / "orbit.png"]
    if frames > 0:
        turn = rgb(frames)
        save_gif(turn, out_dir / "orbit.gif", upscale=upscale)
        written.append(out_dir / "orbit.gif")
        if video:
            save_mp4(turn, out_dir / "orbit.mp4", upscale=upscale)
            written.append(out_dir / "orbit.mp4")
    return written
