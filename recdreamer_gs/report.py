"""``report.png``: the training curves of a run folder, from its ``logs/`` CSV files.

Panels: the distillation and LoRA losses, the VSD/SDS and rectifier gradient norms, t, the Gaussian
count, the rectifier's pose EMA p̄_t(c) of every time interval over the iterations (one panel per pose
class, one line per interval), and the final pose histogram (from ``metrics.json`` when the run
finished, else the last logged batch). Works on unfinished runs and on multi-stage runs, whose stages
log to ``logs/<stage>/`` and are drawn one after the other. Drawn with matplotlib's Agg canvas (no
display, no global pyplot state).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from recdreamer_gs.errors import UserError
from recdreamer_gs.export import atomic_write_bytes


class ReportError(UserError, ValueError):
    """The folder is not a run folder (no config.yaml and no logs/)."""


@dataclass
class StageLog:
    name: str  # the stage name ("" for a single-stage run)
    columns: dict[str, np.ndarray]  # logged key -> values per row (NaN where the row lacks it)
    iteration: np.ndarray  # the run's iteration of each row (stages placed one after another)


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a Lightning CSV log as float arrays (NaN for empty cells); rows of the same step (Lightning's
    and the pose-EMA callback's) are merged into one."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    keys = [k for k in rows[0] if k is not None]

    def number(text: Optional[str]) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    merged: dict[object, dict[str, float]] = {}
    for i, row in enumerate(rows):
        values = {k: number(row.get(k)) for k in keys}
        step = values.get("step", math.nan)
        target = merged.setdefault(step if math.isfinite(step) else ("row", i), {k: math.nan for k in keys})
        target.update({k: v for k, v in values.items() if math.isfinite(v)})
    return {k: np.array([m[k] for m in merged.values()]) for k in keys}


def stage_order(run_dir: Path) -> list[str]:
    """Stage names in run order from ``config.yaml`` ([""] for a single-stage run)."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return [""]
    stages = cfg.get("stages") or []
    return [str(s.get("name", "")) for s in stages if isinstance(s, dict)] or [""]


def read_logs(run_dir: str | Path) -> list[StageLog]:
    """Every stage's log of a run folder, in run order, on one iteration axis."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "logs").is_dir():
        raise ReportError(f"{run_dir}: not a run folder (expected config.yaml or logs/ in it)")
    files = {"": run_dir / "logs" / "metrics.csv"}
    files.update({p.parent.name: p for p in sorted((run_dir / "logs").glob("*/metrics.csv"))})
    order = stage_order(run_dir)
    names = [n for n in order if n in files] + [n for n in files if n not in order]
    logs, offset = [], 0.0
    for name in names:
        if not files[name].is_file():
            continue
        columns = read_csv(files[name])
        if not columns:
            continue
        # Lightning's "step" counts training batches, i.e. this stage's iterations (the system's own
        # counter; not trainer.global_step, which counts optimizer steps).
        step = columns.get("step", np.arange(len(next(iter(columns.values())))))
        logs.append(StageLog(name, columns, offset + step + 1))
        offset = float(np.nanmax(logs[-1].iteration))
    return logs


def _series(logs: list[StageLog], key: str) -> tuple[np.ndarray, np.ndarray]:
    """The logged values of ``key`` over the iterations; a NaN between stages breaks the plotted line."""
    xs, ys = [], []
    for s in logs:
        if key in s.columns:
            keep = np.isfinite(s.columns[key])
            xs += [s.iteration[keep], [np.nan]]
            ys += [s.columns[key][keep], [np.nan]]
    if not xs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(xs[:-1]), np.concatenate(ys[:-1])


def _keys(logs: list[StageLog], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for s in logs:
        for k in s.columns:
            if k.startswith(prefix):
                seen[k] = None
    return list(seen)


def _plot(ax, logs: list[StageLog], keys: list[str], title: str, log_y: bool = False) -> None:
    """Lines of ``keys``; a term that is zero throughout (e.g. the LoRA loss with the kernel ε_φ) is
    named in the title instead of drawn, so that the others can share a log scale."""
    drawn, zero, values = False, [], [np.zeros(0)]
    for key in keys:
        x, y = _series(logs, key)
        name = key.split("/")[-1]
        if len(x) and np.all(np.nan_to_num(y) == 0):
            zero.append(name)
        elif len(x):
            ax.plot(x, y, lw=1.0, label=name)
            values.append(y[np.isfinite(y)])
            drawn = True
    if drawn and log_y and (np.concatenate(values) > 0).all():
        ax.set_yscale("log")
    if drawn and len(keys) - len(zero) > 1:
        ax.legend(fontsize=7, loc="best")
    _finish(ax, logs, title + (f" ({', '.join(zero)}: 0)" if zero else ""), drawn)


def _finish(ax, logs: list[StageLog], title: str, drawn: bool) -> None:
    # y given: matplotlib would otherwise measure every tick label at each draw to lift the title over labels on
    # the top side, which these axes do not have (same picture, 8% less drawing time)
    ax.set_title(title, fontsize=9, y=1.0)
    ax.tick_params(labelsize=7)
    if not drawn:
        ax.text(0.5, 0.5, "not logged (yet)", ha="center", va="center", transform=ax.transAxes, fontsize=8,
                color="0.5")
        return
    ax.set_xlabel("iteration", fontsize=8)
    for s in logs[1:]:  # stage boundaries
        ax.axvline(float(np.nanmin(s.iteration)), color="0.6", ls=":", lw=0.8)
    ax.grid(alpha=0.3)


def pose_ema_keys(logs: list[StageLog]) -> dict[str, list[tuple[str, str]]]:
    """``pose_ema/<interval>/<class>`` columns grouped by class: class -> [(interval, key)] in t order."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in _keys(logs, "pose_ema/"):
        _, interval, name = key.split("/", 2)
        groups.setdefault(name, []).append((interval, key))
    return {name: sorted(items) for name, items in groups.items()}


