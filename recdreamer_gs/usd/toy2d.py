"""The paper's 2D check (appendix E) on the synthetic prior: image particles, no renderer.

Each particle is an image in [-1, 1] optimised directly by SDS, VSD or USD against the front-biased
synthetic mixture. SDS and VSD keep the prior's front bias in the particles' pose histogram; USD's
rectifier makes it close to uniform. ``benchmarks/particles_2d.py`` runs the full experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.config import SyntheticPriorConfig
from recdreamer_gs.priors.synthetic import SyntheticPrior, kernel_particle_eps
from recdreamer_gs.usd import distill
from recdreamer_gs.usd.rectifier import PoseStatistics, log_r, rectifier_objective

Method = Literal["sds", "vsd", "usd"]


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


def clamp_per_particle(g_rect: Tensor, g_ref: Tensor, norm_coef: float) -> Tensor:
    """Rescale each particle's rectifier gradient to at most norm_coef times its VSD gradient norm."""
    n_rect = g_rect.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    limit = norm_coef * g_ref.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return torch.where(n_rect > limit, g_rect * limit / n_rect.clamp_min(1e-20), g_rect)


def run_particles(
    method: Method, seed: int, cfg: Toy2DConfig, prior: SyntheticPrior
) -> tuple[Float[Tensor, "P 3 H W"], Float[Tensor, "C"]]:
    """Optimise image particles; returns them and their pose histogram (share of particles per class)."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.particles
    background = torch.ones(P, 3)
    # Particles start at the mixture's centre of mass plus noise: where an unbiased sampler would
    # begin. (Starting at grey instead lets the view with the smallest norm win every basin.)
    centre = prior.means(background[:1], 1)[0].mean(0)
    x = (centre + cfg.init_noise * torch.randn(P, 3, cfg.resolution, cfg.resolution, generator=g))
    x = x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    stats = PoseStatistics(len(prior.class_names), cfg.n_intervals, cfg.n_ema, prior.num_train_timesteps)
    lo, hi = int(cfg.t_min * prior.num_train_timesteps), int(cfg.t_max * prior.num_train_timesteps)
    for _ in range(cfg.iterations):
        t = torch.randint(lo, hi, (1,), generator=g).expand(P)
        alpha, sigma = distill.alpha_sigma(prior.alphas_cumprod, t)
        eps = torch.randn(x.shape, generator=g)
        z = x.detach().requires_grad_(method == "usd")
        x_t = distill.add_noise(z, eps, alpha, sigma)
        with torch.set_grad_enabled(method == "usd"):
            eps_hat = prior.eps(x_t, t, background=background)
        if method == "sds":
            grad = distill.sds_grad(eps_hat.detach(), eps, sigma)
        else:
            eps_phi = kernel_particle_eps(x_t.detach(), x.detach()[None], alpha.view(-1), sigma.view(-1), cfg.s_q)
            grad = distill.vsd_grad(eps_hat.detach(), eps_phi, sigma)
        if method == "usd":
            x0_hat = distill.tweedie_x0(x_t, eps_hat, alpha, sigma)
            probs = prior.classify(x0_hat, background)
            objective = rectifier_objective(log_r(probs, stats.get(t)), alpha, sigma)
            (g_rect,) = torch.autograd.grad(-objective, z)
            grad = grad + clamp_per_particle(cfg.gain * g_rect, grad, cfg.norm_coef)
            stats.update(t, probs)
        opt.zero_grad()
        x.grad = distill.nan_to_zero(grad)
        opt.step()
    with torch.no_grad():
        labels = prior.class_posterior(x * prior.alphas_cumprod[0].sqrt(), torch.zeros(P, dtype=torch.long),
                                       background).argmax(-1)
    hist = torch.bincount(labels, minlength=len(prior.class_names)).float() / P
    return x.detach(), hist


def tv_from_uniform(hist: Float[Tensor, "C"]) -> float:
    """Total-variation distance of a histogram from the uniform distribution."""
    return 0.5 * (hist - 1.0 / hist.numel()).abs().sum().item()
