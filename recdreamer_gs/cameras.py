"""Cameras: OpenGL-style camera-to-world matrices looking at the origin (docs/frames.md).

World frame: right-handed, +y up, object front facing +z. Azimuth 0 puts the camera on +z;
azimuth grows counter-clockwise seen from above (90 deg = camera on +x); elevation is positive
above the horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.config import CameraConfig
from recdreamer_gs.rng import uniform


@dataclass
class Cameras:
    c2w: Float[Tensor, "B 4 4"]  # OpenGL camera-to-world: camera looks down its -z, y up
    fovy: Float[Tensor, "B"]  # vertical field of view, radians
    width: int
    height: int
    azimuth: Float[Tensor, "B"]  # degrees, kept for pose labels and previews
    elevation: Float[Tensor, "B"]  # degrees

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(self.c2w.to(device), self.fovy.to(device), self.width, self.height,
                       self.azimuth.to(device), self.elevation.to(device))

    def __getitem__(self, index: slice | Tensor) -> "Cameras":
        return Cameras(self.c2w[index], self.fovy[index], self.width, self.height,
                       self.azimuth[index], self.elevation[index])

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def focal(self) -> Float[Tensor, "B"]:
        """Focal length in pixels for the vertical field of view."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)


def look_at(
    azimuth_deg: Float[Tensor, "B"], elevation_deg: Float[Tensor, "B"], radius: Float[Tensor, "B"]
) -> Float[Tensor, "B 4 4"]:
    """OpenGL camera-to-world matrices for cameras on a sphere looking at the origin."""
    az = torch.deg2rad(azimuth_deg)
    el = torch.deg2rad(elevation_deg)
    position = torch.stack(
        [radius * torch.cos(el) * torch.sin(az), radius * torch.sin(el), radius * torch.cos(el) * torch.cos(az)],
        dim=-1,
    )
    forward = -position / position.norm(dim=-1, keepdim=True)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, world_up)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4, dtype=position.dtype, device=position.device).repeat(position.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    return c2w


def sample_cameras(cfg: CameraConfig, n: int, generator: torch.Generator) -> Cameras:
    """Random cameras: azimuth, elevation, radius and fovy uniform in the config's ranges."""
    azimuth = uniform(*cfg.azimuth_range, n, generator)
    elevation = uniform(*cfg.elevation_range, n, generator)
    radius = uniform(*cfg.radius_range, n, generator)
    fovy = torch.deg2rad(uniform(*cfg.fovy_range, n, generator))
    return Cameras(look_at(azimuth, elevation, radius), fovy, cfg.resolution, cfg.resolution, azimuth, elevation)


def orbit(
    n: int, elevation: float, radius: float, fovy_deg: float, resolution: int, start_azimuth: float = 0.0
) -> Cameras:
    """``n`` cameras evenly spaced in azimuth (starting at the front) at one elevation."""
    azimuth = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    elevation_t = torch.full((n,), float(elevation))
    radius_t = torch.full((n,), float(radius))
    fovy = torch.full((n,), math.radians(fovy_deg))
    return Cameras(look_at(azimuth, elevation_t, radius_t), fovy, resolution, resolution, azimuth, elevation_t)


def preview_orbit(cfg: CameraConfig, n: int | None = None, resolution: int | None = None) -> Cameras:
    """The fixed orbit used for previews (``n`` views, default ``cfg.preview_views``, ``resolution`` pixels,
    default ``cfg.resolution``): mean radius and fovy of the training ranges."""
    radius = 0.5 * (cfg.radius_range[0] + cfg.radius_range[1])
    fovy = 0.5 * (cfg.fovy_range[0] + cfg.fovy_range[1])
    return orbit(n or cfg.preview_views, cfg.preview_elevation, radius, fovy, resolution or cfg.resolution)
