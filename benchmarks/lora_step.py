"""What the LoRA step of ε_φ costs against one plain UNet forward + backward at the same batch (issue 9, point 3).

    python benchmarks/lora_step.py --size tiny --device cpu --out lora_tiny.json
    python benchmarks/lora_step.py --size mid --device cpu            # SD 2.1's block structure, narrow
    python benchmarks/lora_step.py --size sd21 --device cuda --dtype fp16

An eager GPU loop at this size is bound by kernel launches and Python, not by arithmetic (about 7 µs per
launch on an H100), so besides times the script counts the aten operators each phase dispatches (forward
and backward, through ``TorchDispatchMode``; view operators, which launch nothing, counted apart) and the
Python function calls it makes (``sys.setprofile``). Operator and call counts depend on the network's
block structure, not on its width: ``mid`` has SD 2.1-base's blocks (the same 128 LoRA projections) at a
width a CPU runs in milliseconds, so its counts are those of the full-size model.

Phases, each at batch ``--batch`` on a fixed random latent:

    unet_fwd_bwd    the frozen UNet's conditional pass with autograd w.r.t. x_t, then backward (the baseline)
    lora_step       ``lora_loss`` + zero_grad + backward + AdamW step, as ``TextTo3DSystem`` runs it
    lora_forward    ``lora_loss`` alone (with autograd)
    lora_backward   its backward alone (the forward runs untimed first)
    adamw_step      the optimizer step alone (gradients from an untimed forward + backward)
    eps_phi         the no-grad ε_φ pass
    unet_cond       the no-grad plain conditional pass (the baseline of ε_φ)

``--compile`` runs the same phases through the compiled passes (``perf.compile``; the plain-UNet baselines
compiled alike) after ``--warmup`` calls, which include compilation and CUDA-graph recording.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recdreamer_gs.cameras import look_at  # noqa: E402
from recdreamer_gs.priors.particle_score import LoRAParticleScore, ParticleScoreConfig  # noqa: E402
from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior, resolve_dtype  # noqa: E402

# UNet configs: SD 2.1-base's (unet/config.json, the fields that shape the network), the same blocks narrow,
# and a tiny two-level one (the test fixture's until 2026-12; results/cpu/lora_tiny_* were measured with it).
SD21 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
MID = dict(SD21, sample_size=16, block_out_channels=(32, 64, 128, 128), attention_head_dim=(1, 2, 4, 4),
           cross_attention_dim=64, norm_num_groups=8)
TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8,
)
SIZES = {"tiny": TINY, "mid": MID, "sd21": SD21}
TINY_VAE = dict(  # the VAE only has to exist; no phase here runs it
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
)


def build(size: str, device: torch.device, dtype: str, seed: int = 0) -> tuple[StableDiffusionPrior, LoRAParticleScore]:
    """A random-weight prior with the UNet of ``size`` and the shared-UNet LoRA ε_φ on it."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch_dtype = resolve_dtype(dtype, device)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    cfg = SIZES[size]
    with device:
        unet = UNet2DConditionModel(**cfg).to(torch_dtype)
        vae = AutoencoderKL(**TINY_VAE).to(torch_dtype)
        text = torch.randn(2, 77, cfg["cross_attention_dim"])
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    prior = StableDiffusionPrior(unet, vae, scheduler.alphas_cumprod, "epsilon", text[:1], text[1:],
                                 name=f"random-{size}", latent_resolution=8 * cfg["sample_size"])
    return prior, LoRAParticleScore.from_prior(prior, ParticleScoreConfig())


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched (forward and backward); views launch no kernel."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if func.is_view or name in ("detach", "view", "_unsafe_view", "alias", "lift_fresh"):
            self.views += 1
        else:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], None]) -> dict:
    counter = OpCounter()
    with counter:
        fn()
    return {"ops": sum(counter.ops.values()), "view_ops": counter.views,
            "top": dict(counter.ops.most_common(12))}


def count_python_calls(fn: Callable[[], None]) -> dict:
    """Python function calls made by ``fn`` (a proxy for interpreter time), the busiest modules first."""
    calls: Counter = Counter()

    def hook(frame, event, arg):
        if event == "call":
            calls[frame.f_code.co_filename] += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    by_package: Counter = Counter()
    for filename, n in calls.items():
        parts = Path(filename).parts
        key = next((p for p in ("peft", "diffusers", "torch", "recdreamer_gs") if p in parts), "other")
        by_package[key] += n
    return {"calls": sum(calls.values()), "by_package": dict(by_package.most_common())}


