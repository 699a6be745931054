"""What a command says on the terminal besides its result: progress lines, and the libraries kept quiet."""

from __future__ import annotations

import logging
import os
import warnings

from rich.console import Console

from recdreamer_gs.ranks import is_secondary_rank


def progress_echo(text: str) -> None:
    """A progress line on stderr (above Lightning's progress bar), from rank 0 only."""
    if not is_secondary_rank():
        Console(stderr=True).print(text, highlight=False, markup=False)


def quiet_libraries() -> None:
    """Keep Lightning's and the model libraries' chatter out of a command's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
