"""Template augmentations for the pose classifier (plain torch; images in [0, 1], one draw per image).

Template features are averaged over augmented copies (docs/pose-classifier.md, "Templates"): colour
jitter, pixel noise and grayscale change appearance but keep patches in place, so patch features are
averaged over those; [CLS] features also see random shifts, zooms and shears.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.config import PoseClassifierConfig
from recdreamer_gs.rng import uniform

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _gray(x: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 1 H W"]:
    return torch.einsum("bchw,c->bhw", x, _LUMA.to(x)).unsqueeze(1)


def color_jitter(
    x: Float[Tensor, "B 3 H W"], brightness: float, contrast: float, saturation: float, hue: float,
    generator: torch.Generator,
) -> Float[Tensor, "B 3 H W"]:
    """Brightness, contrast, saturation and hue jitter (fixed order), clamped to [0, 1] after each."""
    b = x.shape[0]
    col = lambda t: t.to(x).view(b, 1, 1, 1)  # noqa: E731
    x = (x * col(uniform(1 - brightness, 1 + brightness, b, generator))).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + (x - mean) * col(uniform(1 - contrast, 1 + contrast, b, generator))).clamp(0, 1)
    g = _gray(x)
    x = (g + (x - g) * col(uniform(1 - saturation, 1 + saturation, b, generator))).clamp(0, 1)
    # Hue: rotate the chroma plane (I, Q) of YIQ; a full turn is 2*pi.
    angle = 2 * math.pi * uniform(-hue, hue, b, generator)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = torch.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ  # [b, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m.to(x), x).clamp(0, 1)


def random_noise(
    x: Float[Tensor, "B 3 H W"], std: float, p: float, generator: torch.Generator
) -> Float[Tensor, "B 3 H W"]:
    """Add N(0, std²) pixel noise to each image with probability p."""
    b = x.shape[0]
    on = (torch.rand(b, generator=generator) < p).to(x).view(b, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator).to(x)
    return (x + on * std * noise).clamp(0, 1)


def random_grayscale(x: Float[Tensor, "B 3 H W"], p: float, generator: torch.Generator) -> Float[Tensor, "B 3 H W"]:
    """Replace each image by its luma (3 equal channels) with probability p."""
    b = x.shape[0]
    on = (torch.rand(b, generator=generator) < p).to(x).view(b, 1, 1, 1)
    return on * _gray(x).expand_as(x) + (1 - on) * x


def random_affine(
    x: Float[Tensor, "B 3 H W"], translate: float, scale: tuple[float, float], shear_deg: float,
    generator: torch.Generator,
) -> Float[Tensor, "B 3 H W"]:
    """Random shift, zoom and horizontal shear; the border colour extends into uncovered areas."""
    b = x.shape[0]
    s = uniform(scale[0], scale[1], b, generator)
    shear = torch.tan(torch.deg2rad(uniform(-shear_deg, shear_deg, b, generator)))
    t = uniform(-2 * translate, 2 * translate, 2 * b, generator).view(b, 2)  # grid coords span [-1, 1]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 1] = 1 / s, shear / s, 1 / s  # sampling matrix = inverse zoom
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def photometric_augment(
    x: Float[Tensor, "B 3 H W"], cfg: PoseClassifierConfig, generator: torch.Generator
) -> Float[Tensor, "B 3 H W"]:
    """Colour jitter, pixel noise and random grayscale: appearance changes that keep patches in place."""
    x = color_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, generator)
    x = random_noise(x, cfg.noise_std, cfg.noise_p, generator)
    return random_grayscale(x, cfg.grayscale_p, generator)
