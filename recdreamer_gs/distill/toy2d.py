"""The paper's 2D check (appendix E) on the synthetic prior: image particles, no renderer.

Each particle is an image in [-1, 1] optimised directly by SDS, VSD or USD against the front-biased
synthetic mixture. SDS and VSD keep the prior's front bias in the particles' pose histogram; USD's
rectifier makes it close to uniform. ``benchmarks/particles_2d.py`` runs the full experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.config import DistillConfig, Method, RectifierConfig, SyntheticPriorConfig, needs
from recdreamer_gs.distill.rectifier import Rectifier
from recdreamer_gs.distill.step import distill_step
from recdreamer_gs.priors.synthetic import KernelParticleScore, SyntheticPrior


@dataclass
class Toy2DConfig:
    particles: int = 16  # image particles optimised together
    iterations: int = 2000  # optimisation steps
    lr: float = 0.02  # Adam learning rate on the pixels
    resolution: int = 16  # 3·16·16 = 768 dimensions, as the prototype
    s_q: float = 0.3  # kernel width of the particles' own score (VSD's ε_φ)
    gain: float = 16384.0  # rectifier gain before the per-particle clamp to the VSD norm
    norm_coef: float = 1.0  # clamp the rectifier gradient to norm_coef·‖g_vsd‖ per particle
    t_min: float = 0.02  # t range as fractions of T
    t_max: float = 0.98
    n_intervals: int = 10  # EMA intervals of the pose statistics
    n_ema: int = 100
    init_noise: float = 1.0  # std of the particles' initial noise around the mixture's centre


def make_prior(cfg: Toy2DConfig) -> SyntheticPrior:
    return SyntheticPrior(SyntheticPriorConfig(resolution=cfg.resolution))


def distill_config(method: Method, cfg: Toy2DConfig) -> DistillConfig:
    """The step's settings for the 2D check: no CFG, no element clamp, the rectifier every iteration."""
    # Pooled statistics: a 2D particle is one image with one pose, so the pose marginal to make uniform is
    # that of the whole set (a single image's own marginal is one-hot by definition).
    rect = RectifierConfig(n_intervals=cfg.n_intervals, n_ema=cfg.n_ema, gain=cfg.gain, norm_coef=cfg.norm_coef,
                           statistics="pooled")
    return DistillConfig(method=method, guidance_scale=1.0, t_min=cfg.t_min, t_max=cfg.t_max, rectifier=rect)


def run_particles(
    method: Method, seed: int, cfg: Toy2DConfig, prior: SyntheticPrior
) -> tuple[Float[Tensor, "P 3 H W"], Float[Tensor, "C"]]:
    """Optimise image particles; returns them and their pose histogram (share of particles per class).

    Each iteration is :func:`recdreamer_gs.distill.step.distill_step` on the particles themselves (z = x, one
    view per particle), with the exact kernel score as ε_φ and the prior's template classifier."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.particles
    background = torch.ones(P, 3)
    # Particles start at the mixture's centre of mass plus noise: where an unbiased sampler would
    # begin. (Starting at grey instead lets the view with the smallest norm win every basin.)
    centre = prior.means(background[:1], 1)[0].mean(0)
    x = (centre + cfg.init_noise * torch.randn(P, 3, cfg.resolution, cfg.resolution, generator=g))
    x = x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    d, need = distill_config(method, cfg), needs(method)
    particle_score = KernelParticleScore(prior.alphas_cumprod, cfg.s_q) if need.particle_score else None
    rectifier = Rectifier(d.rectifier, prior.classify, prior.class_names, prior.num_train_timesteps) \
        if need.rectifier else None
    lo, hi = int(cfg.t_min * prior.num_train_timesteps), int(cfg.t_max * prior.num_train_timesteps)
    for i in range(cfg.iterations):
        t = torch.randint(lo, hi, (1,), generator=g).expand(P)
        z = x.detach().requires_grad_(need.rectifier)  # the rectifier differentiates through z
        step = distill_step(prior, particle_score, rectifier, d, z, P, t, g, background, iteration=i)
        opt.zero_grad()
        x.grad = step.grad
        opt.step()
    with torch.no_grad():
        labels = prior.class_posterior(x * prior.alphas_cumprod[0].sqrt(), torch.zeros(P, dtype=torch.long),
                                       background).argmax(-1)
    hist = torch.bincount(labels, minlength=len(prior.class_names)).float() / P
    return x.detach(), hist


def tv_from_uniform(hist: Float[Tensor, "C"]) -> float:
    """Total-variation distance of a histogram from the uniform distribution."""
    return 0.5 * (hist - 1.0 / hist.numel()).abs().sum().item()
