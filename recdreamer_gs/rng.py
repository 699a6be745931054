"""Random streams of a run: every seed derives from the run's seed through :func:`derive_seed`.

Each consumer of randomness (the initial Gaussians of particle i, the camera batches of stage k on
rank r, the noise of rank r, the diffusion times) owns a named stream, so that adding a consumer or a
particle never shifts another stream, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def derive_seed(seed: int, stream: str, *index: int) -> int:
    """A 63-bit seed for ``stream`` (and optional indices such as particle, stage, rank, iteration)."""
    text = ":".join([str(seed), stream, *map(str, index)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, stream: str, *index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, *index))


def uniform(lo: float, hi: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws uniform in [lo, hi) from ``generator`` (on the CPU)."""
    return lo + (hi - lo) * torch.rand(n, generator=generator)
