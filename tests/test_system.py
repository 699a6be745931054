"""TextTo3DSystem (recdreamer_gs.system): the divergence guard of training_step."""

import pytest
import torch

from recdreamer_gs import errors, prior_choice, training
from recdreamer_gs.config import load_config, parse_override
from recdreamer_gs.errors import Diverged, UserError
from recdreamer_gs.priors.synthetic import SyntheticPrior

SETTINGS = [
    "train.steps=8", "train.progress_bar=false", "output.turntable_frames=0", "train.preview_every=0",
    "gaussians.num_init=150", "prior.synthetic.resolution=32", "prior.kind=synthetic", "train.device=cpu",
    "distill.method=sds", "train.max_bad_iterations=3",
]


class NaNPrior(SyntheticPrior):
    """The synthetic prior whose ε̂ is NaN for its first ``bad_calls`` calls (one call per SDS iteration)."""

    def __init__(self, cfg, bad_calls: int):
        super().__init__(cfg)
        self.bad_calls, self.calls = bad_calls, 0

    def eps(self, *args, **kwargs):
        self.calls += 1
        out = super().eps(*args, **kwargs)
        return out * float("nan") if self.calls <= self.bad_calls else out


def fit(tmp_path, bad_calls: int, log_every: int = 1):
    cfg = load_config("preview", overrides=[parse_override(s) for s in [*SETTINGS, f"train.log_every={log_every}"]])
    choice = prior_choice.PriorChoice(NaNPrior(cfg.prior.synthetic, bad_calls), "synthetic", None)
    return training.fit(cfg, tmp_path, choice, torch.device("cpu"))


def test_diverged_after_max_bad_iterations(tmp_path):
    with pytest.raises(errors.TrainingFailed, match="at iteration 2 the last 3 iterations in a row") as err:
        fit(tmp_path, bad_calls=100)
    cause = err.value.__cause__
    assert isinstance(cause, Diverged) and not isinstance(cause, UserError)
    # The Gaussians stayed finite (non-finite gradients are zeroed): the state is kept for --resume.
    assert "--resume" in str(err.value) and (tmp_path / "model.ply").is_file()


def test_divergence_is_checked_when_logging(tmp_path):
    # Checked every train.log_every = 4 iterations: first at iteration 3, by then 4 bad ones in a row.
    with pytest.raises(errors.TrainingFailed, match="at iteration 3 the last 4 iterations"):
        fit(tmp_path, bad_calls=100, log_every=4)


def test_a_short_bad_streak_is_not_divergence(tmp_path):
    system = fit(tmp_path, bad_calls=2)
    assert system.iteration == 8 and int(system.bad_iterations) == 0
    assert all(torch.isfinite(v).all() for v in system.gaussians.params.values())
