"""ptcl: class-incremental continual learning on top of pre-trained models.

``import ptcl`` registers every built-in component (as timm does), so
``ptcl.METHODS.names()``, ``ptcl.BACKBONES`` and ``ptcl.DATASETS`` are complete whatever
was imported before.
"""

from __future__ import annotations

from ptcl._version import __version__
from ptcl.config import RunConfig, build_config  # noqa: E402
from ptcl.errors import PtclError  # noqa: E402
from ptcl.registry import BACKBONES, DATASETS, METHODS  # noqa: E402

# The built-ins register themselves on import; nothing below the facade imports them.
from ptcl import backbones, methods  # noqa: E402,F401  isort: skip
from ptcl.data import datasets  # noqa: E402,F401  isort: skip


def run(*args, **kwargs):
    """Run an experiment; see :func:`ptcl.engine.runner.run`."""
    from ptcl.engine.runner import run as _run

    return _run(*args, **kwargs)


__all__ = ["BACKBONES", "DATASETS", "METHODS", "PtclError", "RunConfig", "build_config", "run", "__version__"]
