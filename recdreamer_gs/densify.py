"""Densification aligned to the BNF time schedule (docs/schedules.md), wrapping one gsplat strategy.

The windows follow the back-and-forth blocks of ``schedule.bnf_block``: grow and prune while the
expanding blocks run (large t forms the coarse structure), only prune once the shrinking blocks start
(small t refines detail; Gaussians born there become floaters), nothing at all in a texture-only
stage. Opacity resets happen at the starts of expanding blocks, in our code: gsplat 1.5.3's own reset
never fires (``step % reset_every == 0 & step > 0`` parses as a chained comparison that is always
False), so its schedule is pushed past the run and ``gsplat.strategy.ops.reset_opa`` is called here.

gsplat's strategy ops are pure PyTorch and run on CPU; MCMC's relocation, sampling and position noise
call CUDA kernels, so ``strategy="mcmc"`` needs CUDA tensors. gsplat is imported lazily so that
``config.py`` can import :class:`DensifyConfig` without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from recdreamer_gs.config_base import (
    ConfigError,
    ConfigNode,
    Count,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Range,
    join,
)
from recdreamer_gs.schedule import bnf_block

DensifyWindow = Literal["grow", "prune", "frozen"]
Params = Union[dict[str, nn.Parameter], nn.ParameterDict]

# A step that gsplat's own refine and reset schedules never reach: our code decides when they run.
_NEVER = 2**62


@dataclass
class DensifyConfig(ConfigNode):
    # "default": gsplat DefaultStrategy (clone/split on screen-space gradient, prune on opacity and size);
    # "mcmc": gsplat MCMCStrategy (relocate dead Gaussians, add 5 % per refine up to the cap; CUDA only);
    # "none": the Gaussian count never changes.
    strategy: Literal["default", "mcmc", "none"] = "default"
    # Grow Gaussians whose mean screen-space gradient (gsplat's NDC units, ×W/2·n_cameras) exceeds this.
    # 0.01 as DreamGaussian and threestudio-3dgs, whose SDS loss has our form: 0.5‖z − target‖² summed and
    # divided by the batch (gsplat's ×n_cameras undoes the /B: per-view scale), SD latents of 512 px renders,
    # ω = σ². Their CFG 100 makes gradients larger than CFG 7.5 or VSD/USD: calibrate from the logged
    # Densifier.grad2d_quantiles of a real run. The pixel-space synthetic prior at 64 px gives median 0.06-0.35,
    # 90th percentile 2-10 (measured, SDS, random init): set about 2.0 there.
    grow_grad2d: PositiveFloat = 0.01
    # Largest axis at or below grow_scale3d·scene_scale: duplicate; above: split in two (scale / 1.6).
    # 0.05 × an object radius of 0.6 = 0.03 world units, between threestudio's 0.02 and DreamGaussian's 0.04.
    grow_scale3d: PositiveFloat = 0.05
    # Prune Gaussians whose opacity falls below this (peers 0.005-0.05; DreamGaussian 0.01).
    prune_opa: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.01
    # Prune Gaussians whose largest axis exceeds prune_scale3d·scene_scale (half the object radius; peers
    # prune at 0.25-0.8 of the object size). gaussians.max_log_scale clamps them anyway.
    prune_scale3d: PositiveFloat = 0.5
    # Refine (grow and/or prune) every this many iterations (peers: 50-300).
    refine_every: Annotated[int, Range(1)] = 100
    # No refine before this iteration, so the screen-space statistics cover at least this many steps.
    refine_start: Count = 100
    # Reset opacities at the start of every expanding BNF block but the first, at most once per refine period
    # (DefaultStrategy only: MCMC replaces resets by relocation). Lets Gaussians that are not needed fade and be pruned.
    reset_at_block_boundaries: bool = True
    # The reset clamps every opacity to at most this value (the INRIA/gsplat clamp, not a factor) and zeroes
    # the opacity optimizer's moments. Must stay above prune_opa or the reset itself prunes everything.
    opacity_reset_value: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.05
    # Hard cap on the count: growth stops at it (the highest-gradient candidates go first); MCMC's cap_max.
    # threestudio-3dgs' max_num; 500k Gaussians cost 2-3 ms per 512² gsplat pass (docs/performance.md).
    max_gaussians: PositiveInt = 500_000
    # MCMC position noise: scale lr_means·noise_lr on dead Gaussians. gsplat's 5e5 assumes its means LR of
    # 1.6e-4; our lr_means of 5e-3 is ~30× larger, so 1.6e4 keeps gsplat's product (80).
    mcmc_noise_lr: NonNegativeFloat = 1.6e4

    def check(self, path: str) -> None:
        if self.reset_at_block_boundaries and not self.prune_opa < self.opacity_reset_value:
            raise ConfigError(f"{join(path, 'opacity_reset_value')}: expected prune_opa ({self.prune_opa}) < value < 1 "
                              f"so that a reset does not prune every Gaussian, got {self.opacity_reset_value}")


# -- pure schedule functions --------------------------------------------------------------------


def densify_window(iteration: int, total: int, n_intervals: int, texture_only: bool = False) -> DensifyWindow:
    """What densification may do at ``iteration`` (docs/schedules.md): grow+prune in the expanding BNF blocks,
    prune only in the shrinking ones, nothing in a texture-only stage."""
    if texture_only:
        return "frozen"
    phase, _, _ = bnf_block(iteration, total, n_intervals)
    return "grow" if phase == "expand" else "prune"


def is_block_boundary(iteration: int, total: int, n_intervals: int) -> bool:
    """True on the first iteration of expanding blocks 1..n_i−1: where opacities may be reset.

    Never at iteration 0, never where shrinking starts (no growth would follow to replace what fades).
    """
    if iteration <= 0:
        return False
    phase, index, length = bnf_block(iteration, total, n_intervals)
    return phase == "expand" and iteration == index * length


def is_reset_step(iteration: int, total: int, n_intervals: int, refine_every: int) -> bool:
    """A block boundary (:func:`is_block_boundary`) that is the first one in its refine period.

    Many short blocks (10 BNF intervals, the default with several particles, in a run of a few hundred
    iterations) would otherwise clamp the opacities every few dozen iterations, faster than a refine can
    prune what faded, and the particles would train under a different schedule than a single one.
    """
    if not is_block_boundary(iteration, total, n_intervals):
        return False
    _, index, length = bnf_block(iteration, total, n_intervals)
    return index == 1 or (iteration - length) // refine_every != iteration // refine_every


def is_refine_step(iteration: int, refine_start: int, refine_every: int) -> bool:
    """Refine on multiples of ``refine_every`` from ``refine_start`` on (never at 0: no statistics yet)."""
    return iteration > 0 and iteration >= refine_start and iteration % refine_every == 0


@torch.no_grad()
def prune_mask(params: Params, prune_opa: float, max_scale: float) -> Bool[Tensor, "N"]:
    """Gaussians to remove: opacity < ``prune_opa``, largest axis > ``max_scale`` (world units), or any
    non-finite value (a NaN Gaussian makes gsplat allocate absurd tile buffers). Never all of them."""
    opacity = torch.sigmoid(params["opacities"].flatten())
    too_big = torch.exp(params["scales"]).amax(dim=-1) > max_scale
    finite = torch.stack([torch.isfinite(p.reshape(p.shape[0], -1)).all(dim=-1) for p in params.values()]).all(dim=0)
    mask = (opacity < prune_opa) | too_big | ~finite
    if bool(mask.all()) and mask.numel() > 0:
        # An empty set cannot be rendered; keep the most opaque finite Gaussian.
        keep = torch.where(finite, opacity, torch.full_like(opacity, -1.0)).argmax()
        mask[keep] = False
    return mask


def over_cap(scores: Float[Tensor, "N"], threshold: float, room: int) -> Bool[Tensor, "N"]:
    """Growth candidates (score > threshold) beyond the ``room`` highest scores: growing them would pass the cap."""
    high = scores > threshold
    if int(high.sum()) <= room:
        return torch.zeros_like(high)
    keep = torch.topk(torch.where(high, scores, torch.full_like(scores, -torch.inf)), max(room, 0)).indices
    drop = high.clone()
    drop[keep] = False
    return drop


# -- the stateful wrapper -----------------------------------------------------------------------


class Densifier:
    """One gsplat strategy behind fixed hooks, scheduled by our own iteration and the BNF windows.

    Call ``check`` once after the optimizers exist, ``pre_backward`` before ``loss.backward()``, and
    ``post_backward`` after the optimizers' ``step()``. The hooks replace Parameter objects in ``params``
    (and move the Adam moments with them): read ``params[...]`` afresh after a call.
    """

    def __init__(
        self, cfg: DensifyConfig, scene_scale: float, total_iterations: int, n_intervals: int,
        texture_only: bool = False,
    ):
        cfg.validate("densify")
        if not scene_scale > 0:
            raise ValueError(f"scene_scale: expected the object's radius in world units (> 0), got {scene_scale}")
        if total_iterations < 1 or n_intervals < 1:
            raise ValueError(
                f"expected total_iterations >= 1 and n_intervals >= 1, got {total_iterations} and {n_intervals}"
            )
        self.cfg = cfg
        self.scene_scale = float(scene_scale)
        self.total_iterations = total_iterations
        self.n_intervals = n_intervals
        self.texture_only = texture_only
        self.strategy: Any = None
        self.state: dict[str, Any] = {}
        if cfg.strategy == "default":
            from gsplat.strategy import DefaultStrategy  # heavy: gsplat loads only when needed

            # Only gsplat's statistics and growth rule are used: its own refine and reset schedules are
            # pushed past any run (our windows decide), screen-size rules stay off as in gsplat's default.
            self.strategy = DefaultStrategy(
                prune_opa=cfg.prune_opa, grow_grad2d=cfg.grow_grad2d, grow_scale3d=cfg.grow_scale3d,
                prune_scale3d=cfg.prune_scale3d, refine_scale2d_stop_iter=0, refine_start_iter=_NEVER,
                refine_stop_iter=_NEVER + 1, reset_every=_NEVER, refine_every=cfg.refine_every,
            )
            self.state = self.strategy.initialize_state(scene_scale=self.scene_scale)
        elif cfg.strategy == "mcmc":
            from gsplat.strategy import MCMCStrategy

            # MCMC keeps its own refine cadence (relocate + add), run only inside grow windows.
            self.strategy = MCMCStrategy(
                cap_max=cfg.max_gaussians, noise_lr=cfg.mcmc_noise_lr, refine_start_iter=max(cfg.refine_start, 1) - 1,
                refine_stop_iter=_NEVER, refine_every=cfg.refine_every, min_opacity=cfg.prune_opa,
            )
            self.state = self.strategy.initialize_state()
        self.n_grown = 0  # totals over the run, for logs and checkpoints
        self.n_pruned = 0
        self.n_resets = 0
        # Quantiles of the mean screen-space gradient at the last refine (DefaultStrategy), to calibrate
        # grow_grad2d from a real run: {"p50", "p90", "p99"}; empty before the first refine.
        self.grad2d_quantiles: dict[str, float] = {}

    # -- schedule ---------------------------------------------------------------------------------

    def window(self, iteration: int) -> DensifyWindow:
        if self.cfg.strategy == "none":
            return "frozen"
        return densify_window(iteration, self.total_iterations, self.n_intervals, self.texture_only)

    def resets_at(self, iteration: int) -> bool:
        """Whether ``post_backward(iteration)`` clamps the opacities."""
        return (
            self.cfg.strategy == "default" and self.cfg.reset_at_block_boundaries
            and self.window(iteration) == "grow"
            and is_reset_step(iteration, self.total_iterations, self.n_intervals, self.cfg.refine_every)
        )

    # -- hooks ------------------------------------------------------------------------------------

    def check(self, params: Params, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """gsplat's ``check_sanity``: one single-group optimizer per trainable parameter, the four core keys
        (a texture-only stage trains colours alone and never densifies: nothing to check)."""
        if self.strategy is None or self.texture_only:
            return
        self._check_device(params)
        try:
            self.strategy.check_sanity(params, optimizers)
        except AssertionError as err:
            raise ValueError(
                "densify: params/optimizers do not have the layout gsplat strategies need (one single-group "
                f"optimizer per trainable per-Gaussian tensor; means, scales, quats, opacities): {err}"
            ) from err

    def pre_backward(
        self, params: Params, optimizers: dict[str, torch.optim.Optimizer], iteration: int, info: dict
    ) -> None:
        """Before ``loss.backward()``: keep the gradient of ``info["means2d"]`` where growth needs it."""
        if self.cfg.strategy == "default" and self.window(iteration) == "grow":
            self.strategy.step_pre_backward(params, optimizers, self.state, iteration, info)

    def post_backward(
        self, params: Params, optimizers: dict[str, torch.optim.Optimizer], iteration: int, info: dict,
        lr_means: float,
    ) -> dict[str, int]:
        """After the optimizers' ``step()``: accumulate, grow, prune and reset as the window allows.

        ``info`` is the renderer's meta of this iteration (gsplat's, or the torch backend's look-alike;
        packed=False); ``lr_means`` is the current means learning rate (MCMC's noise scale).
        Returns {"grown", "pruned", "count"}: Gaussians added and removed by this call, and the count after.
        """
        window = self.window(iteration)
        grown = pruned = 0
        if window != "frozen":
            self._check_device(params)
            refine = is_refine_step(iteration, self.cfg.refine_start, self.cfg.refine_every)
            if window == "grow" and self.cfg.strategy == "default":
                self._accumulate(params, optimizers, iteration, info)
                if refine:
                    grown = self._grow(params, optimizers, iteration)
                    pruned = self._prune(params, optimizers)
                    self.state["grad2d"].zero_()
                    self.state["count"].zero_()
            elif window == "grow":  # mcmc: its own relocate/add cadence (refine_start/every) and noise
                before = len(params["means"])
                self.strategy.step_post_backward(params, optimizers, self.state, iteration, info, lr=lr_means)
                grown = len(params["means"]) - before
            elif refine:  # prune window: gsplat has no prune-only mode; remove with its own op
                pruned = self._prune(params, optimizers)
            if self.resets_at(iteration):
                from gsplat.strategy.ops import reset_opa  # heavy: gsplat loads only when needed

                reset_opa(params=params, optimizers=optimizers, state={}, value=self.cfg.opacity_reset_value)
                self.n_resets += 1
        self.n_grown += grown
        self.n_pruned += pruned
        return {"grown": grown, "pruned": pruned, "count": len(params["means"])}

    # -- checkpoint -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Running screen-space statistics (DefaultStrategy) and the run's totals."""
        return {
            "strategy": self.cfg.strategy,
            "grad2d": _clone(self.state.get("grad2d")),
            "count": _clone(self.state.get("count")),
            "n_grown": self.n_grown,
            "n_pruned": self.n_pruned,
            "n_resets": self.n_resets,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["strategy"] != self.cfg.strategy:
            raise ValueError(
                f"densify state is for strategy {state['strategy']!r}, but this run uses {self.cfg.strategy!r}"
            )
        if self.cfg.strategy == "default":
            self.state["grad2d"] = _clone(state["grad2d"])
            self.state["count"] = _clone(state["count"])
        self.n_grown = int(state["n_grown"])
        self.n_pruned = int(state["n_pruned"])
        self.n_resets = int(state["n_resets"])

    # -- internals --------------------------------------------------------------------------------

    def _check_device(self, params: Params) -> None:
        device = params["means"].device
        if self.cfg.strategy == "mcmc" and device.type != "cuda":
            raise ValueError(
                f"densify.strategy='mcmc' needs CUDA tensors (gsplat's relocation, sampling and position noise "
                f"are CUDA kernels), got Gaussians on {device}; use densify.strategy='default' on CPU"
            )

    def _per_gaussian_state(self) -> dict[str, Any]:
        """The strategy state that ops must resize with the Gaussians (MCMC's binomial table is not)."""
        return self.state if self.cfg.strategy == "default" else {}

    def _accumulate(
        self, params: Params, optimizers: dict[str, torch.optim.Optimizer], iteration: int, info: dict
    ) -> None:
        """Add this iteration's screen-space gradients to gsplat's statistics (its schedule never refines)."""
        means2d = info.get("means2d")
        if means2d is None or not (means2d.is_leaf or means2d.retains_grad) or means2d.grad is None:
            raise RuntimeError(
                "densify: info['means2d'] has no gradient; call pre_backward(...) on the render's meta before "
                "loss.backward(), and post_backward(...) with the same meta after it"
            )
        if self.state["grad2d"] is not None:
            if self.state["grad2d"].shape[0] != len(params["means"]):
                # The set changed outside the densifier (e.g. a resized checkpoint): restart the statistics.
                self.state["grad2d"] = self.state["count"] = None
            else:  # a loaded checkpoint may sit on the CPU
                self.state["grad2d"] = self.state["grad2d"].to(means2d.device)
                self.state["count"] = self.state["count"].to(means2d.device)
        self.strategy.step_post_backward(params, optimizers, self.state, iteration, info, packed=False)

    def _grow(self, params: Params, optimizers: dict[str, torch.optim.Optimizer], iteration: int) -> int:
        """gsplat's duplicate/split rule on the accumulated gradients, limited to the room left under the cap."""
        before = len(params["means"])
        grads = self.state["grad2d"] / self.state["count"].clamp_min(1)
        seen = grads[self.state["count"] > 0]
        if seen.numel() > 0:
            q = torch.quantile(seen.float()[:1 << 24], torch.tensor([0.5, 0.9, 0.99], device=seen.device))
            self.grad2d_quantiles = {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}
        drop = over_cap(grads, self.cfg.grow_grad2d, self.cfg.max_gaussians - before)
        self.state["grad2d"][drop] = 0.0
        # Each candidate adds one Gaussian (a duplicate, or a split of one into two).
        self.strategy._grow_gs(params, optimizers, self.state, iteration)
        return len(params["means"]) - before

    def _prune(self, params: Params, optimizers: dict[str, torch.optim.Optimizer]) -> int:
        from gsplat.strategy.ops import remove  # heavy: gsplat loads only when needed

        mask = prune_mask(params, self.cfg.prune_opa, self.cfg.prune_scale3d * self.scene_scale)
        n = int(mask.sum())
        if n > 0:
            remove(params=params, optimizers=optimizers, state=self._per_gaussian_state(), mask=mask)
        return n


def _clone(value: Optional[Tensor]) -> Optional[Tensor]:
    return None if value is None else value.detach().clone()
