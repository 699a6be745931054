"""Schedules as pure functions of the system's own iteration counter (never trainer.global_step).

Time ranges are integer timesteps ``(lo, hi)``; t is drawn uniformly from ``lo <= t < hi``.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol

from recdreamer_gs.config_base import ConfigError

TimeSchedule = Literal["uniform", "linear", "t5", "bnf"]


class TimeSettings(Protocol):
    """The time-schedule fields of a ``config.DistillConfig`` (what :func:`check_time_schedule` reads)."""

    time_schedule: TimeSchedule
    t_min: float
    t_max: float
    t_anneal_to: float
    t5_switch: int
    bnf_intervals: Optional[int]


def _steps(fraction: float, T: int) -> int:
    return int(round(fraction * T))


def uniform_range(t_min: float, t_max: float, T: int = 1000) -> tuple[int, int]:
    """The whole range [t_min·T, t_max·T)."""
    return _steps(t_min, T), _steps(t_max, T)


def linear_range(iteration: int, total: int, t_min: float, t_max: float, t_end: float, T: int = 1000) -> tuple[int, int]:
    """Upper bound annealed linearly from t_max to t_end over the run; lower bound fixed at t_min."""
    frac = min(max(iteration / max(total - 1, 1), 0.0), 1.0)
    hi = t_max + (t_end - t_max) * frac
    return _steps(t_min, T), max(_steps(hi, T), _steps(t_min, T) + 1)


def t5_range(iteration: int, switch_at: int, t_min: float, t_max: float, T: int = 1000) -> tuple[int, int]:
    """The release's ``t5`` schedule: [t_min, t_max) before ``switch_at`` iterations, then [t_min, T/2 + 1)."""
    if iteration < switch_at and _steps(t_max, T) > T // 2:
        return _steps(t_min, T), _steps(t_max, T)
    return _steps(t_min, T), T // 2 + 1


def bnf_block(iteration: int, total: int, n_intervals: int) -> tuple[Literal["expand", "shrink"], int, int]:
    """Which back-and-forth block an iteration is in: (phase, index within phase, block length).

    The run is split into 2·n_i equal blocks (docs/schedules.md); iterations past the last block stay in it.
    """
    length = max(total // (2 * n_intervals), 1)
    block = min(iteration // length, 2 * n_intervals - 1)
    if block < n_intervals:
        return "expand", block, length
    return "shrink", block - n_intervals, length


def bnf_range(iteration: int, total: int, n_intervals: int, t_min: float, t_max: float, T: int = 1000) -> tuple[int, int]:
    """Back-and-forth schedule (paper sec. 4.3): expanding blocks [t_lo, t_max] with t_lo stepping down
    from T − T/n_i to t_min, then shrinking blocks [t_min, t_hi] with t_hi stepping down from t_max to T/n_i."""
    phase, i, _ = bnf_block(iteration, total, n_intervals)
    lo, hi = _steps(t_min, T), _steps(t_max, T)
    delta = T // n_intervals
    if phase == "expand":
        return max(lo, (n_intervals - 1 - i) * delta), hi
    return lo, hi if i == 0 else (n_intervals - i) * delta


def t_range(
    schedule: TimeSchedule, iteration: int, total: int, t_min: float, t_max: float, *,
    t_end: float = 0.5, t5_switch: int = 5000, bnf_intervals: int = 2, T: int = 1000,
) -> tuple[int, int]:
    """Dispatch to one of the schedules above; an empty range is an error (check_time_schedule refuses such
    configs before training starts)."""
    lo, hi = _dispatch(schedule, iteration, total, t_min, t_max, t_end, t5_switch, bnf_intervals, T)
    if lo >= hi:
        raise ValueError(f"time schedule {schedule!r} gives an empty t range [{lo}, {hi}) at iteration {iteration}")
    return lo, hi


def _dispatch(schedule: TimeSchedule, iteration: int, total: int, t_min: float, t_max: float, t_end: float,
              t5_switch: int, bnf_intervals: int, T: int) -> tuple[int, int]:
    if schedule == "uniform":
        lo, hi = uniform_range(t_min, t_max, T)
    elif schedule == "linear":
        lo, hi = linear_range(iteration, total, t_min, t_max, t_end, T)
    elif schedule == "t5":
        lo, hi = t5_range(iteration, t5_switch, t_min, t_max, T)
    elif schedule == "bnf":
        lo, hi = bnf_range(iteration, total, bnf_intervals, t_min, t_max, T)
    else:
        raise ValueError(f"unknown time schedule {schedule!r}; expected uniform, linear, t5 or bnf")
    return lo, hi


def warmup_factor(iteration: int, warmup: int) -> float:
    """Linear learning-rate warm-up: (i + 1) / (warmup + 1) until it reaches 1 (0 disables it)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (iteration + 1) / (warmup + 1))


def bnf_intervals(configured: "int | None", particles: int) -> int:
    """n_i of the back-and-forth schedule: the configured value, else 2 for one particle and 10 for several."""
    return configured or (2 if particles == 1 else 10)


def check_time_schedule(d: TimeSettings, total: int, particles: int, key: str = "distill", T: int = 1000) -> None:
    """Refuse a schedule that leaves an empty t range at some iteration: every BNF block, both ends of a
    linear anneal, both sides of the t5 switch (ConfigError naming ``key``)."""
    n_i = bnf_intervals(d.bnf_intervals, particles)
    if d.time_schedule == "bnf":
        length = max(total // (2 * n_i), 1)
        probes = [k * length for k in range(2 * n_i)]
    else:
        probes = [0, max(total - 1, 0), d.t5_switch] if d.time_schedule == "t5" else [0, max(total - 1, 0)]
    for iteration in probes:
        lo, hi = _dispatch(d.time_schedule, iteration, total, d.t_min, d.t_max, d.t_anneal_to, d.t5_switch, n_i, T)
        if lo >= hi:
            detail = f" with {n_i} back-and-forth intervals" if d.time_schedule == "bnf" else ""
            raise ConfigError(
                f"{key}.time_schedule={d.time_schedule}{detail}: the t range is empty at iteration {iteration} "
                f"(t from {lo} to {hi} of T={T}, t_min={d.t_min}, t_max={d.t_max}); widen t_min/t_max"
                + (" or use fewer bnf_intervals" if d.time_schedule == "bnf" else ""))
