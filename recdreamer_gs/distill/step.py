"""One distillation step: docs/iteration.md steps 2-7 and 9 as one function of tensors.

The 3D system (``TextTo3DSystem.training_step``), the 2D check (``distill/toy2d.py``) and the benchmarks
call :func:`distill_step` on the encoded renders ``z`` and get the gradient with respect to ``z`` back;
rendering, the optimizer steps and the ε_φ update stay with the caller. It is wiring only: the maths
are the pure functions of ``priors/diffusion.py``, ``distill/grads.py`` and ``distill/rectifier.py``. Nothing here reads a tensor's
value on the host (no ``.item()``, ``int()`` or branch on a tensor), so a CUDA iteration never waits.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recdreamer_gs.config import DistillConfig, needs
from recdreamer_gs.distill import grads
from recdreamer_gs.distill.rectifier import Rectifier, rectifier_objective
from recdreamer_gs.priors import diffusion
from recdreamer_gs.priors.base import ParticleScore, Prior


@dataclass
class StepOut:
    """The gradients of one step with respect to ``z`` and what the caller logs (all on z's device)."""

    method: str  # sds | vsd | usd
    grad: Float[Tensor, "N C h w"]  # total gradient g_distill + g_rect, NaN/inf entries zeroed
    grad_distill: Float[Tensor, "N C h w"]  # SDS or VSD gradient (after the optional element clamp)
    grad_rect: Float[Tensor, "N C h w"]  # weight · clamped rectifier gradient; zeros when not rectified
    bad: Bool[Tensor, ""]  # the total gradient was non-finite everywhere (the divergence guard counts these)
    probs: Optional[Float[Tensor, "N C"]] = None  # p(c̄|D(x̂0)), detached (USD)
    log_r: Optional[Float[Tensor, "N"]] = None  # log r of each sample, detached (USD)

    def log_terms(self, class_names: tuple[str, ...]) -> dict[str, Tensor]:
        """The step's terms under the names the loggers (callbacks.py) and report.py read."""
        logs = {
            f"grad/{'vsd' if needs(self.method).particle_score else 'sds'}_norm": self.grad_distill.norm().detach(),
            "grad/rect_norm": self.grad_rect.norm().detach(),
        }
        if self.probs is not None:
            logs["rect/log_r"] = self.log_r.mean()
            for i, name in enumerate(class_names):
                logs[f"pose/{name}"] = self.probs[:, i].mean()
        return logs


def randn_like(z: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


def same_camera_renders(z: Float[Tensor, "N C h w"], particles: int) -> Float[Tensor, "N P C h w"]:
    """For each sample of the particle-major batch, every particle's detached render at its camera
    (the components of the kernel ε_φ; the LoRA ε_φ ignores them)."""
    per_particle = z.detach().view(particles, -1, *z.shape[1:])  # [P, B, ...]
    return per_particle.transpose(0, 1).repeat(particles, *[1] * z.dim())


def distill_step(
    prior: Prior,
    particle_score: Optional[ParticleScore],
    rectifier: Optional[Rectifier],
    cfg: DistillConfig,
    z: Float[Tensor, "N C h w"],
    particles: int,
    t: Int[Tensor, "N"],
    generator: Optional[torch.Generator],
    background: Optional[Float[Tensor, "N 3"]] = None,
    c2w: Optional[Float[Tensor, "N 4 4"]] = None,
    azimuth: Optional[Float[Tensor, "N"]] = None,
    iteration: int = 0,
) -> StepOut:
    """Steps 2-7 and 9 of docs/iteration.md on ``z`` (P·B samples, particle-major, with its graph).

    ``particle_score`` is ε_φ (None for SDS); ``rectifier`` is USD's (None otherwise); ``t`` is the
    iteration's time step per sample; ``generator`` draws ε (and ε' for ``rectifier.noise=fresh``);
    ``azimuth`` is used only under ``cfg.view_prompts``; ``iteration`` decides ``rectify_every``.
    """
    method, need = cfg.method, needs(cfg.method)
    if need.particle_score and particle_score is None:
        raise ValueError(f"distill_step: method {method!r} needs ε_φ (a particle score), got None")
    if need.rectifier and rectifier is None:
        raise ValueError(f"distill_step: method {method!r} needs a Rectifier, got None")
    rectify = need.rectifier and rectifier.active(iteration)
    shared = rectify and not rectifier.fresh_noise  # step 6 differentiates through this x_t
    azimuth = azimuth if cfg.view_prompts else None

    # 3. Noise at the given t: x_t = α_t z + σ_t ε; x_t keeps its graph to z only when step 6 uses it.
    alpha, sigma = diffusion.alpha_sigma(prior.alphas_cumprod, t)
    eps = randn_like(z, generator)
    x_t = diffusion.add_noise(z if shared else z.detach(), eps, alpha, sigma)

    # 4. Pretrained score with CFG (one UNet pass), differentiable only when step 6 needs it.
    with torch.set_grad_enabled(shared):
        eps_hat = prior.eps(x_t, t, cfg.guidance_scale, background, azimuth=azimuth)

    # 5. Distillation gradient: SDS against the injected noise (eq. 4), VSD/USD against ε_φ (eq. 9).
    if need.particle_score:
        with torch.no_grad():
            eps_phi = particle_score.eps_phi(x_t.detach(), t, c2w, particles=same_camera_renders(z, particles))
        grad_distill = grads.vsd_grad(eps_hat.detach(), eps_phi, sigma)
    else:
        grad_distill = grads.sds_grad(eps_hat.detach(), eps, sigma)
    grad_distill = grads.clamp_elements(grad_distill, cfg.grad_clip)

    # 6. Rectifier (USD): x̂0 -> decode -> classify -> log r; g_rect = −∂/∂z[ω σ/α log r] (eq. 13).
    #    Off its iterations (rectify_every) the classifier still runs, without graph, for step 9.
    grad_rect = torch.zeros_like(grad_distill)
    probs = log_r = None
    if need.rectifier:
        if rectify and rectifier.fresh_noise:  # the release draws fresh noise for this branch
            x_t = diffusion.add_noise(z, randn_like(z, generator), alpha, sigma)
            eps_hat = prior.eps(x_t, t, cfg.guidance_scale, background, azimuth=azimuth)
        with torch.set_grad_enabled(rectify):
            x0_hat = diffusion.tweedie_x0(x_t, eps_hat, alpha, sigma)
            probs = rectifier.classify(prior.decode(x0_hat), background)
            log_r = rectifier.log_r(probs, t, particles)
            if rectify:
                (g_rect,) = torch.autograd.grad(-rectifier_objective(log_r, alpha, sigma), z)
                # 7. Clamps: gain, then per particle at most norm_coef·‖g_vsd‖ (docs/iteration.md).
                grad_rect = rectifier.clamp(g_rect, grad_distill, particles)
        probs, log_r = probs.detach(), log_r.detach()
        # 9. Statistics: the EMA of t's interval moves towards the batch's p(c̄|x̂0) (eq. 19).
        rectifier.update(t, probs, particles)

    total = grad_distill + grad_rect
    bad = ~torch.isfinite(total).any()
    return StepOut(method, grads.nan_to_zero(total), grad_distill, grad_rect, bad, probs, log_r)
