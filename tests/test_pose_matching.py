"""The pose classifier's similarity maths (paper eq. 15-17) on hand-made features."""

import torch

from recdreamer_gs.pose.matching import (
    coordinate_map,
    foreground_mask,
    orientation_similarity,
    pose_probabilities,
    texture_similarity,
)


def test_empty_mask_falls_back_to_all_patches():
    scores = torch.tensor([[-3.0, -2.0, -1.0, -0.5], [-1.0, 2.0, -1.0, 3.0]])
    mask = foreground_mask(scores, 0.5)
    assert mask[0].all()
    assert mask[1].tolist() == [False, True, False, True]


def test_coordinate_map():
    mask = torch.zeros(2, 3, 8, dtype=torch.bool)
    mask[0, 1, 2:6] = True
    mask[0, 2, 3] = True
    mask[1, :, 4] = True  # one column wide
    m = coordinate_map(mask)
    torch.testing.assert_close(m[0, 0], torch.tensor([0, 0, -0.5, -1 / 6, 1 / 6, 0.5, 0, 0]))
    torch.testing.assert_close(m[0, 2], m[0, 0])  # constant along rows
    assert (m[1] == 0).all()


def test_orientation_similarity_prefers_matching_coordinates():
    g = torch.Generator().manual_seed(0)
    p, d = 6, 5
    f = torch.rand(1, p, d, generator=g)
    coords = torch.linspace(-0.5, 0.5, p)[None]
    mask = torch.ones(1, p, dtype=torch.bool)
    same = orientation_similarity(f, mask, coords, f, mask, coords, 0.01)
    mirrored = orientation_similarity(f, mask, coords, f, mask, coords.flip(-1), 0.01)
    torch.testing.assert_close(same, torch.ones(1, 1))
    assert mirrored.item() < 0.6
    # background template patches never match
    tmask = mask.clone()
    tmask[0, 0] = False
    partial = orientation_similarity(f, mask, coords, f, tmask, coords, 0.01)
    assert partial.item() < 1.0


def test_pose_probabilities_and_texture_similarity():
    sim = torch.tensor([[0.9, 0.5, 0.7, 0.5]])
    probs = pose_probabilities(sim, torch.tensor([0, 1, 0, 2]), 3, 0.01)
    expected = torch.softmax(torch.tensor([0.8, 0.5, 0.5]) / 1.8 / 0.01, -1)
    torch.testing.assert_close(probs[0], expected)
    a = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(texture_similarity(a, torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])),
                               torch.tensor([[1.0, 0.0, 0.5]]))
