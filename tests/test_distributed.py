"""Data parallelism on CPU: two gloo processes, particles split, rectifier statistics agree on both ranks."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_two_ranks_share_statistics(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_check.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["particles"] == [0] and r1["particles"] == [1]  # particles split across ranks
    assert r0["iteration"] == r1["iteration"] == 5
    assert int(r0["counts"].sum()) == 5
    assert not torch.allclose(r0["marginal"], torch.full_like(r0["marginal"], 0.25))  # it moved
    assert torch.allclose(r0["marginal"], r1["marginal"], atol=1e-6)  # averaged over ranks: identical
    assert (tmp_path / "model_0.ply").is_file() and (tmp_path / "model_1.ply").is_file()
