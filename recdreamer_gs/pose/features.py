"""Frozen DINOv2 feature extractor for the pose classifier (docs/pose-classifier.md, paper appendix B.1.4).

:class:`DinoFeatures` wraps a transformers DINOv2 model (with registers by default, ViT-S/14 as in the
release's ``dinov2_vits14_reg``). An image batch in [-1, 1] is mapped to [0, 1], ImageNet-normalised,
resized to ``input_size`` (560: a 40x40 grid of 14-pixel patches) and passed through the model; the
output is the final-layernorm [CLS] token and the patch tokens (registers dropped) resized to a
``grid_size`` x ``grid_size`` grid (16). Templates and classifier inputs go through the same
preprocessing (the release feeds raw [-1, 1] decodes but ImageNet-normalised templates; we do not copy
that mismatch of the reference release). Everything is differentiable with respect to the input images.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs import hub

DEFAULT_FEATURE_MODEL = "facebook/dinov2-with-registers-small"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(
    images: Float[Tensor, "B 3 H W"], input_size: int,
    mean: Optional[Float[Tensor, "1 3 1 1"]] = None, std: Optional[Float[Tensor, "1 3 1 1"]] = None,
) -> Float[Tensor, "B 3 S S"]:
    """[-1, 1] images -> ImageNet-normalised ``input_size`` squares (bilinear; antialiased when shrinking).

    ``mean``/``std`` on the images' device spare a host-to-device copy (and its wait) per call."""
    x = (images.float() + 1.0) * 0.5
    if mean is None or std is None:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    return x


class DinoFeatures(nn.Module):
    """Frozen DINOv2: ``forward(images in [-1,1]) -> (cls [B, D], patches [B, G, G, D])``.

    Outputs are float32 whatever the model's dtype, so the classifier maths runs in full precision.
    """

    def __init__(self, model: nn.Module, name: str, input_size: int = 560, grid_size: int = 16):
        super().__init__()
        config = model.config
        self.patch_size = int(config.patch_size)
        if input_size % self.patch_size != 0:
            raise ValueError(f"input_size: expected a multiple of the patch size {self.patch_size}, got {input_size}")
        self.model = model.requires_grad_(False).eval()
        self.name = name
        self.input_size = int(input_size)
        self.grid_size = int(grid_size)
        self.dim = int(config.hidden_size)
        # DINOv2 without registers has no such field: then only the [CLS] token precedes the patches.
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> "DinoFeatures":
        # Always eval: frozen, and DINOv2 has no train-time behaviour we want (drop-path).
        return super().train(False)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_FEATURE_MODEL,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        input_size: int = 560,
        grid_size: int = 16,
    ) -> "DinoFeatures":
        """Load a DINOv2 model with ``AutoModel.from_pretrained`` (Hub id or local folder, through
        :mod:`recdreamer_gs.hub`) and freeze it.

        Raises:
            ModelUnavailable: the folder is missing or incomplete, the model cannot be downloaded (offline,
                not found, network), or the weights do not load.
        """
        from transformers import AutoModel  # heavy: transformers loads only when needed

        spec = hub.ModelSpec(hub.DINOV2, model)
        where = hub.ensure(spec)
        try:
            net = AutoModel.from_pretrained(where.folder, variant=where.variant(), local_files_only=True)
        except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
            raise hub.load_error(spec, err) from err
        if not hasattr(net.config, "patch_size") or not hasattr(net.config, "hidden_size"):
            raise hub.unavailable(spec, f"expected a DINOv2 vision transformer, got {type(net).__name__}")
        net = net.to(device=device, dtype=dtype)
        return cls(net, name=model, input_size=input_size, grid_size=grid_size)

    def forward(
        self,
        images: Float[Tensor, "B 3 H W"],
        input_size: Optional[int] = None,
        grid_size: Optional[int] = None,
    ) -> tuple[Float[Tensor, "B D"], Float[Tensor, "B G G D"]]:
        """[CLS] token and the patch-token grid resized to ``grid_size`` (area average), float32.

        ``input_size`` / ``grid_size`` override the values given at load time (the classifier passes
        its own config's values).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        size = int(input_size or self.input_size)
        grid = int(grid_size or self.grid_size)
        if size % self.patch_size != 0:
            raise ValueError(f"input_size: expected a multiple of the patch size {self.patch_size}, got {size}")
        x = preprocess(images.to(self.device), size, self.mean, self.std).to(self.dtype)
        tokens = self.model(pixel_values=x).last_hidden_state.float()  # [B, 1 + R + N, D], after the final norm
        n = size // self.patch_size
        cls_tok = tokens[:, 0]
        patches = tokens[:, 1 + self.num_register_tokens:]
        if patches.shape[1] != n * n:
            raise RuntimeError(f"expected {n * n} patch tokens from DINOv2 at {size}px, got {patches.shape[1]}")
        grid_feats = patches.reshape(-1, n, n, self.dim).permute(0, 3, 1, 2)
        if n != grid:
            # Area averaging (40 -> 16 is a factor 2.5): every patch contributes, unlike sparse bilinear taps.
            grid_feats = F.interpolate(grid_feats, size=(grid, grid), mode="area")
        return cls_tok, grid_feats.permute(0, 2, 3, 1).contiguous()
