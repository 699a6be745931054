"""The run folder: its name and creation, what ``--resume`` reads from it, and what a stopped run kept there."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

from recdreamer_gs.config import ConfigError, RunConfig, config_from_data, read_yaml
from recdreamer_gs.errors import RunError, os_remedy
from recdreamer_gs.outputs import OUTPUTS
from recdreamer_gs.ranks import RUN_DIR_ENV, is_secondary_rank

BATCH_FILE = "batch.json"  # in a run folder: the batch's record of its attempts (status, cause, wall time)


def slugify(prompt: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return (slug[:limit].rstrip("-") or "run")


def make_run_dir(root: Path, prompt: str) -> Path:
    """``root/<slug>-<YYYYmmdd-HHMMSS>``, created fresh (never reuses an existing folder).

    The processes that a data-parallel launcher starts for ranks above 0 reuse rank 0's folder.
    """
    if is_secondary_rank() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{slugify(prompt)}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    try:
        path.mkdir(parents=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"--out {root}: cannot create the run folder there ({err.strerror or err}); "
                       "choose a writable folder") from None
    os.environ[RUN_DIR_ENV] = str(path)  # inherited by data-parallel ranks started later
    return path


def read_resume(out_dir: Path) -> tuple[RunConfig, dict]:
    """The resolved config and last checkpoint of an earlier run folder (``run --resume OUTDIR``)."""
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.ckpt"
    if not (out_dir / "config.yaml").is_file() or not ckpt_path.is_file():
        raise RunError(f"--resume {out_dir}: expected a run folder with config.yaml and checkpoints/last.ckpt")
    cfg = config_from_data(read_yaml(out_dir / "config.yaml"))
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise RunError(f"--resume {out_dir}: cannot read {ckpt_path.name} ({err})") from None
    if not isinstance(checkpoint, dict) or "iteration" not in checkpoint:
        raise ConfigError(f"--resume {out_dir}: {ckpt_path.name} is not a recdreamer-gs checkpoint")
    return cfg, checkpoint


def prepare_resume(run_dir: Path, steps: Optional[int] = None, device: Optional[str] = None
                   ) -> tuple[RunConfig, dict, str]:
    """``run --resume RUN_DIR``: its config (``steps``/``device`` applied), last checkpoint, and where it
    continues ("at iteration i of n [of stage k/K]")."""
    cfg, checkpoint = read_resume(run_dir)
    if steps is not None:
        if cfg.stages:
            raise RunError("--steps cannot extend a multi-stage run; edit the stages in its config.yaml instead")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    cfg.validate()
    stage = int(checkpoint.get("stage", 0))
    stage_steps = cfg.stages[stage].steps if cfg.stages else cfg.train.steps
    done = checkpoint["iteration"]
    finished = stage >= len(cfg.stages) - 1 and done >= stage_steps
    if finished and (Path(run_dir) / "metrics.json").is_file():
        raise RunError(f"--resume {run_dir}: the run already finished {done} of {stage_steps} iterations; "
                       f"pass --steps N with N > {done} to extend it")
    where = f" of stage {stage + 1}/{len(cfg.stages)}" if cfg.stages else ""
    # A run whose final files were not all written (no metrics.json, e.g. the disk filled up) writes them now.
    return cfg, checkpoint, f"at iteration {done} of {stage_steps}{where}" + (
        " (training done; writing its files)" if finished else "")


def kept_files(out_dir: Path) -> str:
    """The files of a run folder that ``--resume`` and the viewers use, e.g. ``checkpoints/last.ckpt
    (iteration 40) and model.ply``; empty when there are none."""
    parts = []
    ckpt = out_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        try:  # mmap: only the small entries are read, not the tensors
            saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
            stage = f" of stage {saved['stage'] + 1}" if saved.get("stage") else ""
            parts.append(f"checkpoints/last.ckpt (iteration {saved['iteration']}{stage})")
        except Exception:  # noqa: BLE001 - a foreign or damaged file is still named
            parts.append("checkpoints/last.ckpt")
    suffixes = {o.suffix for o in OUTPUTS if o.kind == "gaussians"}
    parts += sorted(p.name for p in out_dir.glob("model*") if p.suffix in suffixes and p.is_file())
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)


def kept_state(system, out_dir: Path, failed_write: Optional[OSError] = None) -> str:
    """What a stopped run left in its folder and how to go on: the ``--resume`` command, after what to fix first
    when a write failed (e.g. "free some space"), or to start again when no checkpoint was written."""
    failed_write = failed_write or getattr(system, "save_error", None)
    if not out_dir.is_dir():
        return "nothing was kept: the run folder is gone; start the run again"
    fix = os_remedy(failed_write) if failed_write is not None else ""
    then = f"{fix}, then " if fix else ""
    why = ""
    if failed_write is not None and not getattr(system, "saved_on_exception", False):
        why = "nothing more could be written; "
    elif getattr(system, "non_finite", False):
        why = "the Gaussians were no longer finite; "
    files = kept_files(out_dir)
    if (out_dir / "checkpoints" / "last.ckpt").is_file():
        return f"{why}kept {files}; {then}continue with: recdreamer-gs run --resume {out_dir}"
    return f"{why}no checkpoint was written{f' (kept {files})' if files else ''}; {then}start the run again"


def run_state(folder: Path, stages: int = 0) -> str:
    """``done`` / ``resume`` / ``new`` for a run folder; a multi-stage run is done when the metrics.json of its
    last stage is there (every stage writes one)."""
    metrics = folder / "metrics.json"
    if metrics.is_file():
        try:
            stage = json.loads(metrics.read_text()).get("stage")
        except (OSError, ValueError):
            stage = None
        if stages <= 1 or stage == f"{stages}/{stages}":
            return "done"
    if (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "config.yaml").is_file():
        return "resume"
    return "new"


def read_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``batch.json`` (an empty record when there is none or it cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / BATCH_FILE).read_text())
        if isinstance(data, dict) and isinstance(data.get("attempts"), list):
            return data
    except (OSError, ValueError):
        pass
    return {"status": "", "cause": "", "attempts": []}
