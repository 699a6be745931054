"""Ray's cost for a prompt set: ``recdreamer-gs batch`` against the same runs made by ``recdreamer-gs run`` one
after another, and the wall time of the set with one and with two workers.

    python benchmarks/batch.py                       # 4 runs of 500 iterations (preview preset, synthetic prior)
    python benchmarks/batch.py --runs 2 --steps 100  # a quick look

Each variant runs in a fresh output folder; the batches run a local Ray instance (inside ``unshare -n`` with only
``lo`` when run as root, as the tests do, so nothing leaves the machine). Results: benchmarks/results/batch_cpu.json.
Overhead per run = (batch wall with one worker - the sequential runs' wall) / runs, against one sequential run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "recdreamer_gs.cli"]


def settings(steps: int) -> list[str]:
    return ["--set", f"train.steps={steps}", "--set", "prior.kind=synthetic", "--set", "train.device=cpu"]


def timed(argv: list[str], env: dict, netns: bool) -> float:
    if netns:
        argv = ["unshare", "-n", "sh", "-c", "ip link set lo up && exec \"$@\"", "sh", *argv]
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall


def run_metrics(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    record = folder / "batch.json"
    task = json.loads(record.read_text())["attempts"][-1]["wall_s"] if record.is_file() else None
    phases = sum(v for k, v in m["timings"].items() if k != "compile_s")
    return {"gaussians": m["gaussians"], "ms_per_iteration": m["ms_per_iteration"], "phases_s": round(phases, 2),
            "task_wall_s": task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch_cpu.json")
    parser.add_argument("--no-netns", action="store_true", help="run the batches in this network namespace")
    args = parser.parse_args()
    netns = not args.no_netns and os.geteuid() == 0 and shutil.which("unshare") is not None
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    # Ray starts its workers at niceness 15 (its worker_niceness setting) and `run` runs at 0: with anything else
    # busy on the machine the batches would lose CPU that the sequential runs keep, so they run at 0 here too.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_worker_niceness="0",
               RAY_AUTH_TOKEN=os.environ.get("RAY_AUTH_TOKEN", os.urandom(16).hex()))
    prompts = [f"benchmark prompt {i}" for i in range(args.runs)]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    load = [os.getloadavg()[0]]

    # 1. The same runs made by `run`, one after another (each a fresh process, as a shell loop would).
    seq = []
    for i, prompt in enumerate(prompts):
        seq.append(timed(CLI + ["run", prompt, "--out", str(work / "seq" / str(i)), *settings(args.steps)], env,
                         False))
    seq_runs = [run_metrics(next((work / "seq" / str(i)).iterdir())) for i in range(args.runs)]
    load.append(os.getloadavg()[0])

    # 2. The set as a batch with one worker (2 threads: what `run` uses on this machine) and with two (1 thread each).
    batches = {}
    for workers, threads in ((1, os.cpu_count() or 2), (2, max(1, (os.cpu_count() or 2) // 2))):
        out = work / f"batch{workers}"
        wall = timed(CLI + ["batch", str(work / "prompts.txt"), "--out", str(out), "--methods", "usd",
                            "--num-cpus", str(workers * threads), "--cpus-per-run", str(threads),
                            *settings(args.steps)], env, netns)
        runs = [run_metrics(folder) for folder in sorted(out.iterdir()) if (folder / "metrics.json").is_file()]
        batches[workers] = {"workers": workers, "threads_per_run": threads, "wall_s": round(wall, 2), "runs": runs}
        load.append(os.getloadavg()[0])

    seq_total = sum(seq)
    one = batches[1]
    overhead = (one["wall_s"] - seq_total) / args.runs
    in_task = [r["task_wall_s"] - r["phases_s"] for r in one["runs"]]
    result = {
        "machine": {"cpus": os.cpu_count(), "load_average_1min": [round(x, 2) for x in load]},
        "settings": {"runs": args.runs, "steps": args.steps, "preset": "preview", "prior": "synthetic",
                     "netns": netns},
        "sequential_run": {"wall_s": [round(w, 2) for w in seq], "total_s": round(seq_total, 2), "runs": seq_runs},
        "batch_1_worker": one,
        "batch_2_workers": batches[2],
        "overhead_per_run_s": round(overhead, 2),
        "overhead_pct_of_run": round(100 * overhead / (seq_total / args.runs), 2),
        "in_task_overhead_s": [round(x, 2) for x in in_task],
        "two_workers_speedup": round(one["wall_s"] / batches[2]["wall_s"], 3),
        "same_gaussians": [r["gaussians"] for r in seq_runs] == [r["gaussians"] for r in one["runs"]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
