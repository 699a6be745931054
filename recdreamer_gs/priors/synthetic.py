"""Offline analytic image prior with an exact score (docs/synthetic-prior.md).

A procedural reference object (a round creature with a face on its front, stripes on its back,
a green fin on its left and an orange horn on its right) is rendered from several azimuths.
The clean prior is the Gaussian mixture p(x0) = Σ_k π_k N(μ_k, s² I) over those renders (pixels in
[-1, 1]); under the SD noise schedule

    p_t(x_t) = Σ_k π_k N(α_t μ_k, (α_t² s² + σ_t²) I),

so the score, the ε-prediction, Tweedie's x̂0 and the class posterior are closed-form.

The prompt is ignored: the prior has no text conditioning, so ε_u = ε_y and CFG changes nothing.
The front bias comes from the front class owning more components (55% with the defaults), which
is what moves basin boundaries in hundreds of dimensions (a heavier single weight barely does).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Literal, Optional

import torch
from diffusers import DDPMScheduler
from jaxtyping import Float, Int
from torch import Tensor

from recdreamer_gs.cameras import orbit
from recdreamer_gs.config import CameraConfig, GaussiansConfig, SyntheticPriorConfig
from recdreamer_gs.gaussians import Gaussians, rgb_to_sh0
from recdreamer_gs.pose.setup import PoseSetup
from recdreamer_gs.render import render

if TYPE_CHECKING:
    from recdreamer_gs.config import DistillConfig, RunConfig

POSE_CLASSES = ("front", "left", "back", "right")
# Camera azimuth that sees each class: the object faces +z; a camera on +x (90°) sees its left side.
CLASS_AZIMUTH = {"front": 0.0, "left": 90.0, "back": 180.0, "right": -90.0}


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion's noise schedule (scaled-linear betas, T = 1000), from diffusers."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False,
    )


# --------------------------------------------------------------------------------------------
# Reference object
# --------------------------------------------------------------------------------------------


def _blob(center: tuple[float, float, float], radius: tuple[float, float, float], n: int, rgb: tuple[float, float, float],
          scale: float, generator: torch.Generator, surface: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussians on (or in) an ellipsoid: points, colours, log-scales."""
    d = torch.randn(n, 3, generator=generator)
    d = d / d.norm(dim=-1, keepdim=True)
    if not surface:
        d = d * torch.rand(n, 1, generator=generator) ** (1 / 3)
    pts = torch.tensor(center) + d * torch.tensor(radius)
    return pts, torch.tensor(rgb).expand(n, 3), torch.full((n, 3), math.log(scale))


def _patch_on_body(points: Tensor, rgb: Tensor, body_radius: tuple[float, float, float]) -> Tensor:
    """Pull points onto the body surface so painted features sit on the skin."""
    r = torch.tensor(body_radius)
    unit = points / r
    return unit / unit.norm(dim=-1, keepdim=True) * r * 1.02


def reference_object(generator: Optional[torch.Generator] = None) -> Gaussians:
    """The synthetic prior's object, built from Gaussians (front face, back stripes, distinct sides)."""
    g = generator or torch.Generator().manual_seed(1234)
    body_r = (0.42, 0.5, 0.38)
    parts = [_blob((0.0, 0.0, 0.0), body_r, 500, (0.85, 0.75, 0.55), 0.07, g)]  # tan body
    parts.append(_blob((0.0, -0.05, 0.0), (0.3, 0.35, 0.26), 120, (0.85, 0.75, 0.55), 0.1, g, surface=False))
    # Front (+z): two white eyes with black pupils and a red mouth.
    for x in (-0.16, 0.16):
        eye = _blob((x, 0.15, 0.36), (0.08, 0.08, 0.03), 40, (1.0, 1.0, 1.0), 0.03, g)
        pupil = _blob((x, 0.15, 0.40), (0.035, 0.035, 0.01), 20, (0.02, 0.02, 0.02), 0.02, g)
        parts += [eye, pupil]
    parts.append(_blob((0.0, -0.14, 0.37), (0.14, 0.04, 0.03), 50, (0.85, 0.1, 0.1), 0.03, g))
    # Back (-z): three dark-blue horizontal stripes.
    for y in (-0.2, 0.0, 0.2):
        pts, rgb, sc = _blob((0.0, y, -0.36), (0.3, 0.035, 0.05), 60, (0.1, 0.15, 0.6), 0.03, g)
        parts.append((_patch_on_body(pts, rgb, body_r), rgb, sc))
    # Left side of the object (+x): a green fin; right side (-x): an orange horn.
    parts.append(_blob((0.5, 0.05, 0.0), (0.12, 0.22, 0.1), 80, (0.1, 0.7, 0.2), 0.04, g))
    parts.append(_blob((-0.52, 0.2, 0.0), (0.14, 0.06, 0.06), 60, (1.0, 0.55, 0.0), 0.035, g))
    # Feet (bottom), the same on every side, so that the silhouette reads as an object.
    for x in (-0.2, 0.2):
        parts.append(_blob((x, -0.5, 0.05), (0.1, 0.05, 0.12), 30, (0.45, 0.3, 0.15), 0.04, g))

    points = torch.cat([p[0] for p in parts])
    rgb = torch.cat([p[1] for p in parts])
    log_scales = torch.cat([p[2] for p in parts])
    n = points.shape[0]
    cfg = GaussiansConfig(num_init=n, init_opacity=0.9)
    params = {
        "means": points,
        "scales": log_scales,
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "opacities": torch.full((n,), math.log(0.9 / 0.1)),
        "sh0": rgb_to_sh0(rgb).reshape(n, 1, 3),
        "shN": torch.zeros(n, 0, 3),
    }
    return Gaussians(params, cfg)


