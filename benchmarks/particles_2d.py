"""The paper's 2D check (appendix E) on the synthetic prior: pose histograms of SDS, VSD and USD particles.

    python benchmarks/particles_2d.py --out benchmarks/results/particles_2d.json

writes the histograms (per method, mean over seeds, and per seed) as JSON and a PNG bar chart next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recdreamer_gs.distill.toy2d import Toy2DConfig, make_prior, run_particles, tv_from_uniform  # noqa: E402

COLOURS = {"sds": (214, 96, 77), "vsd": (244, 165, 130), "usd": (67, 147, 195)}


def bar_chart(results: dict, classes: tuple[str, ...], path: Path) -> None:
    """Grouped bars: one group per pose class, one bar per method (mean share over seeds)."""
    w, h, pad = 640, 320, 40
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    group = (w - 2 * pad) / len(classes)
    bar = group / (len(results) + 1)
    draw.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    for ci, name in enumerate(classes):
        x0 = pad + ci * group
        draw.text((x0 + group / 3, h - pad + 8), name, fill="black")
        for mi, (method, res) in enumerate(results.items()):
            share = res["histogram"][ci]
            top = h - pad - share * (h - 2 * pad)
            draw.rectangle([x0 + (mi + 0.5) * bar, top, x0 + (mi + 1.5) * bar - 2, h - pad], fill=COLOURS[method])
    for mi, method in enumerate(results):
        draw.rectangle([w - 150, 10 + 16 * mi, w - 140, 20 + 16 * mi], fill=COLOURS[method])
        draw.text((w - 134, 8 + 16 * mi), f"{method} TV {results[method]['tv_from_uniform']:.2f}", fill="black")
    image.save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/particles_2d.json"))
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--methods", default="sds,vsd,usd")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # small tensors: one thread is fastest and immune to a busy machine
    cfg = Toy2DConfig(particles=args.particles, iterations=args.iterations)
    prior = make_prior(cfg)
    results: dict = {}
    for method in args.methods.split(","):
        start = time.perf_counter()
        hists = [run_particles(method, seed, cfg, prior)[1] for seed in range(args.seeds)]
        mean = torch.stack(hists).mean(0)
        results[method] = {
            "histogram": [round(v, 4) for v in mean.tolist()],
            "front_share": round(mean[0].item(), 4),
            "tv_from_uniform": round(sum(tv_from_uniform(h) for h in hists) / len(hists), 4),
            "per_seed": [[round(v, 4) for v in h.tolist()] for h in hists],
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(method, results[method]["histogram"], "TV", results[method]["tv_from_uniform"], flush=True)
    report = {
        "classes": list(prior.class_names),
        "prior_class_shares": [round(v, 4) for v in prior.class_prior().tolist()],
        "config": vars(cfg) | {"seeds": args.seeds},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    bar_chart(results, tuple(prior.class_names), args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
