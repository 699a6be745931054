"""Data-parallel training over several devices (Lightning's DDP launcher and process group).

Each rank owns its own particles (``particles[rank::world]``), which differ between ranks and change
size under densification, so the module is not wrapped in ``DistributedDataParallel``. What ranks
share is reduced explicitly: ε_φ's gradients are averaged before its optimizer steps, and the
rectifier's pose statistics use the mean over ranks of each batch's probabilities.
"""

from __future__ import annotations

from typing import Iterable

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn


class ParticleDDPStrategy(DDPStrategy):
    """DDP's launcher, process group and reductions, without wrapping the module (see module docstring)."""

    def configure_ddp(self) -> None:
        pass


def make_strategy(devices: int, device_type: str):
    """Lightning strategy for ``devices`` processes: gloo on CPU, NCCL on CUDA."""
    if devices == 1:
        return "auto"
    return ParticleDDPStrategy(process_group_backend="nccl" if device_type == "cuda" else "gloo")


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter], strategy) -> None:
    """Mean of each parameter's gradient over ranks, in one flat reduction."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = strategy.reduce(flat, reduce_op="mean")
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
