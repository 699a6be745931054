"""The one base class of errors a user can fix.

Every exception the package raises for bad input or a missing piece of the environment (a config
value, a file, a model, the GPU build) derives from :class:`UserError`. Its message is one line that
says what was wrong and what to do; the command line prints it and exits with code 2, without a
traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys


class UserError(Exception):
    """Input or environment the user can fix; ``str()`` is one line: what was wrong and what to do."""


class Diverged(RuntimeError):
    """Training diverged: the gradient was non-finite everywhere for ``train.max_bad_iterations`` iterations in
    a row (not a UserError: the run folder keeps the last good state and the message says how to resume)."""


# What a failed write means, in words (errno -> cause, what to do about it).
_OS_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free some space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or raise the quota"),
    errno.EFBIG: ("the file is larger than this file system or the process's file size limit allows",
                  "write to another disk or raise the limit (ulimit -f)"),
    errno.EROFS: ("the file system is read-only", "remount it writable or write elsewhere"),
    errno.EACCES: ("permission to write there was denied", "restore write permission on the folder"),
    errno.EPERM: ("the operation is not permitted there", "restore write permission on the folder"),
    errno.ENOENT: ("the folder no longer exists (removed or unmounted)", "restore the folder"),
    errno.ENOTDIR: ("a part of the path is not a folder", "restore the folder"),
    errno.EIO: ("the disk reported an input/output error", "check the disk or network share"),
    errno.ESTALE: ("the network share went away (stale file handle)", "remount the share"),
}


def os_cause(err: OSError) -> str:
    """The cause of a failed file operation in words, e.g. "the disk is full (No space left on device)"."""
    words = _OS_CAUSES.get(err.errno or -1)
    detail = err.strerror or str(err)
    return f"{words[0]} ({detail})" if words else detail


def os_remedy(err: OSError) -> str:
    """What to do about a failed file operation, e.g. "free some space" (empty when there is no known step)."""
    return _OS_CAUSES.get(err.errno or -1, ("", ""))[1]


def warn(text: str) -> None:
    """One warning line on stderr: something the user should know that does not stop the command."""
    print(f"warning: {text}", file=sys.stderr, flush=True)
