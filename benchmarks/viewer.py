"""What the live viewer costs a run: ms/iteration of ``recdreamer-gs run`` with and without ``--viewer``,
and the time one push of N Gaussians takes on the training thread.

    python benchmarks/viewer.py --out benchmarks/results/viewer_cpu.json [--repeats 2] [--steps N] [--page]
                                [--threads 1] [--parts cli,push,in_process]

The runs are the CLI's own (subprocesses, the default preset unless --steps), alternating with and without
the viewer so that a busy machine slows both alike; ms/iteration comes from each run's metrics.json.
``--page`` adds runs with a page connected that reads everything the server sends (what a browser costs).
The viewer's own timing of its pushes in one more run (in process) gives the share of the loop they take.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a kangaroo wearing boxing gloves"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_page(port: int, stop: threading.Event, stats: dict) -> None:
    """A page that connects as soon as the server is up and reads every frame."""
    import viser
    from websockets.sync.client import connect

    while not stop.is_set():
        try:
            ws = connect(f"ws://127.0.0.1:{port}", subprotocols=[f"viser-v{viser.__version__}"], max_size=None)
            break
        except OSError:
            time.sleep(0.2)
    else:
        return
    with ws:
        while not stop.is_set():
            try:
                raw = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - the run ended and closed the connection
                return
            stats["frames"] = stats.get("frames", 0) + 1
            stats["bytes"] = stats.get("bytes", 0) + len(raw)


def cli_run(mode: str, steps: int | None, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "recdreamer_gs.cli", "run", PROMPT, "--out", out]
        if steps:
            cmd += ["--steps", str(steps)]
        port = free_port()
        if mode != "off":
            cmd += ["--viewer", "--port", str(port)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        stop, page = threading.Event(), {}
        reader = threading.Thread(target=read_page, args=(port, stop, page), daemon=True)
        if mode == "page":
            reader.start()
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        stop.set()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        (metrics_path,) = Path(out).glob("*/metrics.json")
        metrics = json.loads(metrics_path.read_text())
    result = {"mode": mode, "ms_per_iteration": metrics["ms_per_iteration"], "iterations": metrics["iterations"],
              "gaussians": metrics["gaussians"], "wall_seconds": round(wall, 1)}
    if mode == "page":
        result["page_frames"], result["page_mib"] = page.get("frames", 0), round(page.get("bytes", 0) / 2**20, 1)
    return result


def push_costs(counts: list[int], repeats: int) -> dict:
    """Seconds per push (conversion + hand-over to viser) on this thread, with no page connected."""
    import torch

    from recdreamer_gs.config import GaussiansConfig
    from recdreamer_gs.gaussians import Gaussians
    from recdreamer_gs.viewer import Viewer, splats_from_params

    viewer = Viewer(0)
    out = {}
    try:
        for n in counts:
            g = Gaussians.create(GaussiansConfig(num_init=n), torch.Generator().manual_seed(0))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                viewer.show([splats_from_params(g.params)], ["model"])
                times.append(time.perf_counter() - start)
            out[str(n)] = {"median_ms": round(1000 * statistics.median(times), 2),
                           "min_ms": round(1000 * min(times), 2)}
    finally:
        viewer.stop()
    return out


def in_process_share(steps: int | None) -> dict:
    """The default run once more, in this process with the viewer's callback, which times its own pushes:
    the share of the training time they took (robust where run-to-run noise hides a few percent)."""
    import torch

    from recdreamer_gs import prior_choice, run_folder, training
    from recdreamer_gs.config import load_config
    from recdreamer_gs.live_viewer import TrainingViewer
    from recdreamer_gs.viewer import Viewer

    flags: dict = {"prompt": PROMPT, "train": {"device": "cpu", "progress_bar": False}}
    if steps:
        flags["train"]["steps"] = steps
    cfg = load_config("preview", None, [flags])
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as out:
        out_dir = run_folder.make_run_dir(Path(out), cfg.prompt)
        viewer = Viewer(0)
        try:
            live = TrainingViewer(viewer, cfg, out_dir)
            training.fit(cfg, out_dir, prior_choice.build_prior(cfg, device), device, extra_callbacks=[live])
        finally:
            viewer.stop()
        metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"pushes": live.pushes, "push_seconds": round(live.push_seconds, 3),
            "train_seconds": metrics["train_seconds"], "ms_per_push": round(1000 * live.push_seconds / live.pushes, 2),
            "share_percent": round(100 * live.push_seconds / metrics["train_seconds"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="iterations (default: the preset's)")
    parser.add_argument("--page", action="store_true", help="also runs with a connected page")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--push-counts", default="3000,100000,500000")
    parser.add_argument("--parts", default="cli,push,in_process", help="any of cli, push, in_process")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the in-process parts, as the runs' OMP_NUM_THREADS

    parts = set(args.parts.split(","))
    # Parts measured on another call are kept (the CLI runs take long on a small machine).
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update({"command": f'recdreamer-gs run "{PROMPT}"' + (f" --steps {args.steps}" if args.steps else ""),
                   "omp_num_threads": args.threads, "cpu_count": os.cpu_count(),
                   "throttle": "a push every max(0.5 s, push time / 0.02)"})
    if "cli" in parts:
        modes = ["off", "viewer"] + (["page"] if args.page else [])
        runs = []
        for r in range(args.repeats):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                runs.append(cli_run(mode, args.steps, args.threads))
                print(json.dumps(runs[-1]), flush=True)
        summary = {}
        for mode in modes:
            values = [x["ms_per_iteration"] for x in runs if x["mode"] == mode]
            summary[mode] = {"median_ms_per_iteration": statistics.median(values), "values": values}
        base = summary["off"]["median_ms_per_iteration"]
        for mode in modes[1:]:
            summary[mode]["overhead_percent"] = round(100 * (summary[mode]["median_ms_per_iteration"] / base - 1), 2)
        result.update({"load_average": os.getloadavg(), "runs": runs, "summary": summary})
    if "push" in parts:
        result["push_ms"] = push_costs([int(n) for n in args.push_counts.split(",")], repeats=5)
    if "in_process" in parts:
        result["in_process"] = in_process_share(args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
