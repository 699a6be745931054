"""summary.py: summary.csv, summary.md (per-run rows, per-method means) and sheet.png from run folders alone."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from recdreamer_gs.config import load_config, parse_override, to_dict
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import write_ply
from recdreamer_gs.gaussians import Gaussians
from recdreamer_gs.summary import collect, method_means, write_summary


def make_run(out: Path, name: str, prompt: str, method: str, seed: int, metrics=None, record=None,
             stages: bool = False) -> Path:
    """A run folder as `run`/`batch` leave it: config.yaml, and metrics.json + model.ply when finished."""
    folder = out / name
    folder.mkdir(parents=True)
    sets = [f"prompt={prompt}", f"train.seed={seed}", "gaussians.num_init=300"]
    cfg = load_config("paper" if stages else "synthetic",
                      overrides=[parse_override(s) for s in sets + ([] if stages else [f"distill.method={method}"])])
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
        g = Gaussians.create(cfg.gaussians, torch.Generator().manual_seed(seed))
        write_ply(folder / "model.ply", {k: v.detach() for k, v in g.params.items()})
    if record is not None:
        (folder / "batch.json").write_text(json.dumps(record))
    return folder


def metrics(pent, cent, clip, ms, stage=None):
    out = {"pEnt": pent, "cEnt": cent, "clip_score": clip, "gaussians": 300, "iterations": 30, "ms_per_iteration": ms,
           "timings": {"load_s": 1.0, "train_s": 3.0, "export_s": 0.5, "compile_s": 0.0}}
    return out | ({"stage": stage} if stage else {})


def attempts(*walls, status="done", cause="", order=0):
    return {"status": status, "cause": cause, "order": order,
            "attempts": [{"attempt": i + 1, "wall_s": w, "status": status} for i, w in enumerate(walls)]}


@pytest.fixture(scope="module")
def set_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("set")
    make_run(out, "cube-usd-s0", "a cube", "usd", 0, metrics(0.9, 0.8, 30.0, 100.0), attempts(4.0, 6.0, order=0))
    make_run(out, "cube-sds-s0", "a cube", "sds", 0, metrics(0.1, 0.5, 32.0, 50.0), attempts(3.0, order=1))
    make_run(out, "ball-usd-s0", "a ball", "usd", 0, metrics(0.7, 0.6, 28.0, 120.0), attempts(5.0, order=2))
    # Failed before it wrote config.yaml (a model that cannot be had): batch.json alone names the run.
    (out / "ball-sds-s0").mkdir()
    (out / "ball-sds-s0" / "batch.json").write_text(json.dumps(
        attempts(0.5, status="failed", cause="Stable Diffusion model x: incomplete folder", order=3)
        | {"prompt": "a ball", "method": "sds", "seed": 0}))
    # A plain `run` folder moved in (no batch.json): listed after the set's runs, wall time from its metrics.
    make_run(out, "zz-plain", "a plain one", "vsd", 3, metrics(0.5, None, None, 80.0))
    # A multi-stage run after its first stage: metrics.json of stage 1/3 is not the end.
    make_run(out, "staged", "a staged one", "usd", 0, metrics(0.4, None, None, 90.0, stage="1/3"),
             attempts(2.0, status="interrupted", cause="stopped", order=4), stages=True)
    (out / "not-a-run").mkdir()
    return out


def test_rows_come_from_the_run_folders(set_dir):
    rows = collect(set_dir)
    assert [r.name for r in rows] == ["cube-usd-s0", "cube-sds-s0", "ball-usd-s0", "ball-sds-s0", "staged",
                                      "zz-plain"]
    by = {r.name: r for r in rows}
    assert by["cube-usd-s0"].wall_s == 10.0 and by["cube-usd-s0"].pEnt == 0.9  # two attempts
    assert by["ball-sds-s0"].status == "failed" and "incomplete folder" in by["ball-sds-s0"].cause
    assert by["zz-plain"].status == "done" and by["zz-plain"].wall_s == 4.5 and by["zz-plain"].seed == 3
    assert by["staged"].status == "interrupted" and by["staged"].method == "usd+sds"
    means = {m["method"]: m for m in method_means(rows)}
    assert list(means) == ["sds", "vsd", "usd", "usd+sds"]  # the paper's order, then the rest
    assert means["usd"]["pEnt"] == pytest.approx(0.8) and means["usd"]["clip_score"] == pytest.approx(29.0)
    assert (means["sds"]["done"], means["sds"]["runs"], means["sds"]["pEnt"]) == (1, 2, 0.1)


def test_write_summary_writes_csv_markdown_and_sheet(set_dir):
    written = write_summary(set_dir, size=32, device="cpu")
    assert [p.name for p in written] == ["summary.csv", "summary.md", "sheet.png"]
    rows = list(csv.DictReader((set_dir / "summary.csv").open()))
    assert len(rows) == 6 and rows[0]["name"] == "cube-usd-s0" and rows[0]["cEnt"] == "0.8"
    assert rows[3]["status"] == "failed" and "incomplete folder" in rows[3]["cause"]
    md = (set_dir / "summary.md").read_text()
    assert "| USD | 0.7000 | 0.8000 | 29.00 | 300 | 110.0 | 7.5 | 2/2 |" in md  # Table 1 form: cEnt, pEnt, CLIP
    assert "| SDS | 0.5000 | 0.1000 | 32.00 |" in md and "1/2 |" in md
    assert "- `ball-sds-s0`: failed: Stable Diffusion model x: incomplete folder" in md
    sheet = Image.open(set_dir / "sheet.png").convert("RGB")
    # Rows (a cube, a ball, a staged one, a plain one) x columns (SDS, VSD, USD, USD+SDS) of three 32-px views.
    assert sheet.size == (200 + 4 * (3 * 32 + 6), 34 + 4 * (32 + 6))
    cell = lambda i, j: sheet.crop((200 + j * 102, 34 + i * 38, 200 + j * 102 + 96, 34 + i * 38 + 32))  # noqa: E731
    assert cell(0, 2).getextrema()[0][0] < 200  # the cube's USD model is drawn (not white)
    assert cell(1, 0).getpixel((2, 2)) == (225, 225, 225)  # the ball's failed SDS run: a grey cell


def test_summary_of_a_folder_without_runs_is_refused(tmp_path):
    with pytest.raises(UserError, match="no run folder"):
        write_summary(tmp_path)
    with pytest.raises(UserError, match="no folder there"):
        write_summary(tmp_path / "missing")
