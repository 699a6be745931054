"""The results of a prompt set, from its run folders alone: ``summary.csv``, ``summary.md`` and ``sheet.png``.

One row per run folder (prompt, method, seed, status, pEnt, cEnt, CLIP score, Gaussians, iterations,
ms/iteration, wall time) and the per-method means in the form of the paper's Table 1; the contact sheet has
prompts as rows and methods as columns, each cell the front, side and back renders of the run's model.ply.
``recdreamer-gs batch --summary DIR`` rebuilds all three (docs/batch.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from recdreamer_gs.cameras import Cameras, look_at
from recdreamer_gs.config import ConfigError, config_from_data, read_yaml
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import atomic_write_bytes
from recdreamer_gs.gaussians import read_gaussians
from recdreamer_gs.render import render
from recdreamer_gs.run_folder import read_record, run_state

COLUMNS = ("name", "prompt", "method", "seed", "status", "pEnt", "cEnt", "clip_score", "gaussians", "iterations",
           "ms_per_iteration", "wall_s", "cause")
SHEET_VIEWS = (("front", 0.0), ("side", 90.0), ("back", 180.0))  # azimuths (docs/frames.md: 90° sees the left)
METHOD_ORDER = ("sds", "vsd", "usd")  # the paper's Table 1 order


@dataclass
class Row:
    """One run folder as the summary lists it."""

    name: str
    prompt: str
    method: str
    seed: Optional[int]
    status: str  # done | failed | interrupted | running (an attempt that has not ended) | incomplete
    pEnt: Optional[float] = None
    cEnt: Optional[float] = None
    clip_score: Optional[float] = None
    gaussians: Optional[int] = None
    iterations: Optional[int] = None
    ms_per_iteration: Optional[float] = None
    wall_s: Optional[float] = None  # all attempts of the run (batch.json), else the phases of metrics.json
    cause: str = ""  # why it failed (one line)
    order: float = math.inf  # position in the set that made it


def method_label(cfg) -> str:
    """The method a run is listed under: its distillation method, or a multi-stage run's methods in stage order."""
    methods = [d.method for _, _, d in cfg.stage_plan()]
    return "+".join(dict.fromkeys(methods))


def read_run(folder: Path) -> Optional[Row]:
    """The row of a run folder (one with config.yaml, or a batch.json of a run that failed before it wrote one),
    or None for any other folder."""
    record = read_record(folder)
    try:
        cfg = config_from_data(read_yaml(folder / "config.yaml"))
        prompt, method, seed, stages = cfg.prompt, method_label(cfg), cfg.train.seed, len(cfg.stages)
    except ConfigError:
        if "prompt" not in record:
            return None
        prompt, method, seed, stages = record["prompt"], record.get("method", "?"), record.get("seed"), 0
    state = run_state(folder, stages)
    row = Row(folder.name, prompt, method, seed, "done" if state == "done" else record["status"] or "incomplete",
              cause=record["cause"] if state != "done" else "", order=record.get("order", math.inf))
    walls = [a["wall_s"] for a in record["attempts"] if a.get("wall_s") is not None]
    if state == "done":
        metrics = json.loads((folder / "metrics.json").read_text())
        for key in ("pEnt", "cEnt", "clip_score", "gaussians", "iterations", "ms_per_iteration"):
            setattr(row, key, metrics.get(key))
        if not walls:
            walls = [sum(v for k, v in metrics.get("timings", {}).items() if k != "compile_s")]
    row.wall_s = round(sum(walls), 3) if walls else None
    return row


def collect(out: Path) -> list[Row]:
    """Every run folder directly under ``out``, in the order of the set(s) that made them."""
    rows = [row for folder in sorted(Path(out).iterdir()) if folder.is_dir() and (row := read_run(folder))]
    return sorted(rows, key=lambda r: (r.order, r.name))


def methods_of(rows: Sequence[Row]) -> list[str]:
    """The methods in Table 1 order (SDS, VSD, USD), then any other label."""
    found = list(dict.fromkeys(r.method for r in rows))
    return [m for m in METHOD_ORDER if m in found] + [m for m in found if m not in METHOD_ORDER]


