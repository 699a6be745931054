"""Peak GPU memory and time per iteration of the real training loop at SD 2.1-base size (random weights).

    python benchmarks/memory.py --out memory.json                          # CUDA, preset standard, USD
    python benchmarks/memory.py --method vsd --set camera.batch_size=8    # other method / overrides
    python benchmarks/memory.py --device cpu --tiny --iters 2 --warmup 0  # smoke run on a CPU

Unlike ``iteration.py`` (parts timed in isolation), this runs :class:`recdreamer_gs.system.TextTo3DSystem`
under a Lightning ``Trainer`` exactly as ``recdreamer-gs run`` does: a preset's :class:`RunConfig` (plus
``--method`` and ``--set key=value`` overrides), a random-weight :class:`StableDiffusionPrior` built from
the SD 2.1-base UNet/VAE configs (fp16 on CUDA), the shared-UNet LoRA ε_φ
(:meth:`LoRAParticleScore.from_prior`, VSD/USD) and, for USD, a pose classifier on a random-weight
DINOv2 ViT-S/14 with registers (fp32, as ``pose/setup.py`` (dino_pose_setup) loads it) with four random templates.
Camera batches come from :class:`recdreamer_gs.data.RandomCameraDataset`. Nothing is downloaded.

Reported (JSON): peak ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over all training
iterations and over the timed ones, memory held before training (weights, Gaussians, templates),
milliseconds per iteration (``on_train_batch_start`` to ``on_train_batch_end``, device synchronised,
warm-up iterations excluded), Gaussian count, render resolution, batch size. On CPU the peak resident
set size stands in for GPU memory.

If the configured renderer fails on its probe call (gsplat not installed, or its CUDA JIT build fails)
``--render-fallback torch`` (the default) switches to the PyTorch compositor (slow at 512², but the
real maths), so everything after rendering is still measured; the JSON field ``render`` says which
renderer ran and why.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):  # the package, and iteration.py beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from iteration import POSE_CLASSES, build_random_classifier, build_random_prior  # noqa: E402

from recdreamer_gs.config import RunConfig, load_config, needs, parse_override  # noqa: E402
from recdreamer_gs.data import RandomCameraDataset, cameras_from_batch  # noqa: E402
from recdreamer_gs.system import TextTo3DSystem  # noqa: E402

GIB = 2**30
TINY_OVERRIDES = ("camera.resolution=64", "gaussians.num_init=512")  # applied before --set ones


class IterationMeter(L.Callback):
    """Milliseconds and peak memory of each training iteration (one ``training_step`` each)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.times_ms: list[float] = []
        self.peak_allocated: list[int] = []  # bytes, per iteration
        self.peak_reserved: list[int] = []
        self.static_allocated = 0  # bytes held when training starts (weights, Gaussians, templates)
        self._t0 = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.static_allocated = torch.cuda.memory_allocated(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.times_ms.append(1e3 * (time.perf_counter() - self._t0))
        if self.cuda:
            self.peak_allocated.append(torch.cuda.max_memory_allocated(self.device))
            self.peak_reserved.append(torch.cuda.max_memory_reserved(self.device))


def build_system(cfg: RunConfig, device: torch.device, tiny: bool, dtype: str, dino_dtype: str,
                 n_augment: int) -> TextTo3DSystem:
    """The system with a random-weight SD prior, LoRA ε_φ (VSD/USD) and pose classifier (USD), as
    ``training.fit`` wires them."""
    from recdreamer_gs.priors.particle_score import LoRAParticleScore

    need = needs(cfg.distill.method)
    prior = build_random_prior(device, dtype, tiny, cfg.train.seed, name="random-sd21base")
    particle_score = LoRAParticleScore.from_prior(prior, cfg.distill.particle_score) if need.particle_score else None
    classifier, class_names = None, ()
    if need.pose_classifier:
        module = build_random_classifier(device, tiny, dino_dtype, n_augment, cfg.train.seed)
        classifier, class_names = (lambda images, background=None: module(images)), POSE_CLASSES
    return TextTo3DSystem(cfg, prior, particle_score, classifier, class_names)


def probe_render(system: TextTo3DSystem, dataset: RandomCameraDataset, device: torch.device) -> Optional[str]:
    """Render one camera batch with the configured backend; the error text if that fails, else None."""
    batch = dataset[0]
    try:
        with torch.no_grad():
            system.render(cameras_from_batch(batch, system.render_resolution).to(device),
                          batch["background"].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - a missing gsplat or a failed JIT build, reported in the JSON
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[-1][:300] if lines else ''}"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = [{"distill": {"method": args.method}}]
    overrides += [parse_override(s) for s in (*(TINY_OVERRIDES if args.tiny else ()), *args.set)]
    if args.resolution:
        overrides.append({"camera": {"resolution": args.resolution}})
    cfg = load_config(args.preset, overrides=overrides)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.manual_seed(cfg.train.seed)

    t0 = time.perf_counter()
    system = build_system(cfg, device, args.tiny, args.dtype or cfg.prior.sd.dtype, args.dino_dtype, args.n_augment)
    system.to(device)
    dataset = RandomCameraDataset(cfg.camera, cfg.train.steps, cfg.train.seed, cfg.render.background)
    render_error = probe_render(system, dataset, device)
    renderer = cfg.render.backend if cfg.render.backend != "auto" else ("gsplat" if device.type == "cuda" else "torch")
    if render_error is not None:
        if args.render_fallback != "torch":
            raise SystemExit(f"render probe failed with backend {renderer!r}: {render_error} "
                             "(use --render-fallback torch to measure with the PyTorch compositor)")
        print(f"NOTICE: {renderer} render failed ({render_error}); measuring with the torch compositor",
              flush=True)
        system.cfg.render.backend = "torch"
        renderer = f"torch ({renderer} failed: {render_error})"
    build_s = time.perf_counter() - t0

    total = args.warmup + args.iters
    meter = IterationMeter(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1, limit_train_batches=total,
        callbacks=[meter], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    trainer.fit(system, train_dataloaders=loader)
    fit_s = time.perf_counter() - t0
    if len(meter.times_ms) != total:
        raise RuntimeError(f"expected {total} training iterations, the trainer ran {len(meter.times_ms)}")

    timed = meter.times_ms[args.warmup:]
    prior = system.prior
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "method": cfg.distill.method,
        "overrides": list(args.set),
        "model": "tiny" if args.tiny else "sd-2.1-base size (random weights)",
        "dtype": str(prior.dtype).replace("torch.", ""),
        "pose_dtype": args.dino_dtype if needs(cfg.distill.method).pose_classifier else None,
        "render": renderer,
        "resolution": system.render_resolution,
        "latent_resolution": prior.latent_resolution // 8,
        "batch_size": cfg.camera.batch_size,
        "rectify_every": cfg.distill.rectifier.rectify_every if needs(cfg.distill.method).rectifier else None,
        "gaussians": len(system.gaussians),
        "iterations": args.iters,
        "warmup": args.warmup,
        "ms_per_iteration": statistics.median(timed) if timed else None,
        "ms_per_iteration_mean": statistics.fmean(timed) if timed else None,
        "ms_all_iterations": [round(t, 2) for t in meter.times_ms],
        "build_s": round(build_s, 2),
        "fit_s": round(fit_s, 2),
        "peak_allocated_gib": None,
        "peak_reserved_gib": None,
        "steady_peak_allocated_gib": None,
        "steady_peak_reserved_gib": None,
        "static_allocated_gib": None,
        # the last iteration's logged terms (a non-zero grad/rect_norm shows the rectifier ran)
        "metrics": {k: round(float(v), 6) for k, v in sorted(system.logged.items())},
    }
    if device.type == "cuda":
        steady_alloc = meter.peak_allocated[args.warmup:] or meter.peak_allocated
        steady_res = meter.peak_reserved[args.warmup:] or meter.peak_reserved
        result.update(
            peak_allocated_gib=max(meter.peak_allocated) / GIB,
            peak_reserved_gib=max(meter.peak_reserved) / GIB,
            steady_peak_allocated_gib=max(steady_alloc) / GIB,
            steady_peak_reserved_gib=max(steady_res) / GIB,
            static_allocated_gib=meter.static_allocated / GIB,
            total_gpu_gib=torch.cuda.get_device_properties(device).total_memory / GIB,
        )
    else:  # ru_maxrss is in KiB on Linux
        result["cpu_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="standard", help="config preset (preview, standard, paper, synthetic)")
    parser.add_argument("--method", default="usd", choices=["sds", "vsd", "usd"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. camera.batch_size=8 (repeatable; applied last)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["auto", "fp16", "bf16", "fp32"],
                        help="UNet/VAE precision (default: the config's prior.sd.dtype, auto = fp16 on CUDA)")
    parser.add_argument("--dino-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="DINOv2 precision of the pose classifier (the pipeline loads it in fp32)")
    parser.add_argument("--n-augment", type=int, default=4, help="augmented copies per template (release: 200)")
    parser.add_argument("--tiny", action="store_true",
                        help="test-fixture-size networks, 64² renders, 512 Gaussians (CPU smoke run)")
    parser.add_argument("--resolution", type=int, default=0, help="render resolution (0: the preset's)")
    parser.add_argument("--iters", type=int, default=5, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=1, help="iterations run first and not timed")
    parser.add_argument("--render-fallback", default="torch", choices=["torch", "error"],
                        help="when the renderer's probe call fails: the torch compositor, or stop")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
