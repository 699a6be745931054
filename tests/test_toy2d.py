"""The 2D check: USD's pose histogram is much closer to uniform than SDS's, which keeps the front bias."""

import torch

from recdreamer_gs.distill.rectifier import PoseStatistics, ema_rate, interval_index, log_r
from recdreamer_gs.distill.toy2d import Toy2DConfig, make_prior, run_particles, tv_from_uniform


def test_usd_flattens_the_pose_histogram():
    # 300 iterations, measured on seeds 0-3: total variation from uniform SDS 0.69-0.72, USD 0.16-0.19; front share
    # SDS 0.94-0.97, USD 0.09-0.13 (at 600 iterations USD's total variation 0.09, its front share 0.16-0.19)
    cfg = Toy2DConfig(particles=16, iterations=300)
    prior = make_prior(cfg)
    sds = [run_particles("sds", seed, cfg, prior)[1] for seed in range(2)]
    usd = [run_particles("usd", seed, cfg, prior)[1] for seed in range(2)]
    tv_sds = sum(tv_from_uniform(h) for h in sds) / 2
    tv_usd = sum(tv_from_uniform(h) for h in usd) / 2
    front_sds = torch.stack(sds)[:, 0].mean().item()
    front_usd = torch.stack(usd)[:, 0].mean().item()
    assert front_sds > 0.7  # SDS keeps (and sharpens) the prior's 55% front bias
    assert tv_usd < 0.5 * tv_sds, (tv_sds, tv_usd)
    assert front_usd < front_sds - 0.25


def test_pose_statistics_ema():
    assert abs(ema_rate(100) - 0.02276) < 1e-4
    assert interval_index(torch.tensor([0, 99, 100, 999]), 10, 1000).tolist() == [0, 0, 1, 9]
    stats = PoseStatistics(4, n_intervals=10, n_ema=100)
    assert torch.allclose(stats.marginal, torch.full((10, 4), 0.25))
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(3, 1)
    stats.update(torch.tensor([250, 250, 250]), probs)
    a = ema_rate(100)
    assert torch.allclose(stats.marginal[2], torch.tensor([a + (1 - a) * 0.25, *(3 * [(1 - a) * 0.25])]))
    assert torch.allclose(stats.marginal[3], torch.full((4,), 0.25))  # other intervals untouched
    state = stats.state_dict()
    other = PoseStatistics(4)
    other.load_state_dict(state)
    assert torch.equal(other.marginal, stats.marginal)
    # A reduce hook (data-parallel mean) replaces the local batch mean.
    stats.reduce = lambda mean: torch.full_like(mean, 0.25)
    stats.update(torch.tensor([950]), probs)
    assert torch.allclose(stats.marginal[9], torch.full((4,), 0.25))


def test_log_r_prefers_rare_poses():
    marginal = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    front = torch.tensor([[0.9, 0.05, 0.03, 0.02]])
    side = torch.tensor([[0.05, 0.9, 0.03, 0.02]])
    assert log_r(side, marginal) > log_r(front, marginal)
    assert torch.allclose(log_r(torch.full((1, 4), 0.25), torch.full((1, 4), 0.25)), torch.zeros(1), atol=1e-6)
