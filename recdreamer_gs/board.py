"""The progress board of a prompt set: which runs are running and how far (``recdreamer-gs batch``).

A Ray actor of no CPU in a worker process of its own. It lives in this module, which imports nothing but the
standard library, because Ray's worker imports the module of the actor's class: from batch.py it would load torch,
Lightning and the config for a dictionary (several seconds of CPU and a few hundred MB per set).
"""

from __future__ import annotations

import time
from typing import Any


class Board:
    """The set's progress, told by the tasks."""

    def __init__(self):
        self.runs: dict[str, dict[str, Any]] = {}

    def started(self, name: str, attempt: int) -> None:
        self.runs[name] = {"attempt": attempt, "iteration": 0, "total": 0, "since": time.time()}

    def progress(self, name: str, iteration: int, total: int) -> None:
        self.runs.setdefault(name, {"attempt": 1, "since": time.time()}).update(iteration=iteration, total=total)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.runs
