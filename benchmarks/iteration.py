"""Per-iteration time of SDS, VSD and USD at SD 2.1-base size, random weights, split into parts (docs/performance.md).

    python benchmarks/iteration.py --out bench.json                      # CUDA, 512² renders, fp16
    python benchmarks/iteration.py --device cpu --resolution 64 --tiny   # smoke run on a CPU
    python benchmarks/iteration.py --compile --out bench_compiled.json   # networks through torch.compile

No weights are downloaded: the UNet and VAE are built from the SD 2.1-base configs written below with
random weights, and the prompt embeddings are random; the pose classifier is a random-weight DINOv2
ViT-S/14 with registers (the size of ``facebook/dinov2-with-registers-small``) with four random template
images. Parts (each a function of a :class:`Bench`):

    render          gsplat forward + backward of 100k random Gaussians (CUDA only)
    vae_encode      VAE encoder forward + backward to the image (the render's gradient path)
    unet_cfg        the pretrained CFG pass, batch 2, under no_grad (SDS/VSD)
    unet_backward   the same pass with autograd w.r.t. x_t, plus backward (what USD's rectifier needs)
    unet_cond       one plain conditional pass at batch B (the baseline of ε_φ)
    eps_phi         the LoRA + camera ε_φ pass under no_grad (VSD)
    lora_step       LoRA loss forward + backward + AdamW step (VSD)
    usd_unet_cfg    the pretrained CFG pass, batch 2B, with the graph w.r.t. x_t kept (USD step 4; no backward)
    usd_decode      Tweedie x̂0 + VAE decode with the graph kept (USD step 6; no backward)
    pose_classifier pose classifier (DINOv2 + template matching) forward + backward to the decoded image
    rectifier_backward  only the backward of the rectifier objective through classifier, decoder and UNet
                    to z (its forward runs untimed first)

and whole iterations ``sds``, ``vsd``, ``usd`` (rectifier every iteration, shared noise) and ``usd_k4``
(``rectify_every = 4``: each timed call runs 4 iterations, one rectified, and times are divided by 4).
A whole iteration is one call of ``TextTo3DSystem.training_step`` itself (render, encode, the
distillation step of ``distill/step.py``, Gaussian Adam steps, LoRA step), on a system built Trainer-less
around the same networks (:func:`build_system_run`); without gsplat (CPU, --no-render) it renders a few
Gaussians with the torch compositor (``iteration_gaussians`` in the JSON). ``--compile`` routes the
networks' passes through ``torch.compile`` as a run with ``perf.compile=on`` does and reports
``compile_s``. Times are CUDA-event milliseconds after warm-up iterations (wall clock on CPU); peak GPU
memory (allocated and reserved) is measured per part and per iteration. DINOv2 runs in fp32 by default (``--dino-dtype``), as
``pose/setup.py`` (dino_pose_setup) loads it; the decoded image reaches it in fp32 either way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # the package; make_fixtures.py, whose network sizes the --tiny run uses
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import lightning as L  # noqa: E402

from recdreamer_gs.cameras import sample_cameras  # noqa: E402
from recdreamer_gs.config import (  # noqa: E402
    CameraConfig, GaussiansConfig, RectifierConfig, RunConfig, config_from_data, needs)
from recdreamer_gs.data import RandomCameraDataset  # noqa: E402
from recdreamer_gs.distill.rectifier import PoseStatistics, log_r, rectifier_objective  # noqa: E402
from recdreamer_gs.gaussians import Gaussians  # noqa: E402
from recdreamer_gs.pose.classifier import PoseClassifier, PoseClassifierConfig  # noqa: E402
from recdreamer_gs.pose.features import DinoFeatures  # noqa: E402
from recdreamer_gs.priors.diffusion import add_noise, alpha_sigma, tweedie_x0  # noqa: E402
from recdreamer_gs.priors.particle_score import LoRAParticleScore, ParticleScoreConfig  # noqa: E402
from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior  # noqa: E402
from recdreamer_gs.render import render  # noqa: E402
from recdreamer_gs.system import TextTo3DSystem  # noqa: E402
from make_fixtures import TINY_DINOV2, TINY_UNET, TINY_VAE  # noqa: E402 - the --tiny run's networks

# stabilityai/stable-diffusion-2-1-base unet/config.json (the fields that shape the network)
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
# its vae/config.json
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, scaling_factor=0.18215,
)
TEXT_LENGTH = 77
# facebook/dinov2-with-registers-small (ViT-S/14 with 4 registers) config.json, the fields that shape it
DINOV2_SMALL_REG = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14,
    image_size=518, num_register_tokens=4,
)
POSE_CLASSES = ("front", "back", "left", "right")


@dataclass
class Bench:
    """Everything one timed iteration touches; parts read and write only through it."""

    prior: StableDiffusionPrior
    eps_phi: LoRAParticleScore
    lora_opt: torch.optim.Optimizer
    gaussians: Optional[Gaussians]  # None when rendering is skipped (CPU)
    gaussian_opts: dict[str, torch.optim.Optimizer]
    camera_cfg: CameraConfig
    batch: int
    device: torch.device
    generator: torch.Generator  # on the CPU, for cameras
    image: Optional[torch.Tensor] = None  # stand-in render (leaf) when rendering is skipped
    state: dict = field(default_factory=dict)  # scratch (t, noise, c2w) shared by parts
    classifier: Optional[PoseClassifier] = None  # USD's pose classifier (None: USD parts unavailable)
    pose_stats: Optional[PoseStatistics] = None  # USD's EMA pose marginal p̄_t (the parts' log r)


def build_random_prior(
    device: str | torch.device = "cuda", dtype: str = "auto", tiny: bool = False, seed: int = 0,
    name: str = "random-sd21-base",
) -> StableDiffusionPrior:
    """A :class:`StableDiffusionPrior` with random weights at SD 2.1-base size (or test-fixture size):
    UNet and VAE from the configs above, DDPM scaled-linear schedule, random [1, 77, D] text embeddings."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from recdreamer_gs.priors.stable_diffusion import resolve_dtype

    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)  # type: ignore[arg-type]
    diffusers_logging.set_verbosity_error()  # ModelMixin.to() warns about casting random-init models
    torch.manual_seed(seed)
    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if tiny else (SD21_UNET, SD_VAE)
    with dev:  # initialise on the device: random init of 865M parameters on a CPU takes long
        unet = UNet2DConditionModel(**unet_cfg).to(torch_dtype)
        vae = AutoencoderKL(**vae_cfg).to(torch_dtype)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    width = unet_cfg["cross_attention_dim"]
    text = torch.randn(2, TEXT_LENGTH, width, device=dev)
    return StableDiffusionPrior(
        unet, vae, scheduler.alphas_cumprod, "epsilon", text[:1], text[1:], name=name,
        latent_resolution=8 * unet_cfg["sample_size"],
    )


