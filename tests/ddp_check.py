"""Two-process data-parallel runs on CPU (gloo), started by tests/test_distributed.py.

    python tests/ddp_check.py OUTDIR [per_particle|pooled ...]

Lightning's launcher re-runs this script for rank 1; both processes then run one short fit per statistics mode
given, one after the other (the process group is made once and kept). Each rank saves its rectifier statistics
(the EMA of its first particle, or the shared one) and particle indices to OUTDIR/<mode>/rank<r>.pt so that the
test can compare them.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from recdreamer_gs import prior_choice, training
from recdreamer_gs.config import load_config, parse_override


class SaveStats(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save({"marginal": pl_module.pose_stats.marginal.cpu(), "counts": pl_module.pose_stats.counts.cpu(),
                    "particles": pl_module.particle_ids, "iteration": pl_module.iteration},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path, statistics: str) -> None:
    torch.set_num_threads(1)
    overrides = ["train.devices=2", "train.particles=2", "train.steps=5", "prior.kind=synthetic", "train.device=cpu",
                 "prior.synthetic.resolution=32", "gaussians.num_init=150", "train.progress_bar=false",
                 "output.turntable_frames=0", "train.preview_every=0", "distill.method=usd",
                 f"distill.rectifier.statistics={statistics}"]
    cfg = load_config("preview", overrides=[parse_override(s) for s in overrides])
    device = torch.device("cpu")
    out.mkdir(parents=True, exist_ok=True)
    training.fit(cfg, out, prior_choice.build_prior(cfg, device), device, extra_callbacks=[SaveStats(out)])


if __name__ == "__main__":
    for mode in sys.argv[2:] or ["per_particle"]:
        main(Path(sys.argv[1]) / mode, mode)
