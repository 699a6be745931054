"""The USD rectifier: EMA pose statistics per time interval and log r (paper eq. 10-13, 19; docs/iteration.md, steps 6, 7 and 9).

USD reweights the prior by r(x|y) = Σ_c̄ f(c̄) p(c̄|x) / p̄_t(c̄), where p̄_t is the pose marginal the
prior currently produces at noise level t (paper eq. 10-11). With f uniform, ascending log r moves
particles out of over-represented poses (the front) into rare ones, so the pose marginal becomes
uniform. p̄_t is estimated online (paper eq. 19): one EMA per interval of T/n_t timesteps over the
classifier's probabilities of the Tweedie estimates x̂0.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recdreamer_gs.config import RectifierConfig
from recdreamer_gs.distill.grads import clamp_to_norm
from recdreamer_gs.pose.setup import Classifier


def ema_rate(n_ema: int) -> float:
    """α_ema = 1 − 0.1^(1/n_ema): after n_ema updates the old value keeps 10% weight (0.0228 for 100)."""
    return 1.0 - 0.1 ** (1.0 / n_ema)


def interval_index(t: Int[Tensor, "B"], n_intervals: int, T: int) -> Int[Tensor, "B"]:
    """Which of the n_t intervals of T/n_t timesteps each t falls in (0 = smallest t)."""
    return torch.clamp(t // (T // n_intervals), 0, n_intervals - 1)


def log_r(
    probs: Float[Tensor, "B C"], marginal: Float[Tensor, "B C"], target: Optional[Float[Tensor, "C"]] = None
) -> Float[Tensor, "B"]:
    """log Σ_c f(c) p(c|x̂0) / p̄_t(c), f uniform unless ``target`` is given (paper eq. 11)."""
    c = probs.shape[-1]
    f = target if target is not None else torch.full((c,), 1.0 / c, dtype=probs.dtype, device=probs.device)
    return torch.log((f * probs / marginal.clamp_min(1e-8)).sum(-1).clamp_min(1e-30))


def pose_control_log_r(probs: Float[Tensor, "B C"], index: int) -> Float[Tensor, "B"]:
    """Pose control (appendix C.5): r = p(class|x̂0), pulling every view towards one pose."""
    return torch.log(probs[:, index].clamp_min(1e-30))


def rectifier_objective(
    log_r_value: Float[Tensor, "B"], alpha: Float[Tensor, "B 1 1 1"], sigma: Float[Tensor, "B 1 1 1"]
) -> Tensor:
    """Σ_b ω(t) (σ_t/α_t) log r_b with ω = σ²; g_rect = −∂/∂z of this (ascent on log r)."""
    w = (sigma**2 * sigma / alpha).view(-1)
    return (w * log_r_value).sum()


class PoseStatistics:
    """EMA of the pose marginal p̄_t(c), one row per time interval; starts uniform."""

    def __init__(self, n_classes: int, n_intervals: int = 10, n_ema: int = 100, T: int = 1000,
                 device: torch.device | str = "cpu"):
        self.n_classes, self.n_intervals, self.T = n_classes, n_intervals, T
        self.rate = ema_rate(n_ema)
        self.marginal = torch.full((n_intervals, n_classes), 1.0 / n_classes, device=device)
        self.counts = torch.zeros(n_intervals, dtype=torch.long, device=device)
        # Data-parallel hook: maps a local batch mean [C] to the mean over all ranks.
        self.reduce: Optional[Callable[[Tensor], Tensor]] = None

    def get(self, t: Int[Tensor, "B"]) -> Float[Tensor, "B C"]:
        return self.marginal[interval_index(t.to(self.marginal.device), self.n_intervals, self.T)]

    @torch.no_grad()
    def update(self, t: Int[Tensor, "B"], probs: Float[Tensor, "B C"]) -> None:
        """Move the EMA of the interval of t (one shared t per iteration) towards the batch mean.

        The interval stays a device tensor (index_copy_, no ``int()``): no host sync in the loop."""
        k = interval_index(t[:1].to(self.marginal.device), self.n_intervals, self.T)  # [1]
        mean = probs.detach().float().mean(0).to(self.marginal.device)
        if self.reduce is not None:
            mean = self.reduce(mean)
        old = self.marginal.index_select(0, k)[0]
        row = self.rate * mean + (1.0 - self.rate) * old
        # A batch with a non-finite probability (a diverging render) leaves the EMA as it was: one NaN
        # would otherwise poison p̄_t for the rest of the run.
        row = torch.where(torch.isfinite(row).all(), row, old)
        self.marginal.index_copy_(0, k, row[None])
        self.counts.index_add_(0, k, torch.ones_like(k))

    def log_dict(self, class_names: tuple[str, ...], prefix: str = "pose_ema") -> dict[str, Tensor]:
        """The EMA of every interval and class, keyed ``<prefix>/t<lo>-<hi>/<class>`` (t range of the interval)."""
        marginal = self.marginal.detach().clone()  # a snapshot: the next update writes in place
        width = self.T // self.n_intervals
        out = {}
        for k in range(self.n_intervals):
            hi = self.T - 1 if k == self.n_intervals - 1 else (k + 1) * width - 1
            for c, name in enumerate(class_names):
                out[f"{prefix}/t{k * width:03d}-{hi:03d}/{name}"] = marginal[k, c]
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {"marginal": self.marginal.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["marginal"].shape != self.marginal.shape:
            raise ValueError(f"pose statistics: expected shape {tuple(self.marginal.shape)}, "
                             f"got {tuple(state['marginal'].shape)}")
        self.marginal = state["marginal"].to(self.marginal.device).clone()
        self.counts = state["counts"].to(self.counts.device).clone()

    def to(self, device: torch.device | str) -> "PoseStatistics":
        self.marginal = self.marginal.to(device)
        self.counts = self.counts.to(device)
        return self


class Rectifier:
    """USD's rectifier: the pose classifier, the running pose statistics and the clamps of
    docs/iteration.md steps 6, 7 and 9 (paper eq. 10-13, 19).

    Callers pass the particle count ``particles`` of the particle-major batch (P·B samples) to every
    method: the clamp is per particle. The statistics are one EMA per particle (``statistics:
    per_particle``, ``particles`` given here) or one shared by all (``pooled``): a pooled marginal can look
    uniform while each particle shows one pose, and then nothing pushes the particles
    (benchmarks/results/particles_3d/NOTES.md).
    """

    def __init__(self, cfg: RectifierConfig, classifier: Classifier, class_names: tuple[str, ...], T: int = 1000,
                 device: torch.device | str = "cpu", particles: int = 1):
        if cfg.pose_control is not None and cfg.pose_control not in class_names:
            raise ValueError(f"rectifier: pose_control expected one of {list(class_names)}, got {cfg.pose_control!r}")
        if particles < 1:
            raise ValueError(f"rectifier: particles expected >= 1, got {particles}")
        self.cfg = cfg
        self.classifier = classifier
        self.class_names = tuple(class_names)
        self.pooled = cfg.statistics == "pooled"
        # One PoseStatistics per particle (per_particle) or a single shared one (pooled). Decide by the mode,
        # not by len(groups): a data-parallel process may keep a single particle's statistics.
        groups = 1 if self.pooled else particles
        self.groups = [PoseStatistics(len(class_names), cfg.n_intervals, cfg.n_ema, T, device) for _ in range(groups)]
        self.particle_ids = list(range(groups))  # which particle each group belongs to (after keep())
        # Pose control (appendix C.5): r = p(class|x̂0) instead of the statistics' ratio.
        self.pose_control_index = class_names.index(cfg.pose_control) if cfg.pose_control else None

    @property
    def stats(self) -> PoseStatistics:
        """The shared statistics (pooled), or the first particle's (per_particle)."""
        return self.groups[0]

    def log_dict(self) -> dict[str, Tensor]:
        """Every EMA of every statistics group: ``pose_ema/...`` for the shared one or particle 0's,
        ``pose_ema_p<i>/...`` for particle i (``PoseStatistics.log_dict``)."""
        out = {}
        for i, stats in zip(self.particle_ids, self.groups):
            out.update(stats.log_dict(self.class_names, "pose_ema" if i == 0 else f"pose_ema_p{i}"))
        return out

    def keep(self, indices: list[int]) -> None:
        """Keep the statistics of these particles only (the share of one data-parallel process)."""
        if not self.pooled:
            self.groups = [self.groups[i] for i in indices]
            self.particle_ids = list(indices)

    def marginal(self, t: Int[Tensor, "N"], particles: int = 1) -> Float[Tensor, "N C"]:
        """p̄_t of each sample of the particle-major batch: its particle's EMA, or the shared one."""
        if self.pooled:
            return self.groups[0].get(t)
        self._check(particles)
        return torch.cat([s.get(t_p) for s, t_p in zip(self.groups, t.chunk(particles))])

    def _check(self, particles: int) -> None:
        if particles != len(self.groups):
            raise ValueError(f"rectifier: per-particle statistics for {len(self.groups)} particles, "
                             f"got a batch of {particles}")

    def active(self, iteration: int) -> bool:
        """Whether this iteration takes the rectifier gradient (every ``rectify_every``-th one)."""
        return iteration % self.cfg.rectify_every == 0

    @property
    def fresh_noise(self) -> bool:
        """The release draws new noise for the rectifier's branch; Algorithm 1 reuses x_t."""
        return self.cfg.noise == "fresh"

    def classify(self, images: Float[Tensor, "N 3 H W"], background: Optional[Float[Tensor, "N 3"]]
                 ) -> Float[Tensor, "N C"]:
        return self.classifier(images, background)

    def log_r(self, probs: Float[Tensor, "N C"], t: Int[Tensor, "N"], particles: int = 1) -> Float[Tensor, "N"]:
        """log r of each sample (eq. 11), or log p(class|x̂0) under pose control."""
        if self.pose_control_index is not None:
            return pose_control_log_r(probs, self.pose_control_index)
        return log_r(probs, self.marginal(t, particles))

    def clamp(self, g_rect: Float[Tensor, "N C h w"], g_distill: Float[Tensor, "N C h w"], particles: int
              ) -> Float[Tensor, "N C h w"]:
        """weight · (gain · g_rect capped per particle at norm_coef · ‖g_distill‖) (docs/iteration.md step 7)."""
        c = self.cfg
        return c.weight * clamp_to_norm(g_rect, g_distill, c.gain, c.norm_coef, particles=particles)

    @torch.no_grad()
    def update(self, t: Int[Tensor, "N"], probs: Float[Tensor, "N C"], particles: int = 1) -> None:
        """Step 9: the EMA of t's interval moves towards the mean of each particle's views, or of every
        particle's views when pooled (eq. 19)."""
        if self.pooled:
            self.groups[0].update(t, probs)
            return
        self._check(particles)
        for stats, t_p, probs_p in zip(self.groups, t.chunk(particles), probs.chunk(particles)):
            stats.update(t_p, probs_p)

    @property
    def reduce(self) -> Optional[Callable[[Tensor], Tensor]]:
        """Data-parallel hook of pooled statistics: maps a local batch mean [C] to the mean over all ranks."""
        return self.groups[0].reduce

    @reduce.setter
    def reduce(self, fn: Optional[Callable[[Tensor], Tensor]]) -> None:
        # Per-particle statistics stay on the process that owns the particle: nothing to average.
        if self.pooled:
            self.groups[0].reduce = fn

    def state_dict(self) -> dict[str, Any]:
        if len(self.groups) == 1:
            return self.groups[0].state_dict()
        return {"per_particle": [s.state_dict() for s in self.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("per_particle", [state])
        if len(states) != len(self.groups):
            raise ValueError(f"rectifier statistics: expected {len(self.groups)} (statistics="
                             f"{self.cfg.statistics}), got {len(states)} in the checkpoint")
        for stats, s in zip(self.groups, states):
            stats.load_state_dict(s)

    def to(self, device: torch.device | str) -> "Rectifier":
        for stats in self.groups:
            stats.to(device)
        return self
