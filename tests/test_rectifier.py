"""The rectifier's statistics (recdreamer_gs.distill.rectifier): what they log."""

import numpy as np
import torch

from recdreamer_gs.distill.rectifier import PoseStatistics

CLASSES = ("front", "left", "back", "right")


def test_pose_ema_log_dict_matches_the_statistics():
    stats = PoseStatistics(4, n_intervals=10, n_ema=100)
    stats.update(torch.tensor([950]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    logs = stats.log_dict(CLASSES)
    assert len(logs) == 40 and "pose_ema/t900-999/front" in logs and "pose_ema/t000-099/right" in logs
    assert np.isclose(float(logs["pose_ema/t900-999/front"]), float(stats.marginal[9, 0]))
    before = float(logs["pose_ema/t900-999/front"])
    stats.update(torch.tensor([950]), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert float(logs["pose_ema/t900-999/front"]) == before  # a snapshot, not a view of the live EMA


def test_rectifier_state_dict_round_trip_and_hooks():
    from recdreamer_gs.config import RectifierConfig
    from recdreamer_gs.distill.rectifier import Rectifier

    rect = Rectifier(RectifierConfig(n_intervals=10, n_ema=10), lambda x, bg: x, CLASSES)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]])
    rect.update(torch.tensor([120, 120]), probs)
    rect.update(torch.tensor([870, 870]), probs)
    other = Rectifier(RectifierConfig(n_intervals=10, n_ema=10), lambda x, bg: x, CLASSES)
    other.load_state_dict(rect.state_dict())
    assert torch.equal(other.stats.marginal, rect.stats.marginal) and torch.equal(other.stats.counts, rect.stats.counts)
    assert other.stats.counts.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    t = torch.tensor([120, 500])
    assert torch.equal(other.log_r(probs, t), rect.log_r(probs, t))
    # The saved state is a copy: later updates of the source do not reach it.
    state = rect.state_dict()
    rect.update(torch.tensor([120]), probs[:1])
    assert not torch.equal(state["marginal"], rect.stats.marginal)
    # Another interval count is a clear error.
    with np.testing.assert_raises_regex(ValueError, "expected shape"):
        Rectifier(RectifierConfig(n_intervals=5), lambda x, bg: x, CLASSES).load_state_dict(state)
    # The data-parallel hook reaches the statistics.
    rect.reduce = lambda mean: torch.full_like(mean, 0.25)
    assert rect.stats.reduce is rect.reduce
    assert rect.to("cpu") is rect


def test_rectifier_pose_control_and_schedule():
    from recdreamer_gs.config import RectifierConfig
    from recdreamer_gs.distill.rectifier import Rectifier

    rect = Rectifier(RectifierConfig(pose_control="back", rectify_every=3, noise="fresh"), lambda x, bg: x, CLASSES)
    probs = torch.tensor([[0.1, 0.2, 0.6, 0.1]])
    assert torch.allclose(rect.log_r(probs, torch.tensor([500])), torch.log(torch.tensor([0.6])))
    assert [rect.active(i) for i in range(4)] == [True, False, False, True] and rect.fresh_noise
    with np.testing.assert_raises_regex(ValueError, "pose_control expected one of"):
        Rectifier(RectifierConfig(pose_control="top"), lambda x, bg: x, CLASSES)


def test_per_particle_statistics_see_only_their_particle():
    """A pooled marginal of two collapsed particles (one all front, one all back) looks half uniform; per
    particle each marginal is its own pose, so log r pushes each particle out of its own pose."""
    from recdreamer_gs.config import RectifierConfig
    from recdreamer_gs.distill.rectifier import Rectifier

    front, back = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    probs = torch.stack([front, front, back, back])  # particle-major: 2 particles x 2 views
    t = torch.full((4,), 500)
    per = Rectifier(RectifierConfig(n_ema=1), lambda x, bg: x, CLASSES, particles=2)
    pooled = Rectifier(RectifierConfig(n_ema=1, statistics="pooled"), lambda x, bg: x, CLASSES, particles=2)
    for rect in (per, pooled):
        rect.update(t, probs, particles=2)
    rate = per.stats.rate  # n_ema = 1: the EMA keeps 10% of the uniform start
    torch.testing.assert_close(per.marginal(t, 2)[0], rate * front + (1 - rate) * 0.25)
    torch.testing.assert_close(per.marginal(t, 2)[3], rate * back + (1 - rate) * 0.25)
    torch.testing.assert_close(pooled.marginal(t, 2)[0], rate * (front + back) / 2 + (1 - rate) * 0.25)
    # A view that leaves its particle's pose (front -> left) gains more log r per particle than pooled.
    left = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    gain_per = per.log_r(left.expand(4, 4), t, 2)[0] - per.log_r(probs, t, 2)[0]
    gain_pooled = pooled.log_r(left.expand(4, 4), t, 2)[0] - pooled.log_r(probs, t, 2)[0]
    assert gain_per > gain_pooled + 0.5
    # The log holds every particle's EMA: particle 0 under the single-particle keys, particle 1 its own.
    logs = per.log_dict()
    assert len(logs) == 80 and len(pooled.log_dict()) == 40
    assert np.isclose(float(logs["pose_ema/t500-599/front"]), rate + (1 - rate) * 0.25)
    assert np.isclose(float(logs["pose_ema_p1/t500-599/back"]), rate + (1 - rate) * 0.25)
    assert np.isclose(float(logs["pose_ema_p1/t500-599/front"]), (1 - rate) * 0.25)
    # Checkpoints keep every particle's statistics; a count that does not fit is a clear error.
    other = Rectifier(RectifierConfig(n_ema=1), lambda x, bg: x, CLASSES, particles=2)
    other.load_state_dict(per.state_dict())
    assert torch.equal(other.marginal(t, 2), per.marginal(t, 2))
    with np.testing.assert_raises_regex(ValueError, "expected 1 .*got 2"):
        Rectifier(RectifierConfig(n_ema=1), lambda x, bg: x, CLASSES).load_state_dict(per.state_dict())
    with np.testing.assert_raises_regex(ValueError, "statistics for 2 particles, got a batch of 4"):
        per.update(t, probs, particles=4)
    # Per-particle statistics are not averaged over data-parallel processes; a process keeps its share.
    per.reduce = lambda mean: torch.full_like(mean, 0.25)
    assert per.reduce is None
    per.keep([1])
    torch.testing.assert_close(per.marginal(t[:2], 1)[0], rate * back + (1 - rate) * 0.25)
    per.reduce = lambda mean: torch.full_like(mean, 0.25)  # one particle kept: still its own statistics
    assert per.reduce is None
    assert sorted(per.log_dict())[0].startswith("pose_ema_p1/")  # logged under its own particle's name
