"""Evaluation metrics of the paper (appendix C.1): pEnt, cEnt and the CLIP score.

- pEnt / cEnt (Eq. 33, "categorical entropy"): render ``n_v = 10`` views at uniform azimuths, classify
  each, average the class probabilities over the views and take the entropy of that mean. We report
  it normalised by ``log C`` so that 1 is a uniform pose histogram and 0 a single pose (the paper's
  Eq. 33 writes ``(1/C) sum p log p``; only the ranking matters there, and the normalised form is
  comparable across class counts). pEnt uses our pose classifier (:mod:`recdreamer_gs.pose`), cEnt a
  CLIP zero-shot classifier over "PROMPT, from front view" / "from side view" / "from back view".
- CLIP score: mean cosine similarity x 100 between the image and prompt embeddings (the usual
  convention; higher means better text alignment). The paper's table reports the negative cosine.

Images for the CLIP metrics are renders in [0, 1] (``RenderOut.rgb``); the pose classifier takes
[-1, 1], so pEnt is ``pose_entropy(classifier(rgb * 2 - 1))``.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs import hub
from recdreamer_gs.cameras import Cameras, preview_orbit
from recdreamer_gs.gaussians import read_gaussians
from recdreamer_gs.render import ensure_backend, render

if TYPE_CHECKING:
    from recdreamer_gs.config import CameraConfig

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
CLIP_VIEW_SUFFIXES = (", from front view", ", from side view", ", from back view")  # cEnt classes (appendix C.1.2)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (shared by HF CLIP checkpoints)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------
# Entropies
# --------------------------------------------------------------------------------------------


def pent_views(n: int = 10) -> Float[Tensor, "n"]:
    """Azimuths (degrees, in [-180, 180)) of ``n`` uniform views starting at the front, as ``cameras.orbit``."""
    if n < 1:
        raise ValueError(f"n: expected >= 1 views, got {n}")
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return torch.remainder(az + 180.0, 360.0) - 180.0


def metric_cameras(camera: "CameraConfig", resolution: int, n_views: int = 10) -> "Cameras":
    """The views pEnt, cEnt and the CLIP score are measured on, by ``run`` and ``eval`` alike: ``n_views``
    uniform azimuths from the front (:func:`pent_views`) on the preview orbit of ``camera`` (its
    ``preview_elevation``, the mean of its radius and fovy ranges), ``resolution`` pixels square."""
    return preview_orbit(camera, n_views, resolution)


def normalised_entropy(p: Float[Tensor, "C"]) -> float:
    """-sum p log p / log C for a probability vector (0 log 0 = 0)."""
    if p.ndim != 1 or p.shape[0] < 2:
        raise ValueError(f"p: expected a probability vector with at least 2 entries, got shape {tuple(p.shape)}")
    p = p.double().clamp_min(0)
    p = p / p.sum()
    h = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum()
    return float(h / math.log(p.shape[0]))


def pose_entropy(probs: Float[Tensor, "V C"]) -> float:
    """pEnt: normalised entropy of the view-averaged class probabilities (Eq. 33); 1 = uniform poses."""
    if probs.ndim != 2 or probs.shape[0] < 1:
        raise ValueError(f"probs: expected [V, C] class probabilities per view, got shape {tuple(probs.shape)}")
    return normalised_entropy(probs.detach().float().mean(dim=0))


# --------------------------------------------------------------------------------------------
# CLIP (pure functions of a transformers CLIPModel + tokenizer)
# --------------------------------------------------------------------------------------------


def _features(out) -> Tensor:
    """transformers < 5 returns the projected embeddings, 5 a ModelOutput with them as pooler_output."""
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_preprocess(
    images: Float[Tensor, "B 3 H W"], size: int,
    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
) -> Float[Tensor, "B 3 S S"]:
    """[0, 1] images -> CLIP input: shortest side to ``size`` (bicubic), centre crop, normalise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images: expected values in [0, 1] (renders), got range [{lo:.3f}, {hi:.3f}]")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = images.float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def clip_image_embeddings(
    clip_model, images: Float[Tensor, "B 3 H W"],
    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, batch_size: int = 32,
) -> Float[Tensor, "B E"]:
    """Unit-norm CLIP image embeddings of [0, 1] images."""
    p = next(clip_model.parameters())
    size = int(clip_model.config.vision_config.image_size)
    outs = []
    for chunk in images.split(batch_size):
        x = clip_preprocess(chunk.to(p.device), size, mean, std).to(p.dtype)
        outs.append(F.normalize(_features(clip_model.get_image_features(pixel_values=x)).float(), dim=-1))
    return torch.cat(outs)