def final_histogram(run_dir: Path, logs: list[StageLog]) -> tuple[dict[str, float], str]:
    """The pose histogram of ``metrics.json`` (finished run), else the last logged batch's mean pose."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    if isinstance(metrics.get("pose_histogram"), dict):
        title = "final pose histogram"
        if metrics.get("pEnt") is not None:
            title += f", pEnt {metrics['pEnt']:.3f}"
        return {k: float(v) for k, v in metrics["pose_histogram"].items()}, title
    last = {}
    for key in _keys(logs, "pose/"):
        _, y = _series(logs, key)
        y = y[np.isfinite(y)]
        if len(y):
            last[key.split("/", 1)[1]] = float(y[-1])
    return last, "pose, last logged batch"


def draw_report(run_dir: str | Path):
    """The report figure (matplotlib ``Figure``) of a run folder."""
    from matplotlib import cm  # heavy: matplotlib loads only when needed
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    logs = read_logs(run_dir)
    ema = pose_ema_keys(logs)
    n_cols = max(4, len(ema) + 1)
    fig = Figure(figsize=(3.2 * n_cols, 6.4), dpi=90)
    # Fixed margins, wide enough for the tick labels of a log axis: a layout engine would measure every label
    # first, which took half of the report's time (0.3 of 0.6-0.9 s at the end of every run).
    grid = fig.add_gridspec(2, n_cols, left=0.065, right=0.99, bottom=0.075, top=0.9, wspace=0.35, hspace=0.38)
    top = [fig.add_subplot(grid[0, i]) for i in range(4)]
    _plot(top[0], logs, [k for k in _keys(logs, "loss/")], "losses", log_y=True)
    _plot(top[1], logs, [k for k in _keys(logs, "grad/") if k.endswith("_norm")], "gradient norms", log_y=True)
    _plot(top[2], logs, ["t"], "diffusion time t")
    _plot(top[3], logs, ["gaussians/count"], "Gaussians")

    colours = cm.viridis(np.linspace(0.0, 0.9, max(len(v) for v in ema.values()))) if ema else []
    # One y scale for every class panel, with room above the highest line (at least up to 0.5).
    highest = max([float(np.nanmax(_series(logs, k)[1], initial=0.0)) for v in ema.values() for _, k in v] or [0.0])
    top = min(1.0, max(0.5, 1.15 * highest))
    for i, (name, items) in enumerate(ema.items()):
        ax = fig.add_subplot(grid[1, i])
        for (interval, key), colour in zip(items, colours):
            x, y = _series(logs, key)
            ax.plot(x, y, lw=0.9, color=colour, label=interval)
        ax.axhline(1.0 / len(ema), color="k", ls="--", lw=0.8)  # the uniform target of the rectifier
        ax.set_ylim(0.0, top)
        if i == 0:
            ax.legend(fontsize=6, loc="upper right", ncol=2, title="interval (low t → high t)",
                      title_fontsize=6)
        _finish(ax, logs, f"pose EMA p̄_t({name}) per t interval", True)
    if not ema:
        ax = fig.add_subplot(grid[1, 0:n_cols - 1])
        _finish(ax, logs, "pose EMA per t interval (USD runs)", False)

    hist, title = final_histogram(run_dir, logs)
    ax = fig.add_subplot(grid[1, n_cols - 1])
    if hist:
        ax.bar(list(hist), list(hist.values()), color="tab:blue")
        ax.axhline(1.0 / len(hist), color="k", ls="--", lw=0.8)
        ax.set_ylim(0.0, 1.0)
        ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=9, y=1.0)
    else:
        _finish(ax, logs, "pose histogram", False)
    stages = [s.name for s in logs if s.name]
    fig.suptitle(f"{run_dir.name}" + (f"  (stages: {' → '.join(stages)})" if stages else ""), fontsize=10)
    return fig


def write_report(run_dir: str | Path, path: Optional[str | Path] = None) -> Path:
    """Draw the report of ``run_dir`` and write it (atomically) to ``path``, default ``run_dir/report.png``."""
    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / "report.png"
    buffer = io.BytesIO()
    draw_report(run_dir).savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path
