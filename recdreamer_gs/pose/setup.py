"""The pose classifier a run uses (or `classify`/`eval`): what it needs and how the DINOv2 one is built.

A prior decides which classifier it comes with (:meth:`recdreamer_gs.priors.base.Prior.pose_setup`):
the synthetic prior brings its own template matcher; Stable Diffusion uses the DINOv2 classifier built
here from a template folder or from templates generated with the prior.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.config import CameraConfig, ConfigError, RectifierConfig
from recdreamer_gs.pose.classifier import PoseClassifier
from recdreamer_gs.pose.features import DinoFeatures
from recdreamer_gs.pose.templates import load_template_folder, read_image

# A pose classifier on images in [-1, 1] (and the solid background of each): probabilities over the
# pose classes, differentiable in the images.
Classifier = Callable[[Float[Tensor, "B 3 H W"], Optional[Float[Tensor, "B 3"]]], Float[Tensor, "B C"]]

CLASSIFIER_FILE = "pose_classifier.pt"  # the built classifier in a run folder (PoseClassifier.save)


@dataclass
class PoseSetup:
    classifier: Optional[Classifier]  # the differentiable classifier the rectifier uses (None: no classifier)
    class_names: tuple[str, ...]
    templates: Optional[dict[str, list[Tensor]]] = None  # template images the classifier was built from
    metric: Optional[Classifier] = None  # classifier for pEnt; None: ``classifier``
    module: Optional[Any] = None  # the PoseClassifier behind ``classifier``, for compiling (DINOv2 only)
    image_size: Optional[int] = None  # square size input images must have (None: any size)
    metric_camera: Optional[CameraConfig] = None  # the orbit pEnt is measured on when ``metric`` only knows some
    # views (the synthetic prior's exact posterior: its reference views); None: the run's own cameras

    @property
    def metric_classifier(self) -> Optional[Classifier]:
        return self.metric or self.classifier

    @torch.no_grad()
    def classify_files(self, paths: list, device: torch.device) -> Tensor:
        """``recdreamer-gs classify``: class probabilities [N, C] of image files (PNG/JPG; alpha over white)."""
        x = torch.stack([read_image(path, 256) for path in paths]).to(device)
        if self.image_size is not None:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        return self.classifier(x, torch.ones(len(paths), 3, device=device))

    def check_pose_control(self, rect: RectifierConfig) -> None:
        """``--pose-control CLASS`` must name one of this classifier's classes."""
        if rect.pose_control and rect.pose_control not in self.class_names:
            raise ConfigError(f"--pose-control {rect.pose_control!r}: expected one of {', '.join(self.class_names)}")


def dino_pose_setup(rect: RectifierConfig, templates: dict[str, list[Tensor]], device: torch.device,
                    timings: Optional[dict] = None) -> PoseSetup:
    """The DINOv2 classifier (paper appendix B.1) built from ``templates``; its DINOv2 comes through hub.py.

    Seconds spent embedding the templates go to ``timings["templates_s"]``.
    """
    features = DinoFeatures.load(rect.classifier.feature_model, device=device)
    start = time.perf_counter()
    cfg = replace(rect.classifier, classes=tuple(templates))
    classifier = PoseClassifier.from_templates(features, templates, cfg).to(device)
    if timings is not None:
        timings["templates_s"] = timings.get("templates_s", 0.0) + time.perf_counter() - start
    setup = _classifier_setup(classifier, templates)
    setup.check_pose_control(rect)
    return setup


def folder_pose_setup(rect: RectifierConfig, device: torch.device) -> PoseSetup:
    """The DINOv2 classifier on the template folder ``rect.templates`` alone (``classify``/``eval`` with
    ``--templates``: no diffusion prior is loaded)."""
    if not rect.templates:
        raise ConfigError("a template folder is needed for the DINOv2 classifier: give --templates DIR")
    return dino_pose_setup(rect, load_template_folder(rect.templates), device)


def saved_pose_setup(rect: RectifierConfig, path: Path, device: torch.device) -> PoseSetup:
    """The DINOv2 classifier a run saved next to its templates (``run --resume``: no template to embed again)."""
    features = DinoFeatures.load(rect.classifier.feature_model, device=device)
    try:
        classifier = PoseClassifier.load(path, features).to(device)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the run's pose classifier ({err}); delete the file to rebuild "
                          "it from the templates") from None
    setup = _classifier_setup(classifier)
    setup.check_pose_control(rect)
    return setup


def _classifier_setup(classifier: PoseClassifier, templates: Optional[dict[str, list[Tensor]]] = None) -> PoseSetup:
    """The set-up of a DINOv2 classifier: the rectifier's pass may be compiled (``module``); pEnt, measured once at
    the end on another number of views, uses the eager pass, which the compiled one would otherwise be compiled
    again for (``dynamic=False``: a new batch size is a new graph)."""
    return PoseSetup(lambda images, background=None: classifier(images), classifier.classes, templates,
                     metric=lambda images, background=None: classifier.scores(images).probs, module=classifier)
