"""Data parallelism on CPU: two gloo processes, particles split; pooled rectifier statistics agree on both ranks,
per-particle ones stay with their particle."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_two_ranks_split_particles_and_keep_statistics(tmp_path):
    """One two-process launch, two fits in it: pooled statistics, then per-particle ones."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_check.py"), str(tmp_path), "pooled",
                           "per_particle"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for statistics in ("pooled", "per_particle"):
        out = tmp_path / statistics
        r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
        assert r0["particles"] == [0] and r1["particles"] == [1]  # particles split across ranks
        assert r0["iteration"] == r1["iteration"] == 5
        assert int(r0["counts"].sum()) == int(r1["counts"].sum()) == 5
        for r in (r0, r1):
            assert not torch.allclose(r["marginal"], torch.full_like(r["marginal"], 0.25))  # it moved
        if statistics == "pooled":  # averaged over ranks: identical
            assert torch.allclose(r0["marginal"], r1["marginal"], atol=1e-6), statistics
        else:  # each rank's EMA follows its own particle's views only: not averaged with the other rank
            assert not torch.allclose(r0["marginal"], r1["marginal"], atol=1e-4), statistics
        assert (out / "model_0.ply").is_file() and (out / "model_1.ply").is_file()
