"""report.png (recdreamer_gs.report): curves from a run folder's CSV logs, finished or not, one or more stages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from recdreamer_gs.cli import app
from recdreamer_gs.report import ReportError, draw_report, pose_ema_keys, read_logs, write_report
from recdreamer_gs.distill.rectifier import PoseStatistics

CLASSES = ("front", "left", "back", "right")


def write_csv(path: Path, rows: list[dict]) -> None:
    """A log as Lightning's CSVLogger writes it: the union of keys as header, empty cells for missing keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def fake_rows(steps: int, method: str = "usd", start_count: int = 2048) -> list[dict]:
    """Rows every 10 iterations, with the pose EMA of a real PoseStatistics that sees 'front' at high t."""
    stats = PoseStatistics(len(CLASSES), n_intervals=10, n_ema=5)
    rows = []
    for step in range(9, steps, 10):
        t = torch.tensor([980 - 90 * (step % 11)])
        stats.update(t, torch.tensor([[0.7, 0.1, 0.1, 0.1]] if t.item() > 500 else [[0.25] * 4]))
        row = {"epoch": 0, "step": step, f"loss/{method}": 100.0 / (step + 1), "loss/lora": 0.5,
               f"grad/{'sds' if method == 'sds' else 'vsd'}_norm": 10.0, "t": float(t), "gaussians/count": start_count + step}
        if method == "usd":
            row.update({"grad/rect_norm": 1.0, **{f"pose/{c}": 0.25 for c in CLASSES}})
            row.update({k: float(v) for k, v in stats.log_dict(CLASSES).items()})
        rows.append(row)
    return rows


def make_run(folder: Path, stages: list[tuple[str, str, int]], finished: bool) -> Path:
    config = {"prompt": "a cat", "stages": [{"name": n, "steps": s, "method": m} for n, m, s in stages if n]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    for name, method, steps in stages:
        write_csv(folder / "logs" / name / "metrics.csv", fake_rows(steps, method))
    if finished:
        histogram = {"front": 0.4, "left": 0.2, "back": 0.2, "right": 0.2}
        (folder / "metrics.json").write_text(json.dumps({"pEnt": 0.96, "pose_histogram": histogram}))
    return folder


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_single_stage_report(tmp_path):
    run = make_run(tmp_path / "run", [("", "usd", 100)], finished=True)
    logs = read_logs(run)
    assert [s.name for s in logs] == [""] and logs[0].iteration.tolist() == list(range(10, 101, 10))
    ema = pose_ema_keys(logs)
    assert list(ema) == sorted(CLASSES) and [i for i, _ in ema["front"]][:2] == ["t000-099", "t100-199"]
    fig = draw_report(run)
    names = titles(fig)
    for expected in ("losses", "gradient norms", "diffusion time t", "Gaussians"):
        assert expected in names
    assert sum("pose EMA" in n for n in names) == len(CLASSES)
    assert any(n.startswith("final pose histogram") and "pEnt 0.960" in n for n in names)
    losses = next(ax for ax in fig.axes if ax.get_title() == "losses")
    assert {line.get_label() for line in losses.get_lines()} == {"usd", "lora"}
    path = write_report(run)
    assert path == run / "report.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 400
    assert not list(run.glob(".*"))


def test_multi_stage_report_in_run_order(tmp_path):
    # config.yaml order, not the alphabetical order of the log folders.
    run = make_run(tmp_path / "run", [("b-usd", "usd", 50), ("a-sds", "sds", 30), ("c-colour", "usd", 40)],
                   finished=False)
    logs = read_logs(run)
    assert [s.name for s in logs] == ["b-usd", "a-sds", "c-colour"]
    starts = [float(s.iteration.min()) for s in logs]
    assert starts == [10.0, 50.0 + 10.0, 50.0 + 30.0 + 10.0]  # stages follow each other on one axis
    fig = draw_report(run)
    gaussians = next(ax for ax in fig.axes if ax.get_title() == "Gaussians")
    x = gaussians.get_lines()[0].get_xdata()
    assert len(x) == 5 + 3 + 4 + 2 and np.isnan(x).sum() == 2  # a gap between stages breaks the line
    assert len([line for line in gaussians.get_lines() if line.get_linestyle() == ":"]) == 2  # stage boundaries
    # Unfinished: the histogram is the last logged batch's.
    assert any("last logged batch" in n for n in titles(fig))
    assert "stages: b-usd → a-sds → c-colour" in fig._suptitle.get_text()


def test_report_of_a_run_that_has_not_logged_yet(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text("prompt: a cat\n")
    write_report(run)
    assert (run / "report.png").is_file()
    fig = draw_report(run)
    assert sum(t.get_text() == "not logged (yet)" for ax in fig.axes for t in ax.texts) >= 4


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ReportError, match="not a run folder"):
        read_logs(tmp_path)


def test_report_command(tmp_path):
    runner = CliRunner()
    run = make_run(tmp_path / "run", [("", "usd", 40)], finished=True)
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.png").is_file() and not (run / "report.png").exists()
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")], catch_exceptions=False)
    assert result.exit_code == 2 and "not a run folder" in " ".join(result.output.split())
    assert "Traceback" not in result.output



def test_a_term_that_is_zero_throughout_is_named_not_drawn(tmp_path):
    rows = fake_rows(50)
    for row in rows:
        row["loss/lora"] = 0.0  # the kernel ε_φ of the synthetic prior has no LoRA
    write_csv(tmp_path / "run" / "logs" / "metrics.csv", rows)
    fig = draw_report(tmp_path / "run")
    losses = next(ax for ax in fig.axes if ax.get_title().startswith("losses"))
    assert losses.get_title() == "losses (lora: 0)" and losses.get_yscale() == "log"
    assert [line.get_label() for line in losses.get_lines()] == ["usd"]


def test_rows_of_one_step_are_merged(tmp_path):
    # Lightning's row and the pose-EMA callback's row of the same step, as CSVLogger writes them.
    rows = [{"step": 9, "t": 500.0}, {"step": 9, "pose_ema/t500-599/front": 0.3}, {"step": 19, "t": 400.0}]
    write_csv(tmp_path / "run" / "logs" / "metrics.csv", rows)
    (log,) = read_logs(tmp_path / "run")
    assert log.iteration.tolist() == [10.0, 20.0] and log.columns["t"].tolist() == [500.0, 400.0]
    assert log.columns["pose_ema/t500-599/front"][0] == 0.3 and np.isnan(log.columns["pose_ema/t500-599/front"][1])