def component_views(cfg: SyntheticPriorConfig) -> tuple[Tensor, Tensor, list[int]]:
    """Azimuths, elevations and class index of every mixture component (deterministic)."""
    azimuths, elevations, labels = [], [], []
    j = cfg.jitter_deg
    for c, name in enumerate(POSE_CLASSES):
        count = cfg.front_views if name == "front" else cfg.views_per_class
        for i in range(count):
            # Canonical view first, then a spiral of jitters around it.
            if i == 0:
                da = de = 0.0
            else:
                angle = 2.399963 * i  # golden angle
                r = j * math.sqrt(i / max(count - 1, 1))
                da, de = r * math.cos(angle), 0.5 * r * math.sin(angle)
            azimuths.append(CLASS_AZIMUTH[name] + da)
            elevations.append(cfg.elevation + de)
            labels.append(c)
    return torch.tensor(azimuths), torch.tensor(elevations), labels


def render_reference(cfg: SyntheticPriorConfig, azimuths: Tensor, elevations: Tensor) -> tuple[Tensor, Tensor]:
    """Premultiplied colour [K,3,H,W] (on black) and alpha [K,1,H,W] of the reference object. Rendered once per
    process for each set of views (the renders depend on nothing else): the runs of a batch worker, or of a
    test session, share them; each caller gets its own copy."""
    colour, alpha = _reference_views(cfg.resolution, cfg.radius, cfg.fovy, tuple(azimuths.tolist()),
                                     tuple(elevations.tolist()))
    return colour.clone(), alpha.clone()


