"""Which torch device a run uses (``train.device``: auto | cpu | cuda)."""

from __future__ import annotations

import torch

from recdreamer_gs.errors import RunError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu (synthetic prior) "
                       "or run on a machine with an NVIDIA GPU and a CUDA build of torch")
    return torch.device(device)
