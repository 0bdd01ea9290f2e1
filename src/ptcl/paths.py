"""Where ptcl keeps caches: ``$PTCL_CACHE_DIR`` (default ``~/.cache/ptcl``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root (or a sub-folder of it), created on first use."""
    root = Path(os.environ.get("PTCL_CACHE_DIR") or Path.home() / ".cache" / "ptcl")
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p