@functools.lru_cache(maxsize=4)
@torch.no_grad()
def _reference_views(resolution: int, radius: float, fovy: float, azimuths: tuple[float, ...],
                     elevations: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    obj = reference_object()
    colours, alphas = [], []
    for az, el in zip(azimuths, elevations):
        cams = orbit(1, el, radius, fovy, resolution, start_azimuth=az)
        out = render(obj, cams, torch.zeros(1, 3), backend="torch")
        colours.append(out.rgb[0])
        alphas.append(out.alpha[0])
    return torch.stack(colours), torch.stack(alphas)


# --------------------------------------------------------------------------------------------
# Closed-form mixture maths (pure functions)
# --------------------------------------------------------------------------------------------


def composite_means(
    colour: Float[Tensor, "K 3 H W"], alpha: Float[Tensor, "K 1 H W"], background: Float[Tensor, "B 3"]
) -> Float[Tensor, "B K 3 H W"]:
    """Component means in [-1, 1] over each sample's background: 2(c + (1 − a) bg) − 1."""
    bg = background[:, None, :, None, None]
    return 2.0 * (colour[None] + (1.0 - alpha[None]) * bg) - 1.0


def mixture_posterior(
    x_t: Float[Tensor, "B 3 H W"], means: Float[Tensor, "B K 3 H W"], log_weights: Float[Tensor, "*B K"],
    alpha: Float[Tensor, "B"], var: Float[Tensor, "B"],
) -> Float[Tensor, "B K"]:
    """Posterior over components w_k ∝ π_k N(x_t; α μ_k, v I); ``log_weights`` shared [K] or per sample [B, K]."""
    sq = ((x_t[:, None] - alpha.view(-1, 1, 1, 1, 1) * means) ** 2).flatten(2).sum(-1)  # [B, K]
    return torch.softmax(log_weights.expand_as(sq) - sq / (2.0 * var[:, None]), dim=-1)


def mixture_eps(
    x_t: Float[Tensor, "B 3 H W"], means: Float[Tensor, "B K 3 H W"], log_weights: Float[Tensor, "*B K"],
    alpha: Float[Tensor, "B"], sigma: Float[Tensor, "B"], std: float,
) -> Float[Tensor, "B 3 H W"]:
    """Exact ε-prediction −σ_t ∇ log p_t(x_t) = σ_t (x_t − α_t Σ_k w_k μ_k) / v_t, v_t = α_t² s² + σ_t²."""
    var = alpha**2 * std**2 + sigma**2
    w = mixture_posterior(x_t, means, log_weights, alpha, var)
    mean = torch.einsum("bk,bkchw->bchw", w, means)
    return sigma.view(-1, 1, 1, 1) * (x_t - alpha.view(-1, 1, 1, 1) * mean) / var.view(-1, 1, 1, 1)


def mixture_log_prob(
    x_t: Float[Tensor, "B 3 H W"], means: Float[Tensor, "B K 3 H W"], log_weights: Float[Tensor, "K"],
    alpha: Float[Tensor, "B"], sigma: Float[Tensor, "B"], std: float,
) -> Float[Tensor, "B"]:
    """log p_t(x_t), for checking the closed-form ε against autograd."""
    var = (alpha**2 * std**2 + sigma**2)[:, None]
    d = x_t[0].numel()
    sq = ((x_t[:, None] - alpha.view(-1, 1, 1, 1, 1) * means) ** 2).flatten(2).sum(-1)
    log_norm = -0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(log_weights[None] + log_norm - sq / (2 * var), dim=-1)


def kernel_particle_eps(
    x_t: Float[Tensor, "B 3 H W"], renders: Float[Tensor, "b K 3 H W"], alpha: Float[Tensor, "B"],
    sigma: Float[Tensor, "B"], s_q: float,
) -> Float[Tensor, "B 3 H W"]:
    """VSD's ε_φ for the synthetic prior, with no training: the exact score of the particles' own
    renders smoothed by a kernel of width s_q (one mixture component per particle for each camera;
    ``renders`` is [B, K] per camera or [1, K] shared by all samples)."""
    means = renders.expand(x_t.shape[0], *renders.shape[1:])
    log_w = torch.full((renders.shape[1],), 0.0, dtype=x_t.dtype, device=x_t.device)
    return mixture_eps(x_t, means, log_w, alpha, sigma, s_q)


class KernelParticleScore(torch.nn.Module):
    """ε_φ for VSD/USD on the synthetic prior: :func:`kernel_particle_eps`, nothing to train."""

    def __init__(self, alphas_cumprod: Float[Tensor, "T"], kernel_width: float):
        super().__init__()
        self.alphas_cumprod, self.kernel_width = alphas_cumprod, kernel_width

    def eps_phi(
        self, x_t: Float[Tensor, "B 3 H W"], t: Int[Tensor, "B"], c2w: Float[Tensor, "B 4 4"],
        particles: Optional[Float[Tensor, "B K 3 H W"]] = None,
    ) -> Float[Tensor, "B 3 H W"]:
        """``particles``: the detached renders of every particle at each sample's camera."""
        if particles is None:
            raise ValueError("KernelParticleScore.eps_phi needs the particles' renders, got None")
        abar = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].float()
        return kernel_particle_eps(x_t, particles, abar.sqrt(), (1 - abar).sqrt(), self.kernel_width)

    def lora_loss(self, z: Float[Tensor, "B 3 H W"], c2w: Float[Tensor, "B 4 4"],
                  generator: Optional[torch.Generator] = None) -> Float[Tensor, ""]:
        return z.new_zeros(())  # the kernel score is exact: nothing to train

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def make_optimizer(self, lr: float) -> None:
        return None


