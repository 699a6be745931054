"""Which process of a data-parallel run this is (distributed.py starts them), without importing Lightning: the
command line, the console and the batch driver ask before any training code loads."""

from __future__ import annotations

import os

RUN_DIR_ENV = "RECDREAMER_GS_RUN_DIR"  # the run folder chosen by rank 0, inherited by the other ranks


def is_secondary_rank() -> bool:
    """True in the processes that Lightning's launcher started for ranks above 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0
