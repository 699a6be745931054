"""Camera conventions (docs/frames.md): +y up, azimuth 0 on +z, azimuth 90 on +x, OpenGL c2w."""

from __future__ import annotations

import math

import pytest
import torch

from recdreamer_gs.cameras import Cameras, look_at, orbit, preview_orbit, sample_cameras
from recdreamer_gs.config import CameraConfig


def _look_at(az: list[float], el: list[float], radius: float = 2.0) -> torch.Tensor:
    az_t = torch.tensor(az)
    return look_at(az_t, torch.tensor(el), torch.full_like(az_t, radius))


@pytest.mark.parametrize(
    "azimuth, elevation, position",
    [
        (0.0, 0.0, (0.0, 0.0, 2.0)),  # front: camera on +z
        (90.0, 0.0, (2.0, 0.0, 0.0)),  # counter-clockwise seen from above: +x
        (180.0, 0.0, (0.0, 0.0, -2.0)),
        (-90.0, 0.0, (-2.0, 0.0, 0.0)),
        (0.0, -30.0, (0.0, -1.0, math.sqrt(3.0))),  # below the horizon: y < 0
        (0.0, 30.0, (0.0, 1.0, math.sqrt(3.0))),
    ],
)
def test_look_at_positions(azimuth, elevation, position):
    c2w = _look_at([azimuth], [elevation])
    torch.testing.assert_close(c2w[0, :3, 3], torch.tensor(position), atol=1e-5, rtol=0)


def test_look_at_frames():
    az = torch.linspace(-180.0, 170.0, 36).repeat(3)
    el = torch.tensor([-30.0, 10.0, 60.0]).repeat_interleave(36)
    radius = torch.linspace(1.5, 4.0, az.numel())
    c2w = look_at(az, el, radius)
    assert c2w.shape == (108, 4, 4)
    R, t = c2w[:, :3, :3], c2w[:, :3, 3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3).expand(108, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(108), atol=1e-5, rtol=0)  # right-handed
    torch.testing.assert_close(c2w[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(108, 4))
    torch.testing.assert_close(t.norm(dim=-1), radius, atol=1e-5, rtol=0)
    # OpenGL: the camera looks down its -z axis, which points at the origin.
    torch.testing.assert_close(-R[:, :, 2], -t / t.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
    # Its +y (screen up) leans towards world +y; its +x (screen right) is horizontal.
    assert (R[:, 1, 1] > 0).all()
    torch.testing.assert_close(R[:, 1, 0], torch.zeros(108), atol=1e-5, rtol=0)
    # Elevation sign: above the horizon means y > 0.
    assert ((t[:, 1] > 0) == (el > 0)).all()


def test_front_camera_axes():
    """From the front (azimuth 0) world +x is screen right and +y is screen up."""
    R = _look_at([0.0], [0.0])[0, :3, :3]
    torch.testing.assert_close(R, torch.eye(3), atol=1e-6, rtol=0)
    side = _look_at([90.0], [0.0])[0, :3, :3]
    torch.testing.assert_close(side[:, 0], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6, rtol=0)  # right = -z


def test_sample_cameras_ranges_and_determinism():
    cfg = CameraConfig(resolution=48, azimuth_range=(-60.0, 45.0), elevation_range=(5.0, 25.0),
                       radius_range=(2.0, 3.5), fovy_range=(30.0, 50.0))
    cams = sample_cameras(cfg, 256, torch.Generator().manual_seed(0))
    assert isinstance(cams, Cameras) and len(cams) == 256
    assert (cams.width, cams.height) == (48, 48)
    assert cams.c2w.shape == (256, 4, 4) and cams.fovy.shape == (256,)
    assert cams.azimuth.min() >= -60.0 and cams.azimuth.max() <= 45.0
    assert cams.elevation.min() >= 5.0 and cams.elevation.max() <= 25.0
    assert cams.azimuth.max() - cams.azimuth.min() > 90.0  # spread over the range, not a constant
    radius = cams.c2w[:, :3, 3].norm(dim=-1)
    assert radius.min() >= 2.0 - 1e-5 and radius.max() <= 3.5 + 1e-5
    fovy_deg = torch.rad2deg(cams.fovy)
    assert fovy_deg.min() >= 30.0 - 1e-4 and fovy_deg.max() <= 50.0 + 1e-4
    # Labels agree with the matrices.
    t = cams.c2w[:, :3, 3]
    torch.testing.assert_close(torch.rad2deg(torch.asin(t[:, 1] / radius)), cams.elevation, atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.rad2deg(torch.atan2(t[:, 0], t[:, 2])), cams.azimuth, atol=1e-3, rtol=0)

    again = sample_cameras(cfg, 256, torch.Generator().manual_seed(0))
    assert torch.equal(cams.c2w, again.c2w) and torch.equal(cams.fovy, again.fovy)
    other = sample_cameras(cfg, 256, torch.Generator().manual_seed(1))
    assert not torch.equal(cams.azimuth, other.azimuth)


def test_focal_from_fovy():
    cams = sample_cameras(CameraConfig(resolution=64, fovy_range=(60.0, 60.0)), 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(cams.focal(), torch.full((2,), 32.0 / math.tan(math.radians(30.0))))


def test_orbit_spacing():
    cams = orbit(8, elevation=15.0, radius=2.5, fovy_deg=40.0, resolution=32)
    assert len(cams) == 8 and (cams.width, cams.height) == (32, 32)
    assert cams.azimuth[0].item() == 0.0  # starts at the front
    assert cams.azimuth.min() >= -180.0 and cams.azimuth.max() < 180.0
    step = torch.remainder(cams.azimuth.roll(-1) - cams.azimuth, 360.0)
    torch.testing.assert_close(step, torch.full((8,), 45.0))
    t = cams.c2w[:, :3, 3]
    torch.testing.assert_close(t.norm(dim=-1), torch.full((8,), 2.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(t[:, 1], torch.full((8,), 2.5 * math.sin(math.radians(15.0))), atol=1e-5, rtol=0)
    # Neighbours are 45 degrees apart around the vertical axis, counter-clockwise seen from above.
    ang = torch.atan2(t[:, 0], t[:, 2])
    torch.testing.assert_close(torch.remainder(ang.roll(-1) - ang, 2 * math.pi), torch.full((8,), math.pi / 4),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.fovy, torch.full((8,), math.radians(40.0)))
    shifted = orbit(4, elevation=0.0, radius=2.0, fovy_deg=40.0, resolution=16, start_azimuth=90.0)
    torch.testing.assert_close(shifted.c2w[0, :3, 3], torch.tensor([2.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_preview_orbit_uses_mean_ranges():
    cfg = CameraConfig(radius_range=(2.0, 3.0), fovy_range=(30.0, 50.0), preview_views=6, preview_elevation=10.0)
    cams = preview_orbit(cfg)
    assert len(cams) == 6
    torch.testing.assert_close(cams.c2w[:, :3, 3].norm(dim=-1), torch.full((6,), 2.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.fovy, torch.full((6,), math.radians(40.0)))
    torch.testing.assert_close(cams.elevation, torch.full((6,), 10.0))


def test_indexing_and_to():
    cams = orbit(4, elevation=0.0, radius=2.0, fovy_deg=40.0, resolution=16)
    sub = cams[1:3]
    assert len(sub) == 2 and torch.equal(sub.c2w, cams.c2w[1:3]) and torch.equal(sub.azimuth, cams.azimuth[1:3])
    assert cams.to("cpu").device.type == "cpu"
