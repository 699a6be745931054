"""The rectifier's statistics (recdreamer_gs.usd.rectifier): what they log."""

import numpy as np
import torch

from recdreamer_gs.usd.rectifier import PoseStatistics

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
