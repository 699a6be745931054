"""Time render() forward+backward for a few (N Gaussians, C cameras, resolution) settings; JSON out.

    python benchmarks/render.py --out render.json            # CPU, torch backend
    python benchmarks/render.py --device cuda --backend gsplat

Each setting: one warm-up call, then the median of ``--repeats`` timed forward+backward passes
(the loss is mean(rgb²) + mean(alpha)). Times are wall-clock; on CUDA the device is synchronised.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recdreamer_gs.cameras import sample_cameras
from recdreamer_gs.config import CameraConfig, GaussiansConfig
from recdreamer_gs.gaussians import Gaussians
from recdreamer_gs.render import render

DEFAULT_SETTINGS = ["512x4x64", "2048x4x64", "8192x4x64", "2048x1x128", "2048x4x128"]


def parse_setting(text: str) -> tuple[int, int, int]:
    """``"NxCxR"`` -> (gaussians, cameras, resolution)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected a setting like 2048x4x64 (N x cameras x resolution), got {text!r}")
    n, c, r = (int(p) for p in parts)
    return n, c, r


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_setting(n: int, c: int, res: int, backend: str, device: torch.device, repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    gaussians = Gaussians.create(GaussiansConfig(num_init=n), gen).to(device)
    cameras = sample_cameras(CameraConfig(resolution=res), c, gen).to(device)
    background = torch.rand(c, 3, generator=gen).to(device)

    def step() -> tuple[float, float, float]:
        for p in gaussians.parameters():
            p.grad = None
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = render(gaussians, cameras, background, backend=backend)
        _sync(device)
        t1 = time.perf_counter()
        (out.rgb.square().mean() + out.alpha.mean()).backward()
        _sync(device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, time.process_time() - c0

    step()  # warm-up
    fwd, bwd, cpu = zip(*(step() for _ in range(repeats)))
    total = [f + b for f, b in zip(fwd, bwd)]
    return {
        "gaussians": n, "cameras": c, "resolution": res, "backend": backend,
        "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
        "total_s": statistics.median(total), "total_min_s": min(total),
        "process_cpu_s": statistics.median(cpu),  # CPU time of all threads (less noisy on a shared machine)
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", type=parse_setting, help=f"NxCxR settings (default {DEFAULT_SETTINGS})")
    parser.add_argument("--backend", choices=["auto", "gsplat", "torch"], default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="-", help="JSON file to write ('-': stdout)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = args.settings or [parse_setting(s) for s in DEFAULT_SETTINGS]
    results = []
    for n, c, res in settings:
        results.append(time_setting(n, c, res, args.backend, device, args.repeats, args.seed))
        print(json.dumps(results[-1]), file=sys.stderr)
    report = {
        "benchmark": "render forward+backward",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