def time_ms(fn: Callable[[], None], device: torch.device, iters: int, setup: Optional[Callable[[], None]] = None) -> dict:
    times = []
    for _ in range(iters):
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}


def phases(prior: StableDiffusionPrior, ps: LoRAParticleScore, batch: int, seed: int = 0,
           compiler=None) -> dict[str, tuple]:
    """Each phase as (function, untimed setup or None); with ``compiler`` the plain UNet baseline is
    compiled the same way as the passes it is compared with."""
    device = prior.device
    g = torch.Generator().manual_seed(seed)
    h = prior.latent_resolution // 8
    z = torch.randn(batch, 4, h, h, generator=g).to(device)
    t = torch.randint(20, 980, (batch,), generator=g).to(device)
    az = torch.linspace(0.0, 270.0, batch)
    c2w = look_at(az, torch.full_like(az, 15.0), torch.full_like(az, 2.5)).to(device)
    cond = prior.cond_embedding.expand(batch, -1, -1)
    opt = ps.make_optimizer()
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    state: dict = {}

    plain = prior.unet_pred if compiler is None else compiler(prior.unet_pred, "plain UNet")

    def unet_fwd_bwd():
        x = z.clone().requires_grad_(True)
        plain(x, t, cond).square().mean().backward()

    def lora_step():
        loss = ps.lora_loss(z, c2w, generator=noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def lora_forward():
        state["loss"] = ps.lora_loss(z, c2w, generator=noise_gen)

    def lora_backward_setup():
        opt.zero_grad(set_to_none=True)
        lora_forward()

    def lora_backward():
        state.pop("loss").backward()

    def adamw_setup():
        lora_backward_setup()
        lora_backward()

    def adamw_step():
        opt.step()

    def eps_phi():
        with torch.no_grad():
            ps.eps_phi(z, t, c2w)

    def unet_cond():
        with torch.no_grad():
            plain(z, t, cond)

    return {
        "unet_fwd_bwd": (unet_fwd_bwd, None),
        "lora_step": (lora_step, None),
        "lora_forward": (lora_forward, None),
        "lora_backward": (lora_backward, lora_backward_setup),
        "adamw_step": (adamw_step, adamw_setup),
        "eps_phi": (eps_phi, None),
        "unet_cond": (unet_cond, None),
    }


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prior, ps = build(args.size, device, args.dtype, args.seed)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "size": args.size, "dtype": str(prior.dtype).replace("torch.", ""),
        "batch": args.batch, "latent": prior.latent_resolution // 8, "iters": args.iters,
        "lora_layers": len([n for n, _ in prior.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]),
        "compile": args.compile, "phases": {},
    }
    compiler = None
    if args.compile:
        from recdreamer_gs.perf import Compiler

        compiler = Compiler(device, args.mode, backend=args.backend, echo=print)
        prior.compile_passes(compiler)
        ps.compile_passes(compiler)
    names = args.phases.split(",") if args.phases else None
    for name, (fn, setup) in phases(prior, ps, args.batch, args.seed, compiler).items():
        if names and name not in names:
            continue
        for _ in range(args.warmup):
            if setup is not None:
                setup()
            fn()
        entry = time_ms(fn, device, args.iters, setup)
        if compiler is None:
            if setup is not None:
                setup()
            entry.update(count_ops(fn))
            if setup is not None:
                setup()
            entry.update(count_python_calls(fn))
        result["phases"][name] = entry
        print(f"{name:>14}: {entry['median_ms']:9.2f} ms  ops {entry.get('ops', '-'):>6}  "
              f"python calls {entry.get('calls', '-'):>7}", flush=True)
    if compiler is not None:
        result["compile_s"] = round(compiler.seconds, 2)
        compiler.close()
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="mid", choices=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compiled: compile + graph record)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--phases", default="", help="comma list of phases (default: all)")
    parser.add_argument("--compile", action="store_true", help="the compiled callables (perf.compile on)")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode on CUDA (perf.compile_mode)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: plumbing only)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