@torch.no_grad()
def clip_text_embeddings(clip_model, tokenizer, texts: Sequence[str]) -> Float[Tensor, "N E"]:
    """Unit-norm CLIP text embeddings (padded, truncated to the tokenizer's length)."""
    device = next(clip_model.parameters()).device
    tok = tokenizer(list(texts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt")
    tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
    return F.normalize(_features(clip_model.get_text_features(**tok)).float(), dim=-1)


def _mean_std(processor) -> tuple[Sequence[float], Sequence[float]]:
    if processor is None:
        return CLIP_MEAN, CLIP_STD
    return tuple(getattr(processor, "image_mean", CLIP_MEAN)), tuple(getattr(processor, "image_std", CLIP_STD))


@torch.no_grad()
def clip_view_probabilities(
    clip_model, tokenizer, images: Float[Tensor, "V 3 H W"], prompt: str, processor=None
) -> Float[Tensor, "V 3"]:
    """Per view, softmax over the three directional prompts (front, side, back) of CLIP's scaled cosines."""
    mean, std = _mean_std(processor)
    img = clip_image_embeddings(clip_model, images, mean, std)
    txt = clip_text_embeddings(clip_model, tokenizer, [prompt + s for s in CLIP_VIEW_SUFFIXES])
    scale = clip_model.logit_scale.exp().float()
    return torch.softmax(scale * img @ txt.T, dim=-1)


def clip_view_entropy(
    clip_model, tokenizer, images: Float[Tensor, "V 3 H W"], prompt: str, processor=None
) -> float:
    """cEnt: normalised entropy (/ log 3) of the view-averaged CLIP front/side/back probabilities."""
    return pose_entropy(clip_view_probabilities(clip_model, tokenizer, images, prompt, processor))


def clip_score(clip_model, tokenizer, images: Float[Tensor, "B 3 H W"], prompt: str, processor=None) -> float:
    """Mean over images of 100 x cos(image embedding, prompt embedding)."""
    mean, std = _mean_std(processor)
    img = clip_image_embeddings(clip_model, images, mean, std)
    txt = clip_text_embeddings(clip_model, tokenizer, [prompt])
    return float(100.0 * (img @ txt.T).mean())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class ClipScorer:
    """A frozen CLIP model with its tokenizer and normalisation: ``clip_score`` and ``view_entropy`` (cEnt)."""

    def __init__(self, model, tokenizer, name: str, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.image_mean = tuple(mean)
        self.image_std = tuple(std)

    @classmethod
    def load(cls, model: str = DEFAULT_CLIP_MODEL, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "ClipScorer":
        """Load CLIPModel + CLIPTokenizer (Hub id or local folder).

        Raises:
            ModelUnavailable: the folder is missing or incomplete, the model cannot be downloaded, or it does
                not load.
        """
        from transformers import CLIPModel, CLIPTokenizer  # heavy: transformers loads only when needed

        spec = hub.ModelSpec(hub.CLIP, model)
        where = hub.ensure(spec)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = where.folder / "preprocessor_config.json"
        if pre.is_file():  # a fine-tuned CLIP may normalise differently
            conf = json.loads(pre.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        try:
            net = CLIPModel.from_pretrained(where.folder, variant=where.variant(), local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(where.folder, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
            raise hub.load_error(spec, err) from err
        return cls(net.to(device=device, dtype=dtype), tokenizer, model, mean, std)

    def clip_score(self, images: Float[Tensor, "B 3 H W"], prompt: str) -> float:
        """100 x mean cosine between [0, 1] images and ``prompt``."""
        return clip_score(self.model, self.tokenizer, images, prompt, self)

    def view_probabilities(self, images: Float[Tensor, "V 3 H W"], prompt: str) -> Float[Tensor, "V 3"]:
        return clip_view_probabilities(self.model, self.tokenizer, images, prompt, self)

    def view_entropy(self, images: Float[Tensor, "V 3 H W"], prompt: str) -> float:
        """cEnt of [0, 1] renders at uniform azimuths (:func:`pent_views`)."""
        return clip_view_entropy(self.model, self.tokenizer, images, prompt, self)


@torch.no_grad()
def classify_views(rgb: Float[Tensor, "V 3 H W"], classify: Callable[..., Tensor]) -> Float[Tensor, "V C"]:
    """Pose probabilities (on the CPU) of renders in [0, 1] on white, by ``classify(images in [-1, 1], background)``."""
    return classify(rgb * 2 - 1, torch.ones(rgb.shape[0], 3, device=rgb.device)).float().cpu()


def pose_scores(probs: Sequence[Float[Tensor, "V C"]], class_names: Sequence[str]) -> dict[str, Any]:
    """pEnt (the mean over view sets, one set per particle), the pooled pose histogram, and with several sets
    each set's pEnt as ``pEnt_per_particle``."""
    pents = [round(pose_entropy(p), 4) + 0.0 for p in probs]  # + 0.0: no "-0.0"
    mean = torch.stack(list(probs)).mean(dim=(0, 1))
    out: dict[str, Any] = {
        "pEnt": round(sum(pents) / len(pents), 4),
        "pose_histogram": {n: round(float(v), 4) for n, v in zip(class_names, mean.tolist())},
    }
    if len(pents) > 1:
        out["pEnt_per_particle"] = pents
    return out


@torch.no_grad()
def view_scores(
    rgb: Float[Tensor, "V 3 H W"], classify: Optional[Callable[..., Tensor]] = None, class_names: Sequence[str] = (),
    clip: Optional[ClipScorer] = None, prompt: str = "",
) -> dict[str, Any]:
    """pEnt and the pose histogram (with a pose classifier ``classify(images in [-1, 1], background)``), cEnt
    and the CLIP score (with a CLIP scorer) of renders in [0, 1] on white from :func:`metric_cameras`."""
    out: dict[str, Any] = {}
    if classify is not None:
        out.update(pose_scores([classify_views(rgb, classify)], class_names))
    if clip is not None:
        out["cEnt"] = round(clip.view_entropy(rgb, prompt), 4)
        out["clip_score"] = round(clip.clip_score(rgb, prompt), 4)
    return out


def evaluate_ply(ply, cfg, device: torch.device, pose=None, clip: Optional[ClipScorer] = None, prompt: str = "",
                 frame: str = "viewer", resolution: Optional[int] = None) -> dict[str, Any]:
    """``recdreamer-gs eval``: :func:`view_scores` of a 3DGS PLY on the views a run with config ``cfg``
    scores (:func:`metric_cameras`, its render settings); ``pose`` is a ``PoseSetup``. The orbit is the
    classifier's own when it has one (``PoseSetup.metric_camera``: the synthetic prior's reference views,
    whichever prior made the PLY), else the config's. The render size is the classifier's input size if it
    has one, else ``resolution``, else ``cfg.camera.resolution``."""
    r = cfg.render
    ensure_backend(r.backend, device)
    gaussians = read_gaussians(ply, frame, device)
    size = (pose.image_size if pose is not None else None) or resolution or cfg.camera.resolution
    camera = (pose.metric_camera if pose is not None else None) or cfg.camera
    cameras = metric_cameras(camera, size).to(device)
    with torch.no_grad():
        rgb = render(gaussians, cameras, torch.ones(len(cameras), 3, device=device), backend=r.backend,
                     eps2d=r.eps2d, near_plane=r.near_plane).rgb
    if pose is None:
        return view_scores(rgb, clip=clip, prompt=prompt)
    return view_scores(rgb, pose.metric_classifier, pose.class_names, clip, prompt)
