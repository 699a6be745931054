"""Template augmentations: range, shape, identity at zero strength, determinism."""

import torch

from recdreamer_gs.config import PoseClassifierConfig
from recdreamer_gs.pose.augment import color_jitter, photometric_augment, random_affine


def test_augmentations_keep_range_and_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 20, generator=g)
    same = color_jitter(x, 0.0, 0.0, 0.0, 0.0, g)
    torch.testing.assert_close(same, x, rtol=1e-5, atol=1e-5)
    jit = color_jitter(x, 0.2, 0.2, 0.2, 0.1, g)
    assert jit.shape == x.shape and jit.min() >= 0 and jit.max() <= 1 and not torch.allclose(jit, x)
    ident = random_affine(x, 0.0, (1.0, 1.0), 0.0, g)
    torch.testing.assert_close(ident, x, rtol=1e-5, atol=1e-5)
    moved = random_affine(x, 0.1, (0.9, 1.1), 5.0, g)
    assert moved.shape == x.shape and not torch.allclose(moved, x)


def test_photometric_augment_is_deterministic_per_generator():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = PoseClassifierConfig()
    a = photometric_augment(x, cfg, torch.Generator().manual_seed(7))
    b = photometric_augment(x, cfg, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)
