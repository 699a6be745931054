"""The one base class of errors a user can fix.

Every exception the package raises for bad input or a missing piece of the environment (a config
value, a file, a model, the GPU build) derives from :class:`UserError`. Its message is one line that
says what was wrong and what to do; the command line prints it and exits with code 2, without a
traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Input or environment the user can fix; ``str()`` is one line: what was wrong and what to do."""


class Diverged(RuntimeError):
    """Training diverged: the gradient was non-finite everywhere for ``train.max_bad_iterations`` iterations in
    a row (not a UserError: the run folder keeps the last good state and the message says how to resume)."""


class ModelMismatch(UserError, ValueError):
    """A model's parts do not fit each other or the run's settings (a VAE whose latents the UNet cannot take, a
    render size the VAE cannot divide); the message names the model, the two values and the setting to change."""
