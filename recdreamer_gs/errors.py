"""The package's errors: the one base class of errors a user can fix, and how a run that started stops.

Every exception the package raises for bad input or a missing piece of the environment (a config
value, a file, a model, the GPU build) derives from :class:`UserError`. Its message is one line that
says what was wrong and what to do; the command line prints it and exits with code 2, without a
traceback. Everything else is a bug and keeps its traceback. A run that stopped after training started
raises :class:`TrainingFailed` (its one line says what was kept) or, on Ctrl-C, :class:`Interrupted`.
"""

from __future__ import annotations

import errno
import sys


class UserError(Exception):
    """Input or environment the user can fix; ``str()`` is one line: what was wrong and what to do."""


class Diverged(RuntimeError):
    """Training diverged: the gradient was non-finite everywhere for ``train.max_bad_iterations`` iterations in
    a row (not a UserError: the run folder keeps the last good state and the message says how to resume)."""


class RunError(UserError, RuntimeError):
    """A run cannot start; the message says what was wrong and what to do."""


class Interrupted(RuntimeError):
    """Ctrl-C stopped a run after its checkpoint and PLY were written."""


class TrainingFailed(RuntimeError):
    """Training stopped with an error after it started; ``str()`` is one line: the cause, what was kept and the
    ``--resume`` command. ``exit_code`` is 2 for out of memory (the user can lower settings), else 1."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ModelMismatch(UserError, ValueError):
    """A model's parts do not fit each other or the run's settings (a VAE whose latents the UNet cannot take, a
    render size the VAE cannot divide); the message names the model, the two values and the setting to change."""


# Causes said in words (true of a read and of a write), and what to do about a failed write.
_OS_WORDS: dict[int, str] = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than the file system or the file size limit (ulimit -f) allows",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "the disk reported an input/output error",
    errno.ESTALE: "the network share went away (stale file handle)",
}
_OS_REMEDIES: dict[int, str] = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space or raise the quota",
    errno.EFBIG: "write to another disk or raise the limit",
    errno.EROFS: "remount it writable or write elsewhere",
    errno.EIO: "check the disk or network share",
    errno.ESTALE: "remount the share",
    errno.EACCES: "restore write permission on the folder",
    errno.EPERM: "restore write permission on the folder",
    errno.ENOENT: "restore the folder",
}


def os_cause(err: OSError) -> str:
    """The cause of a failed file operation, in words where the system's own are terse, e.g.
    "the disk is full (No space left on device)"; else the system's text ("Permission denied")."""
    detail = err.strerror or str(err)
    words = _OS_WORDS.get(err.errno or -1)
    return f"{words} ({detail})" if words else detail


def os_remedy(err: OSError) -> str:
    """What to do about a failed write, e.g. "free some space" (empty when there is no known step)."""
    return _OS_REMEDIES.get(err.errno or -1, "")


def warn(text: str) -> None:
    """One warning line on stderr: something the user should know that does not stop the command."""
    print(f"warning: {text}", file=sys.stderr, flush=True)
