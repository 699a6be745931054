"""Non-essential logic of a run: previews, config snapshot, final export and metrics."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image

from recdreamer_gs.config import RunConfig, to_dict
from recdreamer_gs.export import atomic_write_bytes, write_ply, write_splat


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


def preview_upscale(resolution: int) -> int:
    """Small renders are enlarged in the PNGs so they can be looked at."""
    return max(1, 256 // resolution)


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
    """Orbit previews as PNG grids every ``every`` iterations and at the end."""

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
        if isinstance(exception, KeyboardInterrupt):
            pl_module.interrupted = True
            self.save(trainer)
            write_particles(pl_module, self.out_dir, self.cfg)


class ExportAndMetrics(L.Callback):
    """At the end: ``model.ply`` (+ ``model.splat``), a turntable GIF and ``metrics.json``."""

    def __init__(self, cfg: RunConfig, out_dir: Path, extra_metrics: Optional[dict[str, Any]] = None):
        self.cfg, self.out_dir = cfg, out_dir
        self.extra = dict(extra_metrics or {})
        self.start_time = 0.0
        self.start_iteration = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.start_time = time.perf_counter()
        self.start_iteration = pl_module.iteration

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # Time spent paused from the live viewer (viewer.TrainingViewer) is not training time.
        seconds = time.perf_counter() - self.start_time - getattr(pl_module, "paused_seconds", 0.0)
        rows = write_particles(pl_module, self.out_dir, self.cfg)  # every rank writes its own particles
        if not trainer.is_global_zero:
            return
        if self.cfg.output.turntable_frames > 0:
            frames = pl_module.render_preview(self.cfg.output.turntable_frames, particle=0)
            save_gif(frames, self.out_dir / "turntable.gif", upscale=preview_upscale(frames.shape[-1]))
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
        }
        metrics.update(self.extra)
        metrics.update(getattr(pl_module, "final_metrics", lambda: {})())
        atomic_write_bytes(self.out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
