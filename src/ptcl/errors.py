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


def one_line(e: BaseException) -> str:
    """``e``'s message on one line. An error re-raised by a data-loader worker carries the
    worker's traceback in its message; only the original message is kept."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = lines[-1].strip()
        for prefix in (f"{type(e).__module__}.{type(e).__name__}: ", f"{type(e).__name__}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
        return last
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