def random_templates(size: int, generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """One template per pose class in [-1, 1]: a randomly coloured, placed and sized disc on a plain
    background (the classifier's PCA mask then finds a foreground, as with real templates)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out: dict[str, list[torch.Tensor]] = {}
    for name in POSE_CLASSES:
        cx, cy = (torch.rand(2, generator=generator) - 0.5) * 0.4
        radius = 0.4 + 0.2 * float(torch.rand(1, generator=generator))
        inside = ((xs - cx) ** 2 + (ys - cy) ** 2 < radius**2).float()
        fg, bg = torch.rand(3, 1, 1, generator=generator), torch.rand(3, 1, 1, generator=generator)
        out[name] = [(inside * fg + (1 - inside) * bg) * 2 - 1]
    return out


def build_random_classifier(
    device: str | torch.device = "cuda", tiny: bool = False, dtype: str = "fp32", n_augment: int = 4,
    seed: int = 0,
) -> PoseClassifier:
    """The USD pose classifier with a random-weight DINOv2 ViT-S/14-with-registers (or the fixture-size
    model) and four random templates; ``n_augment`` copies per template keep the build quick.

    Tiny: 112² DINOv2 input (8x8 patches), an 8x8 feature grid and 64² templates; otherwise the
    release's 560 / 16 / 256.
    """
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    dev = torch.device(device)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(seed)
    with dev:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**(TINY_DINOV2 if tiny else DINOV2_SMALL_REG)))
    model = model.to(torch_dtype)
    sizes = dict(input_size=112, grid_size=8) if tiny else {}
    features = DinoFeatures(model, name="random-dinov2-with-registers-small", **sizes)
    cfg = PoseClassifierConfig(classes=POSE_CLASSES, n_augment=n_augment, augment_batch=max(n_augment, 1),
                               template_size=64 if tiny else 256, **sizes)
    generator = torch.Generator().manual_seed(seed)
    templates = random_templates(cfg.template_size, generator)
    return PoseClassifier.from_templates(features, templates, cfg, generator).to(dev)


def build_bench(
    device: str = "cuda", dtype: str = "auto", tiny: bool = False, resolution: int = 512,
    num_gaussians: int = 100_000, batch: int = 1, seed: int = 0, pose: bool = True,
    dino_dtype: str = "fp32", n_augment: int = 4,
) -> Bench:
    """Random-weight SD 2.1-base-size prior (or tiny), shared-UNet LoRA ε_φ, random Gaussians and,
    with ``pose``, the random-weight DINOv2 pose classifier and fresh pose statistics (USD)."""
    dev = torch.device(device)
    prior = build_random_prior(dev, dtype, tiny, seed)
    eps_phi = LoRAParticleScore.from_prior(prior, ParticleScoreConfig())
    camera_cfg = CameraConfig(batch_size=batch, resolution=resolution, elevation_range=(0.0, 30.0))
    generator = torch.Generator().manual_seed(seed)
    gaussians, opts, image = None, {}, None
    if dev.type == "cuda":
        gaussians = Gaussians.create(GaussiansConfig(num_init=num_gaussians), generator).to(dev)
        opts = gaussians.make_optimizers()
    else:  # the torch compositor would dominate; stand in a leaf image with a gradient
        image = torch.rand(batch, 3, resolution, resolution, generator=generator).requires_grad_(True)
    classifier = stats = None
    if pose:
        classifier = build_random_classifier(dev, tiny, dino_dtype, n_augment, seed)
        rect = RectifierConfig()
        stats = PoseStatistics(len(POSE_CLASSES), rect.n_intervals, rect.n_ema, prior.num_train_timesteps, dev)
    return Bench(prior, eps_phi, eps_phi.make_optimizer(), gaussians, opts, camera_cfg, batch, dev, generator,
                 image, classifier=classifier, pose_stats=stats)


# ---- parts -----------------------------------------------------------------------------------


def _render(b: Bench) -> torch.Tensor:
    if b.gaussians is None:
        return b.image
    cams = sample_cameras(b.camera_cfg, b.batch, b.generator)
    b.state["c2w"] = cams.c2w.to(b.device)
    background = torch.rand(b.batch, 3, generator=b.generator).to(b.device)
    return render(b.gaussians, cams, background).rgb


def _c2w(b: Bench) -> torch.Tensor:
    if "c2w" not in b.state:
        b.state["c2w"] = sample_cameras(b.camera_cfg, b.batch, b.generator).c2w.to(b.device)
    return b.state["c2w"]


def _noisy(b: Bench, z: torch.Tensor):
    t = torch.randint(20, 980, (b.batch,), device=b.device)
    alpha, sigma = alpha_sigma(b.prior.alphas_cumprod, t)
    return add_noise(z, torch.randn_like(z), alpha, sigma), t, sigma


def _z(b: Bench) -> torch.Tensor:
    """A fixed random latent batch [B, 4, h, w] for the parts that start after the encoder."""
    if "z" not in b.state:  # drawn once, outside every timed call
        h = b.prior.latent_resolution // 8
        b.state["z"] = torch.randn(b.batch, 4, h, h, device=b.device)
    return b.state["z"]


def _shared_t(b: Bench) -> torch.Tensor:
    """One t per iteration shared by the batch, as ``TextTo3DSystem.sample_t`` draws it."""
    return torch.randint(20, 980, (1,), device=b.device).expand(b.batch)


@contextmanager
def timed_region(b: Bench) -> Iterator[None]:
    """Inside a part, time only this block (setup before it runs untimed); :func:`time_ms` picks it up."""
    if b.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        b.state["region"] = (start, end)
    else:
        t0 = time.perf_counter()
        yield
        b.state["region"] = 1e3 * (time.perf_counter() - t0)


def _need_classifier(b: Bench) -> PoseClassifier:
    if b.classifier is None:
        raise RuntimeError("USD parts need the pose classifier: build the bench with pose=True")
    return b.classifier


def part_render(b: Bench) -> None:
    """gsplat forward + backward (a dummy loss on the image)."""
    if b.gaussians is None:
        return
    _render(b).mean().backward()


def part_vae_encode(b: Bench) -> None:
    image = _render(b).detach().requires_grad_(True)
    b.prior.encode(image).square().mean().backward()


def part_unet_cfg(b: Bench) -> None:
    z = b.state.setdefault("z", torch.randn(b.batch, 4, b.prior.latent_resolution // 8,
                                            b.prior.latent_resolution // 8, device=b.device))
    x_t, t, _ = _noisy(b, z)
    with torch.no_grad():
        b.prior.eps(x_t, t, 7.5)


def part_unet_backward(b: Bench) -> None:
    z = b.state.setdefault("z", torch.randn(b.batch, 4, b.prior.latent_resolution // 8,
                                            b.prior.latent_resolution // 8, device=b.device))
    x_t, t, _ = _noisy(b, z)
    x_t.requires_grad_(True)
    b.prior.eps(x_t, t, 7.5).square().mean().backward()


def part_unet_cond(b: Bench) -> None:
    """One plain conditional UNet pass at ε_φ's batch (adapters off): the baseline ε_φ adds to."""
    z = b.state.setdefault("z", torch.randn(b.batch, 4, b.prior.latent_resolution // 8,
                                            b.prior.latent_resolution // 8, device=b.device))
    x_t, t, _ = _noisy(b, z)
    with torch.no_grad():
        b.prior.unet_pred(x_t, t, b.prior.cond_embedding.expand(b.batch, -1, -1))


def part_eps_phi(b: Bench) -> None:
    z = b.state.setdefault("z", torch.randn(b.batch, 4, b.prior.latent_resolution // 8,
                                            b.prior.latent_resolution // 8, device=b.device))
    x_t, t, _ = _noisy(b, z)
    with torch.no_grad():
        b.eps_phi.eps_phi(x_t, t, _c2w(b))


def part_lora_step(b: Bench) -> None:
    z = b.state.setdefault("z", torch.randn(b.batch, 4, b.prior.latent_resolution // 8,
                                            b.prior.latent_resolution // 8, device=b.device))
    loss = b.eps_phi.lora_loss(z, _c2w(b))
    b.lora_opt.zero_grad(set_to_none=True)
    loss.backward()
    b.lora_opt.step()


def part_usd_unet_cfg(b: Bench) -> None:
    """ε̂ with CFG (one UNet pass at batch 2B) keeping the graph w.r.t. x_t, as USD step 4; no backward."""
    x_t, t, _ = _noisy(b, _z(b))
    x_t.requires_grad_(True)
    b.prior.eps(x_t, t, 7.5)


def part_usd_decode(b: Bench) -> None:
    """Tweedie x̂0 = (x_t − σ ε̂)/α and the VAE decode with the graph kept (USD step 6); no backward."""
    z = _z(b)
    t = _shared_t(b)
    alpha, sigma = alpha_sigma(b.prior.alphas_cumprod, t)
    x_t = add_noise(z, torch.randn_like(z), alpha, sigma).requires_grad_(True)
    if "eps_hat" not in b.state:  # a stand-in ε̂: the graph to time runs through x_t
        b.state["eps_hat"] = torch.randn_like(z)
    eps_hat = b.state["eps_hat"]
    b.prior.decode(tweedie_x0(x_t, eps_hat, alpha, sigma))


def part_pose_classifier(b: Bench) -> None:
    """p(c̄|D(x̂0)) at the decoder's resolution, then backward of log r to the image (DINOv2 fwd + bwd)."""
    classifier = _need_classifier(b)
    if "decoded" not in b.state:
        r = b.prior.latent_resolution
        b.state["decoded"] = (torch.rand(b.batch, 3, r, r, device=b.device) * 2 - 1).requires_grad_(True)
    images = b.state["decoded"]
    t = _shared_t(b)
    log_r(classifier(images), b.pose_stats.get(t)).sum().backward()
    images.grad = None


def part_rectifier_backward(b: Bench) -> None:
    """Only the backward of −ω σ/α log r to z through classifier, VAE decoder and UNet (USD step 6);
    the forward (ε̂ with graph, Tweedie, decode, classify) runs first, untimed."""
    objective, z = _rectifier_forward(b)
    with timed_region(b):
        torch.autograd.grad(-objective, z)


def _rectifier_forward(b: Bench) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ ω σ/α log r of a random latent leaf z, with the graph through classifier, decoder and UNet."""
    classifier = _need_classifier(b)
    z = _z(b).clone().requires_grad_(True)
    t = _shared_t(b)
    alpha, sigma = alpha_sigma(b.prior.alphas_cumprod, t)
    x_t = add_noise(z, torch.randn_like(z), alpha, sigma)
    eps_hat = b.prior.eps(x_t, t, 7.5)
    probs = classifier(b.prior.decode(tweedie_x0(x_t, eps_hat, alpha, sigma)))
    return rectifier_objective(log_r(probs, b.pose_stats.get(t)), alpha, sigma), z


# ---- whole iterations: TextTo3DSystem.training_step itself -------------------------------------

# Whole iterations: (method, rectify_every, guidance scale, training_steps per timed call).
ITERATION_SETTINGS: dict[str, tuple[str, int, float, int]] = {
    "sds": ("sds", 1, 100.0, 1),
    "vsd": ("vsd", 1, 7.5, 1),
    "usd": ("usd", 1, 7.5, 1),  # the rectifier every iteration (shared noise, Algorithm 1)
    "usd_k4": ("usd", 4, 7.5, 4),  # rectify_every = 4: one of each call's four iterations is rectified
}
CPU_ITERATION_GAUSSIANS = 1000  # whole iterations on a CPU render with the torch compositor: keep it small


@dataclass
class SystemRun:
    """A :class:`TextTo3DSystem` set up without a Trainer and fed camera batches from
    :class:`RandomCameraDataset`, as ``training.fit_stage`` wires a stage. A Lightning Fabric stands in
    for the Trainer (``manual_backward``, world size, rank); the system keeps the terms of its last iteration
    in ``system.logged`` (a run's ``callbacks.MetricsLog`` reads them every ``train.log_every`` iterations)."""

    system: TextTo3DSystem
    fabric: L.Fabric  # held here: the system keeps only a weak reference
    dataset: RandomCameraDataset
    per_call: int  # training_step calls per timed call

    def __call__(self) -> None:
        for _ in range(self.per_call):
            self.system.training_step(self.dataset[self.system.iteration], self.system.iteration)


def run_config(b: Bench, name: str, gaussians: int, backend: str, seed: int = 0) -> RunConfig:
    """The RunConfig of one whole-iteration benchmark: the bench's views and resolution, uniform t in
    [0.02, 0.98] T, no densification (the Gaussian count stays fixed), eager networks."""
    method, rectify_every, guidance, _ = ITERATION_SETTINGS[name]
    return config_from_data({
        "camera": {"batch_size": b.batch, "resolution": b.camera_cfg.resolution, "elevation_range": [0.0, 30.0]},
        "gaussians": {"num_init": gaussians},
        "render": {"backend": backend},
        "prior": {"kind": "sd"},
        "distill": {"method": method, "guidance_scale": guidance, "time_schedule": "uniform",
                    "rectifier": {"rectify_every": rectify_every}},
        "densify": {"strategy": "none"},
        "train": {"steps": 10**6, "seed": seed, "device": b.device.type, "progress_bar": False},
        "perf": {"compile": "off"},
    })


def build_system_run(b: Bench, name: str, gaussians: int, backend: str, seed: int = 0) -> SystemRun:
    """The system of one whole iteration on the bench's prior, ε_φ and pose classifier."""
    cfg = run_config(b, name, gaussians, backend, seed)
    need = needs(cfg.distill.method)
    classifier, class_names = None, ()
    if need.pose_classifier:
        module = _need_classifier(b)
        classifier, class_names = (lambda images, background=None: module(images)), POSE_CLASSES
    system = TextTo3DSystem(cfg, b.prior, b.eps_phi if need.particle_score else None, classifier, class_names)
    fabric = L.Fabric(accelerator="cuda" if b.device.type == "cuda" else "cpu", devices=1)
    system.fabric = fabric
    system.to(b.device)
    system.setup("fit")
    system.configure_optimizers()
    system.on_fit_start()
    dataset = RandomCameraDataset(cfg.camera, cfg.train.steps, seed, cfg.render.background)
    runner = SystemRun(system, fabric, dataset, ITERATION_SETTINGS[name][3])
    return runner


PARTS: dict[str, Callable[[Bench], None]] = {
    "render": part_render,
    "vae_encode": part_vae_encode,
    "unet_cfg": part_unet_cfg,
    "unet_backward": part_unet_backward,
    "unet_cond": part_unet_cond,
    "eps_phi": part_eps_phi,
    "lora_step": part_lora_step,
    "usd_unet_cfg": part_usd_unet_cfg,
    "usd_decode": part_usd_decode,
    "pose_classifier": part_pose_classifier,
    "rectifier_backward": part_rectifier_backward,
}
ITERATIONS = tuple(ITERATION_SETTINGS)
USD_NAMES = frozenset({"usd_unet_cfg", "usd_decode", "pose_classifier", "rectifier_backward", "usd", "usd_k4"})


# ---- timing ----------------------------------------------------------------------------------


def time_ms(
    fn: Callable[[], None], device: torch.device, iters: int = 10, warmup: int = 3,
    state: Optional[dict] = None, per_call: int = 1,
) -> dict:
    """Milliseconds per call (CUDA events on CUDA, wall clock elsewhere) and peak GPU memory in MiB.

    If ``fn`` times a :func:`timed_region` (recorded in ``state["region"]``), only that region counts.
    ``per_call``: iterations one call runs; times are divided by it (ms per iteration).
    """
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        if state is not None:
            state.pop("region", None)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = 1e3 * (time.perf_counter() - t0)
        region = state.get("region") if state is not None else None
        if region is not None:
            elapsed = region[0].elapsed_time(region[1]) if isinstance(region, tuple) else region
        times.append(elapsed / per_call)
    out = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "min_ms": min(times)}
    if per_call != 1:
        out["iterations_per_call"] = per_call
    if state is not None and "region" in state:
        out["timed_region_only"] = True
    if cuda:
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def sanity(b: Bench) -> dict:
    """Finite outputs of ε̂, ε_φ and the LoRA loss in the benchmark's precision (random weights)."""
    z = b.prior.encode(_render(b).detach())
    x_t, t, _ = _noisy(b, z)
    with torch.no_grad():
        eps_hat = b.prior.eps(x_t, t, 7.5)
        eps_phi = b.eps_phi.eps_phi(x_t, t, _c2w(b))
        loss = b.eps_phi.lora_loss(z, _c2w(b))
    out = {"latents_finite": bool(torch.isfinite(z).all()), "eps_hat_finite": bool(torch.isfinite(eps_hat).all()),
           "eps_phi_finite": bool(torch.isfinite(eps_phi).all()), "lora_loss": float(loss)}
    if b.classifier is not None:
        with torch.no_grad():
            probs = b.classifier(b.prior.decode(x_t))
        out["pose_probs_finite"] = bool(torch.isfinite(probs).all())
        out["pose_probs_sum"] = float(probs.sum(-1).mean())
        objective, z_leaf = _rectifier_forward(b)
        (grad_rect,) = torch.autograd.grad(-objective, z_leaf)
        out["rect_grad_finite"] = bool(torch.isfinite(grad_rect).all())
        out["rect_grad_norm"] = float(grad_rect.float().norm())
    return out


def profile(fn: Callable[[], None], device: torch.device, iters: int = 5, warmup: int = 2, rows: int = 25) -> str:
    """torch.profiler table (CPU + CUDA) of ``iters`` calls after warm-up, sorted by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def compile_bench(b: Bench, args: argparse.Namespace, timings: dict):
    """Route the bench's UNet, VAE, ε_φ and pose classifier passes through torch.compile
    (``training.compile_networks`` with ``perf.compile=on``); the compiler."""
    from recdreamer_gs import training
    from recdreamer_gs.config import PerfConfig
    from recdreamer_gs.pose.setup import PoseSetup

    cfg = RunConfig(perf=PerfConfig(compile="on"))
    pose = PoseSetup(None, (), module=b.classifier)
    return training.compile_networks(cfg, b.device, b.prior, b.eps_phi, pose, timings,
                                     echo=lambda text: print(text, flush=True))


def last_metrics(runner: SystemRun) -> dict:
    """The terms the last training_step logged, as plain numbers."""
    return {k: round(float(v), 6) for k, v in sorted(runner.system.logged.items())}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    num_gaussians = 0 if args.no_render else args.gaussians
    parts = args.parts.split(",") if args.parts else list(PARTS)
    iterations = args.iterations.split(",") if args.iterations else list(ITERATIONS)
    for name in parts + iterations:
        if name not in PARTS and name not in ITERATIONS:
            raise SystemExit(f"unknown part {name!r}; expected one of {', '.join([*PARTS, *ITERATIONS])}")
    pose = bool(USD_NAMES & {*parts, *iterations, args.profile})
    bench = build_bench(args.device, args.dtype, args.tiny, args.resolution, num_gaussians, args.batch, args.seed,
                        pose=pose, dino_dtype=args.dino_dtype, n_augment=args.n_augment)
    timings: dict = {}
    compiler = None
    if args.compile:  # as a run does: perf.make_compiler through training.compile_networks
        compiler = compile_bench(bench, args, timings)
        args.warmup = max(args.warmup, 3)  # compilation (and CUDA-graph recording) happens in the first calls
    if args.no_render:
        bench.gaussians, bench.gaussian_opts = None, {}
        bench.image = torch.rand(args.batch, 3, args.resolution, args.resolution, device=bench.device,
                                 requires_grad=True)
    build_s = time.perf_counter() - t0
    device = bench.device
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(bench.prior.dtype).replace("torch.", ""),
        "model": "tiny" if args.tiny else "sd-2.1-base size (random weights)",
        "pose_model": (None if bench.classifier is None else
                       ("tiny dinov2-with-registers" if args.tiny else "dinov2-with-registers-small size (random)")),
        "pose_dtype": None if bench.classifier is None else args.dino_dtype,
        "pose_input_size": None if bench.classifier is None else bench.classifier.cfg.input_size,
        "render_resolution": args.resolution,
        "latent_resolution": bench.prior.latent_resolution // 8,
        "batch": args.batch,
        "gaussians": args.gaussians if bench.gaussians is not None else 0,
        "iters": args.iters,
        "warmup": args.warmup,
        "compile": None if compiler is None else compiler.describe(),
        "build_s": round(build_s, 2),
        "parts": {},
        "iterations": {},
    }
    if bench.gaussians is not None:
        try:  # the first gsplat call JIT-builds its CUDA extension; without it, time the rest
            part_render(bench)
        except Exception as err:  # noqa: BLE001
            result["render_error"] = f"{type(err).__name__}: {str(err)[-800:]}"
            print(f"render skipped: {result['render_error']}", flush=True)
            bench.gaussians, bench.gaussian_opts = None, {}
            bench.image = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device,
                                     requires_grad=True)
            result["gaussians"] = 0
    for name in parts:
        fn = PARTS[name]
        if name == "render" and bench.gaussians is None:
            result["parts"][name] = None  # skipped: no CUDA or --no-render
            continue
        result["parts"][name] = time_ms(lambda: fn(bench), device, args.iters, args.warmup, state=bench.state)
        print(f"{name:>18}: {result['parts'][name]['median_ms']:9.2f} ms", flush=True)
    # Whole iterations: TextTo3DSystem.training_step itself (render, encode, the distillation step of
    # distill/step.py, Gaussian and LoRA steps, logging), one system per method on the bench's networks.
    iteration_gaussians = args.gaussians if bench.gaussians is not None else min(args.gaussians,
                                                                                 CPU_ITERATION_GAUSSIANS)
    backend = "gsplat" if bench.gaussians is not None else "torch"
    if iterations:
        result.update(iteration_gaussians=iteration_gaussians, iteration_render=backend)
    for name in iterations:
        runner = build_system_run(bench, name, iteration_gaussians, backend, args.seed)
        result["iterations"][name] = time_ms(runner, device, args.iters, args.warmup, per_call=runner.per_call)
        result["iterations"][name]["metrics"] = last_metrics(runner)
        print(f"{name:>18}: {result['iterations'][name]['median_ms']:9.2f} ms / iteration", flush=True)
        if args.profile == name:
            result["profile"] = {name: profile(runner, device)}
            print(result["profile"][name], flush=True)
        del runner
    if compiler is not None:
        compiler.close()
        result["compile_s"] = round(timings.get("compile_s", 0.0), 2)
        result["compiled_passes"] = list(compiler.passes)
    if device.type == "cuda":  # the largest of the per-part / per-iteration peaks
        timed = [r for r in [*result["parts"].values(), *result["iterations"].values()] if r]
        result["peak_mem_mib"] = max([r["peak_mem_mib"] for r in timed] or [0.0])
        result["peak_reserved_mib"] = max([r["peak_reserved_mib"] for r in timed] or [0.0])
    result["sanity"] = sanity(bench)
    if args.profile in PARTS:
        fn = PARTS[args.profile]
        result["profile"] = {args.profile: profile(lambda: fn(bench), device)}
        print(result["profile"][args.profile], flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--resolution", type=int, default=512, help="render resolution (square)")
    parser.add_argument("--tiny", action="store_true", help="test-fixture-size networks (CPU smoke run)")
    parser.add_argument("--gaussians", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1, help="views per iteration (CFG doubles it)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--no-render", action="store_true", help="stand in a random image for the render")
    parser.add_argument("--parts", default="", help="comma list of parts to time (default: all)")
    parser.add_argument("--iterations", default="",
                        help="comma list of whole iterations (default: sds,vsd,usd,usd_k4)")
    parser.add_argument("--dino-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="DINOv2 precision of the pose classifier (the pipeline loads it in fp32)")
    parser.add_argument("--n-augment", type=int, default=4, help="augmented copies per template (release: 200)")
    parser.add_argument("--profile", default="", help="also profile this part or iteration (torch.profiler)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the networks' passes as a run with perf.compile=on does (at least 3 "
                             "warm-up calls; compile_s in the JSON)")
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