def azimuth_to_class(azimuth: Float[Tensor, "B"]) -> Int[Tensor, "B"]:
    """Pose class index of a camera azimuth: 90° bins centred on front (0°), left (90°), back, right."""
    a = torch.remainder(azimuth + 45.0, 360.0)  # front bin starts at 0
    order = torch.tensor([0, 1, 2, 3], device=azimuth.device)  # front, left, back, right by increasing azimuth
    return order[(a // 90.0).long().clamp(0, 3)]


def template_probs(
    images: Float[Tensor, "B 3 H W"], templates: Float[Tensor, "B C 3 H W"], tau: float
) -> Float[Tensor, "B C"]:
    """Template-matching pose classifier softmax_c(−mean‖x − template_c‖² / τ) (docs/synthetic-prior.md).

    τ is large enough that it does not saturate: a sharp softmax gives a zero rectifier gradient.
    """
    dist = ((images[:, None] - templates) ** 2).flatten(2).mean(-1)
    return torch.softmax(-dist / tau, dim=-1)


# --------------------------------------------------------------------------------------------
# The prior object
# --------------------------------------------------------------------------------------------


class SyntheticPrior:
    """Gaussian-mixture image prior over renders of the reference object (pixel space, [-1, 1])."""

    name = "synthetic"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def __init__(self, cfg: SyntheticPriorConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.scheduler = sd_scheduler()
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        azimuths, elevations, labels = component_views(cfg)
        self.azimuths, self.elevations = azimuths, elevations
        self.labels = torch.tensor(labels, device=self.device)  # class index of each component
        colour, alpha = render_reference(cfg, azimuths, elevations)
        self.colour, self.alpha = colour.to(self.device), alpha.to(self.device)
        k = len(labels)
        self.log_weights = torch.full((k,), -math.log(k), device=self.device)  # uniform π_k
        # One canonical view per class for the template classifier: the first component of each class.
        first = [labels.index(c) for c in range(len(POSE_CLASSES))]
        self.template_index = torch.tensor(first, device=self.device)
        self.class_names = POSE_CLASSES

    # -- Prior protocol -------------------------------------------------------------------------

    def encode(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 H W"]:
        self._check_size(images)
        return images * 2.0 - 1.0

    def decode(self, z: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 H W"]:
        return z

    def means(self, background: Optional[Float[Tensor, "B 3"]], batch: int) -> Float[Tensor, "B K 3 H W"]:
        if background is None:
            background = torch.ones(batch, 3, device=self.device)  # white, like a product shot
        return composite_means(self.colour, self.alpha, background.to(self.device))

    def eps(
        self, x_t: Float[Tensor, "B 3 H W"], t: Int[Tensor, "B"], guidance_scale: float = 1.0,
        background: Optional[Float[Tensor, "B 3"]] = None, azimuth: Optional[Float[Tensor, "B"]] = None,
    ) -> Float[Tensor, "B 3 H W"]:
        """Unconditional mixture score; with ``azimuth`` (view prompts), CFG towards that view's class.

        The view-conditioned branch keeps only the components of the camera's pose class, the analogue
        of DreamFusion's "PROMPT, front view" prompts: ε̂ = ε_u + s (ε_view − ε_u).
        """
        alpha, sigma = self._alpha_sigma(t)
        means = self.means(background, x_t.shape[0])
        eps_u = mixture_eps(x_t, means, self.log_weights, alpha, sigma, self.cfg.std)
        if azimuth is None:
            return eps_u
        view = azimuth_to_class(azimuth.to(self.device))
        same = self.labels[None, :] == view[:, None]  # [B, K]
        log_w_view = torch.where(same, self.log_weights[None], torch.full_like(same, -1e9, dtype=x_t.dtype))
        eps_view = mixture_eps(x_t, means, log_w_view, alpha, sigma, self.cfg.std)
        return eps_u + guidance_scale * (eps_view - eps_u)

    # -- what the run takes from its prior ------------------------------------------------------

    @classmethod
    def models(cls, cfg: "RunConfig", cuda: bool) -> list:
        """None: the synthetic prior is analytic (no weights to load)."""
        return []

    def specialise(self, cfg: "RunConfig") -> "RunConfig":
        """Renders at this prior's resolution, its own densification threshold and rectifier cap (its
        pixel-space gradients are larger than SD latents'), and view-conditioned CFG when configured
        (docs/synthetic-prior.md). Idempotent, so a run folder's config.yaml can be run again."""
        s = cfg.prior.synthetic
        replace = dataclasses.replace

        def distill(d: "DistillConfig") -> "DistillConfig":
            return replace(d, view_prompts=d.view_prompts or s.view_conditioned,
                           rectifier=replace(d.rectifier, norm_coef=s.rectifier_norm_coef))

        return replace(cfg, camera=replace(cfg.camera, resolution=s.resolution), distill=distill(cfg.distill),
                       densify=replace(cfg.densify, grow_grad2d=s.densify_grow_grad2d),
                       stages=[replace(st, distill=distill(st.distill)) for st in cfg.stages])

    def particle_score(self, cfg: "RunConfig") -> Optional[KernelParticleScore]:
        """The exact kernel score of the particles (nothing to train) for VSD/USD."""
        if not cfg.needs().particle_score:
            return None
        return KernelParticleScore(self.alphas_cumprod, self.cfg.kernel_width)

    def pose_setup(self, cfg: "RunConfig", need: bool = True, timings: Optional[dict] = None) -> "PoseSetup":
        """Training uses the soft template matcher (docs/synthetic-prior.md); pEnt uses the exact, sharp
        class posterior of the clean renders, so the metric measures poses, not the matcher's softness. The
        posterior knows the reference views only, so pEnt is measured on their orbit (elevation, radius, field
        of view), whatever the run's cameras: that is what lets ``eval --prior synthetic`` score any PLY."""
        s = self.cfg
        reference = CameraConfig(resolution=s.resolution, radius_range=(s.radius, s.radius),
                                 fovy_range=(s.fovy, s.fovy), preview_elevation=s.elevation)
        setup = PoseSetup(self.classify, POSE_CLASSES, metric=self.clean_class_posterior,
                          image_size=s.resolution, metric_camera=reference)
        setup.check_pose_control(cfg.rectifier_config())
        return setup

    def template_candidates(self, prompt: str, per_view: int = 1) -> dict[str, list[Float[Tensor, "3 H W"]]]:
        """The canonical view of each class on white (the prompt plays no part: the object is built in)."""
        images = self.templates(torch.ones(1, 3, device=self.device), 1)[0]
        return {name: [images[i]] for i, name in enumerate(POSE_CLASSES)}

    # -- extras the tests and the rectifier use ---------------------------------------------------

    def class_posterior(
        self, x_t: Float[Tensor, "B 3 H W"], t: Int[Tensor, "B"], background: Optional[Float[Tensor, "B 3"]] = None
    ) -> Float[Tensor, "B C"]:
        """p(c | x_t): the mixture posterior summed over each class's components."""
        alpha, sigma = self._alpha_sigma(t)
        var = alpha**2 * self.cfg.std**2 + sigma**2
        w = mixture_posterior(x_t, self.means(background, x_t.shape[0]), self.log_weights, alpha, var)
        onehot = torch.nn.functional.one_hot(self.labels, len(POSE_CLASSES)).to(w)
        return w @ onehot

    def clean_class_posterior(
        self, images: Float[Tensor, "B 3 H W"], background: Optional[Float[Tensor, "B 3"]] = None
    ) -> Float[Tensor, "B C"]:
        """p(c | x0) of clean images under the mixture (sharp): the ground-truth pose for metrics."""
        t = torch.zeros(images.shape[0], dtype=torch.long, device=self.device)
        return self.class_posterior(images * self.alphas_cumprod[0].sqrt(), t, background)

    def class_prior(self) -> Float[Tensor, "C"]:
        """Share of the mixture each class owns (the pose marginal of the prior)."""
        counts = torch.bincount(self.labels, minlength=len(POSE_CLASSES)).float()
        return counts / counts.sum()

    def templates(self, background: Optional[Float[Tensor, "B 3"]], batch: int) -> Float[Tensor, "B C 3 H W"]:
        return self.means(background, batch)[:, self.template_index]

    def classify(
        self, images: Float[Tensor, "B 3 H W"], background: Optional[Float[Tensor, "B 3"]] = None
    ) -> Float[Tensor, "B C"]:
        """Template classifier on images in [-1, 1] (differentiable in the images)."""
        return template_probs(images, self.templates(background, images.shape[0]), self.cfg.classifier_tau)

    def _alpha_sigma(self, t: Int[Tensor, "B"]) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t.to(self.device)].float()
        return abar.sqrt(), (1.0 - abar).sqrt()

    def _check_size(self, images: Tensor) -> None:
        h, w = images.shape[-2:]
        if h != self.cfg.resolution or w != self.cfg.resolution:
            raise ValueError(
                f"the synthetic prior works at {self.cfg.resolution}x{self.cfg.resolution}; got renders of "
                f"{h}x{w} (set camera.resolution = prior.synthetic.resolution)"
            )
