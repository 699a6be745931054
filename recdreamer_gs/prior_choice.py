"""Which prior a run uses (``prior.kind``: auto | synthetic | sd), loading it, and the config as that prior runs
it; the pose classifier of ``classify``/``eval``."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from recdreamer_gs import hub
from recdreamer_gs.config import RunConfig
from recdreamer_gs.devices import resolve_device
from recdreamer_gs.doctor import cuda_mismatch
from recdreamer_gs.errors import RunError
from recdreamer_gs.pose.setup import PoseSetup, folder_pose_setup
from recdreamer_gs.priors.base import Prior
from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior
from recdreamer_gs.priors.synthetic import SyntheticPrior


@dataclass
class PriorChoice:
    prior: Prior
    kind: str  # the prior.kind that was chosen ("synthetic" or "sd"; never "auto")
    notice: Optional[str]  # shown to the user when auto fell back to the synthetic prior
    load_s: float = 0.0  # seconds spent loading the prior (downloads excluded)


def synthetic_notice(reason: str) -> str:
    return (
        f"Using the offline synthetic prior because {reason}. It distils a built-in reference object, "
        "not your prompt. For real text-to-3D run on a CUDA GPU with Stable Diffusion weights (downloaded on "
        "first use; `recdreamer-gs models --download` fetches them ahead, or --model PATH to a local folder)."
    )


def build_prior(cfg: RunConfig, device: torch.device, starting_shape: bool = False) -> PriorChoice:
    """The prior the config asks for; ``auto`` picks SD on a CUDA device when its weights can be had.

    Before SD loads, every model of the run (SD, DINOv2, CLIP, a separate ε_φ UNet, and Shap-E when
    ``starting_shape`` says that a fresh run makes one) is made local: all are checked first and then the
    missing ones downloaded, so a model that cannot be had stops the run with one
    :class:`recdreamer_gs.hub.ModelUnavailable` before gigabytes are fetched or loaded.
    """
    kind, notice = cfg.prior.kind, None
    if kind == "auto":
        kind, notice = _auto_prior(cfg, device)
    if kind == "synthetic":
        return PriorChoice(SyntheticPrior(cfg.prior.synthetic, device), kind, notice)
    hub.prepare(run_models(cfg, cuda=device.type == "cuda", starting_shape=starting_shape))
    start = time.perf_counter()
    sd = cfg.prior.sd
    # The tiny decoder decodes x̂0 for the pose classifier only (StableDiffusionPrior.models lists it likewise).
    tiny = sd.tiny_decoder if cfg.needs().pose_classifier else None
    prior = StableDiffusionPrior.load(sd.model, cfg.prompt, sd.aux_prompt, device, sd.dtype, sd.latent_resolution,
                                      tiny_decoder=tiny, channels_last=cfg.perf.channels_last and device.type == "cuda")
    return PriorChoice(prior, kind, notice, time.perf_counter() - start)


def _auto_prior(cfg: RunConfig, device: torch.device) -> tuple[str, Optional[str]]:
    """``auto``: SD on CUDA when its weights are local or can be downloaded now; else synthetic and why."""
    if device.type != "cuda":
        asked = cfg.train.device == "cpu"
        hint = None if asked else cuda_mismatch()
        reason = "--device cpu was asked for" if asked else "no CUDA device is in use"
        return "synthetic", synthetic_notice(reason + (f" ({hint})" if hint else ""))
    sd = StableDiffusionPrior.models(cfg, cuda=True)[0]
    try:
        hub.plan(sd)
    except hub.ModelUnavailable as err:
        return "synthetic", synthetic_notice(f"the Stable Diffusion weights {sd.source!r} cannot be had: {err.cause}")
    return "sd", None


def prior_class(cfg: RunConfig, cuda: bool) -> type[Prior]:
    """The prior class a run of ``cfg`` uses: Stable Diffusion for ``prior.kind`` sd, or auto on a CUDA device
    (``build_prior`` may still fall back to the synthetic prior when the weights cannot be had)."""
    if cfg.prior.kind == "sd" or (cfg.prior.kind == "auto" and cuda):
        return StableDiffusionPrior
    return SyntheticPrior


def run_models(cfg: RunConfig, cuda: bool = True, starting_shape: bool = True) -> list[hub.ModelSpec]:
    """Every model a run of ``cfg`` loads, the prior's first (``Prior.models``); ``cuda``: the run uses a CUDA
    device; ``starting_shape``: a fresh run (a resumed one makes no starting shape). Then Shap-E when
    ``gaussians.init`` is shap-e and CLIP when ``output.clip_model`` is set."""
    specs = prior_class(cfg, cuda).models(cfg, cuda)
    if starting_shape and cfg.gaussians.init == "shap-e":
        shap_e = cfg.gaussians.shap_e
        specs.append(hub.ModelSpec(hub.SHAP_E, shap_e.model, hub.half_weights(shap_e.dtype, cuda)))
    if cfg.output.clip_model:
        specs.append(hub.ModelSpec(hub.CLIP, cfg.output.clip_model))
    return specs


def effective_config(cfg: RunConfig, choice: PriorChoice, device: torch.device) -> RunConfig:
    """The config that runs: ``auto`` prior and device resolved, the prior's own settings applied
    (``Prior.specialise``). Idempotent: the run folder's config.yaml runs the same again."""
    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, kind=choice.kind),
                              train=dataclasses.replace(cfg.train, device=device.type))
    cfg = choice.prior.specialise(cfg)
    cfg.validate()
    return cfg


def scoring_pose_setup(cfg: RunConfig, from_templates: bool
                       ) -> tuple[RunConfig, torch.device, PoseSetup, Optional[str]]:
    """The pose classifier of ``classify``/``eval``: DINOv2 on the template folder of ``cfg`` (no prior
    loads), or the one the prior brings (``--prior synthetic``). Returns the config as the prior runs it
    (``effective_config``), the device, the classifier and the prior's notice (see ``build_prior``)."""
    device = resolve_device(cfg.train.device)
    if from_templates:
        return cfg, device, folder_pose_setup(cfg.distill.rectifier, device), None
    choice = build_prior(cfg, device)
    cfg = effective_config(cfg, choice, device)
    pose = choice.prior.pose_setup(cfg, need=False)
    if pose.classifier is None:
        raise RunError(f"the prior {choice.prior.name!r} brings no pose classifier of its own: give --templates DIR")
    return cfg, device, pose, choice.notice
