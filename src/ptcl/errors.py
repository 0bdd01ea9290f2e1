"""User-facing errors.

Every problem a user can fix (a typo in a key, a missing folder, a corrupt file,
an impossible task split) raises a subclass of :class:`PtclError`. The CLI prints
its message on one line and exits with status 2; tracebacks are for bugs only.
"""

from __future__ import annotations


class PtclError(Exception):
    """Base class for errors the user can fix; the message names problem and fix."""


class ConfigError(PtclError):
    """Unknown key, bad value or unreadable config file."""


class DataError(PtclError):
    """Missing dataset folder, corrupt image, impossible task split."""


class BackboneError(PtclError):
    """Unknown backbone or weights that cannot be loaded."""


class TrainingDiverged(PtclError):
    """A loss or a prediction became NaN or infinite (learning rate too high, no clipping)."""


class ResultsWriteError(PtclError):
    """A run's results could not be written (full disk, read-only folder)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``message`` says what was kept and how to continue."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
