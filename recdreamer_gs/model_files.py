"""The model files of a run: their names (one stem per particle) and writing the particles in every format
of ``output.formats``; the export callback, the live viewer and ``recdreamer-gs models`` use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from recdreamer_gs.config import RunConfig
from recdreamer_gs.errors import warn
from recdreamer_gs.export import Written
from recdreamer_gs.outputs import FormatError, output_named


def model_stems(cfg: RunConfig, particle_ids: Sequence[int]) -> list[str]:
    """``model`` for one particle, else ``model_<i>`` for each particle id."""
    return ["model"] if cfg.train.particles == 1 else [f"model_{i}" for i in particle_ids]


def model_names(cfg: RunConfig) -> list[str]:
    """File names of the run's final Gaussians: each stem (``model_stems``) with each ``output.formats`` suffix."""
    suffixes = [output_named(name).suffix for name in cfg.output.formats]
    return [stem + suffix for stem in model_stems(cfg, range(cfg.train.particles)) for suffix in suffixes]


def write_particles(pl_module: Any, out_dir: Path, cfg: RunConfig) -> list[Written]:
    """This process's particles in every format of ``output.formats`` (outputs.OUTPUTS), in the frame of
    ``output.ply_frame``; what was written. A format that cannot hold these Gaussians (e.g. a SOG of too few)
    is a warning; a failed write (``OSError``) stops here, leaving earlier files whole."""
    out: list[Written] = []
    for stem, gaussians in zip(model_stems(cfg, pl_module.particle_ids), pl_module.particles):
        params = {k: v.detach().cpu() for k, v in gaussians.params.items()}
        for name in cfg.output.formats:
            output = output_named(name)
            try:
                result = output.write(out_dir / f"{stem}{output.suffix}", params, cfg.output.ply_frame)
            except FormatError as err:
                warn(f"no {stem}{output.suffix}: {err}")
                continue
            if result.dropped or result.note:
                warn(f"wrote {result.describe()}")
            out.append(result)
    return out
