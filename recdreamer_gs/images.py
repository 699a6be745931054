"""Image files from renders: grids, PNG, GIF and MP4 (written atomically), and the orbit of a model
(``recdreamer-gs render``); the previews of a run, the CLI and the README assets use them."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from recdreamer_gs.cameras import orbit
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import atomic_path, atomic_write_bytes
from recdreamer_gs.render import render


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


@torch.no_grad()
def write_orbit(gaussians: Any, out_dir: Path, views: int = 8, frames: int = 36, resolution: int = 128,
                elevation: float = 15.0, radius: float = 2.5, fovy: float = 40.0, video: bool = False) -> list[Path]:
    """``recdreamer-gs render``: orbit.png (a grid of ``views``), orbit.gif of ``frames`` (and orbit.mp4 with
    ``video``) of a ``Gaussians`` on white; returns the files written."""
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
