"""Random camera batches for training and the fixed orbit for previews."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from recdreamer_gs.cameras import Cameras, sample_cameras
from recdreamer_gs.config import CameraConfig
from recdreamer_gs.rng import derive_seed


def sample_background(
    mode: Literal["random", "white", "black"], n: int, generator: torch.Generator
) -> torch.Tensor:
    """Solid background colour per view [n, 3]; random colours stop the model painting the background."""
    if mode == "random":
        return torch.rand(n, 3, generator=generator)
    return torch.full((n, 3), 1.0 if mode == "white" else 0.0)


class RandomCameraDataset(Dataset):
    """Item i is the camera batch of iteration ``start + i``: seeded by (seed, iteration), so a resumed
    run sees the same cameras as an uninterrupted one."""

    def __init__(self, cfg: CameraConfig, steps: int, seed: int,
                 background: Literal["random", "white", "black"], start: int = 0, rank: int = 0):
        self.cfg, self.steps, self.seed, self.background, self.start = cfg, steps, seed, background, start
        self.rank = rank  # data-parallel ranks draw different cameras

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        iteration = self.start + index
        g = torch.Generator().manual_seed(derive_seed(self.seed, "cameras", self.rank, iteration))
        cams = sample_cameras(self.cfg, self.cfg.batch_size, g)
        return {
            "c2w": cams.c2w, "fovy": cams.fovy, "azimuth": cams.azimuth, "elevation": cams.elevation,
            "background": sample_background(self.background, self.cfg.batch_size, g),
        }


def cameras_from_batch(batch: dict[str, torch.Tensor], resolution: int) -> Cameras:
    return Cameras(batch["c2w"], batch["fovy"], resolution, resolution, batch["azimuth"], batch["elevation"])


class CameraDataModule(L.LightningDataModule):
    """Training batches are camera batches; there is no image data in text-to-3D."""

    def __init__(self, cfg: CameraConfig, steps: int, seed: int,
                 background: Literal["random", "white", "black"], start: int = 0):
        super().__init__()
        self.dataset = RandomCameraDataset(cfg, steps, seed, background, start)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.dataset.rank = self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=0)