def method_means(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per method: the mean of each metric over its finished runs, and how many runs finished."""
    table = []
    for method in methods_of(rows):
        mine = [r for r in rows if r.method == method]
        done = [r for r in mine if r.status == "done"]
        means: dict[str, Any] = {"method": method, "done": len(done), "runs": len(mine)}
        for key in ("cEnt", "pEnt", "clip_score", "gaussians", "ms_per_iteration", "wall_s"):
            values = [getattr(r, key) for r in done if getattr(r, key) is not None]
            means[key] = sum(values) / len(values) if values else None
        table.append(means)
    return table


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def summary_markdown(rows: Sequence[Row]) -> str:
    """The per-method table (the paper's Table 1 form) and the per-run table, failures with their cause."""
    lines = ["# Prompt set summary", "",
             "## Per method", "",
             "Means over the finished runs, in the form of the paper's Table 1 (FID and uFID are not computed). "
             "cEnt and pEnt are entropies normalised to [0, 1] (1: uniform over the views' poses); the CLIP score "
             "is 100 × the cosine of image and prompt (higher: closer to the prompt; the paper lists the negative "
             "cosine). cEnt and the CLIP score need `output.clip_model`.", "",
             "| Method | cEnt ↑ | pEnt ↑ | CLIP score ↑ | Gaussians | ms/iteration | wall (s) | runs done |",
             "|---|---|---|---|---|---|---|---|"]
    for m in method_means(rows):
        lines.append(f"| {m['method'].upper()} | {_fmt(m['cEnt'])} | {_fmt(m['pEnt'])} | {_fmt(m['clip_score'], 2)} | "
                     f"{_fmt(m['gaussians'], 0)} | {_fmt(m['ms_per_iteration'], 1)} | {_fmt(m['wall_s'], 1)} | "
                     f"{m['done']}/{m['runs']} |")
    lines += ["", "## Runs", "",
              "| prompt | method | seed | status | pEnt | cEnt | CLIP score | Gaussians | iterations | ms/iteration "
              "| wall (s) | folder |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prompt = r.prompt.replace("|", "\\|")
        lines.append(f"| {prompt} | {r.method} | {_fmt(r.seed)} | {r.status} | {_fmt(r.pEnt)} | {_fmt(r.cEnt)} | "
                     f"{_fmt(r.clip_score, 2)} | {_fmt(r.gaussians)} | {_fmt(r.iterations)} | "
                     f"{_fmt(r.ms_per_iteration, 1)} | {_fmt(r.wall_s, 1)} | {r.name} |")
    failed = [r for r in rows if r.status != "done"]
    if failed:
        lines += ["", "## Not done", ""]
        lines += [f"- `{r.name}`: {r.status}{': ' + r.cause if r.cause else ''}" for r in failed]
    return "\n".join(lines) + "\n"


def summary_csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sheet_views(folder: Path, size: int, device: torch.device) -> Optional[Float[Tensor, "3 3 S S"]]:
    """Front, side and back renders (white background, ``size`` pixels) of a run's model.ply (its first particle),
    on the run's preview orbit; None when the folder has no model."""
    ply = next((p for p in (folder / "model.ply", folder / "model_0.ply") if p.is_file()), None)
    if ply is None:
        return None
    cfg = config_from_data(read_yaml(folder / "config.yaml"))
    cam = cfg.camera
    n = len(SHEET_VIEWS)
    azimuth = torch.tensor([a for _, a in SHEET_VIEWS])
    elevation = torch.full((n,), float(cam.preview_elevation))
    radius = torch.full((n,), 0.5 * (cam.radius_range[0] + cam.radius_range[1]))
    fovy = torch.full((n,), math.radians(0.5 * (cam.fovy_range[0] + cam.fovy_range[1])))
    cameras = Cameras(look_at(azimuth, elevation, radius), fovy, size, size, azimuth, elevation)
    gaussians = read_gaussians(ply, cfg.output.ply_frame, device)
    backend = "auto" if device.type == "cuda" else "torch"
    return render(gaussians, cameras.to(device), torch.ones(n, 3, device=device), backend=backend,
                  eps2d=cfg.render.eps2d, near_plane=cfg.render.near_plane).rgb.cpu()


def contact_sheet(out: Path, rows: Sequence[Row], size: int = 96, device: str = "cpu"):
    """Prompts (with their seed) as rows, methods as columns; each cell the front, side and back views."""
    dev = torch.device(device)
    font = ImageFont.load_default()
    methods = methods_of(rows)
    keys = list(dict.fromkeys((r.prompt, r.seed) for r in rows))
    seeds = {seed for _, seed in keys}
    by_key = {(r.prompt, r.seed, r.method): r for r in rows}
    label_w, head_h, pad = 200, 34, 6
    cell_w = size * len(SHEET_VIEWS)
    sheet = Image.new("RGB", (label_w + len(methods) * (cell_w + pad), head_h + len(keys) * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, method in enumerate(methods):
        x = label_w + j * (cell_w + pad)
        draw.text((x, 2), method.upper(), fill="black", font=font)
        for k, (view, _) in enumerate(SHEET_VIEWS):
            draw.text((x + k * size + 2, 18), view, fill=(90, 90, 90), font=font)
    for i, (prompt, seed) in enumerate(keys):
        y = head_h + i * (size + pad)
        label = prompt if len(seeds) == 1 else f"{prompt} (seed {seed})"
        draw.multiline_text((4, y + 2), "\n".join(textwrap.wrap(label, 32)[:6]), fill="black", font=font)
        for j, method in enumerate(methods):
            x = label_w + j * (cell_w + pad)
            row = by_key.get((prompt, seed, method))
            views = sheet_views(out / row.name, size, dev) if row is not None else None
            if views is None:
                draw.rectangle((x, y, x + cell_w - 1, y + size - 1), fill=(225, 225, 225))
                draw.text((x + 4, y + size // 2 - 6), row.status if row is not None else "no run", fill="black",
                          font=font)
                continue
            strip = (torch.cat(list(views), dim=-1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(strip), (x, y))
    return sheet


def write_summary(out: Path, size: int = 96, device: Optional[str] = None) -> list[Path]:
    """``summary.csv``, ``summary.md`` and ``sheet.png`` of the run folders under ``out`` (written atomically).

    Raises:
        UserError: ``out`` is not a folder or holds no run folder.
    """
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"--summary {out}: expected the output folder of a batch, got no folder there")
    rows = collect(out)
    if not rows:
        raise UserError(f"--summary {out}: no run folder (a folder with config.yaml or batch.json) there")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    atomic_write_bytes(out / "summary.csv", summary_csv(rows).encode())
    atomic_write_bytes(out / "summary.md", summary_markdown(rows).encode())
    buffer = io.BytesIO()
    contact_sheet(out, rows, size, device).save(buffer, format="PNG")
    atomic_write_bytes(out / "sheet.png", buffer.getvalue())
    return [out / "summary.csv", out / "summary.md", out / "sheet.png"]
