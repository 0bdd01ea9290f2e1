"""Where ptcl keeps caches: ``$PTCL_CACHE_DIR`` (default ``~/.cache/ptcl``)."""

from __future__ import annotations

import os
from pathlib import Path

from ptcl.errors import ConfigError


def cache_root() -> Path:
    """``$PTCL_CACHE_DIR`` or ``~/.cache/ptcl`` (not created)."""
    raw = os.environ.get("PTCL_CACHE_DIR") or str(Path.home() / ".cache" / "ptcl")
    try:
        return Path(raw).expanduser()
    except RuntimeError as e:  # ~user of an unknown user
        raise ConfigError(f"PTCL_CACHE_DIR={raw}: {e}; set it to a writable folder") from None


def cache_dir(*parts: str) -> Path:
    """The cache root (or a sub-folder of it), created on first use.

    Raises :class:`ConfigError` when it cannot be a writable folder (``PTCL_CACHE_DIR`` is
    a file, lies below a file, or is read-only), naming the variable and the fix.
    """
    from ptcl.io import writable_dir_error

    root = cache_root()
    p = root.joinpath(*parts)
    fix = "set PTCL_CACHE_DIR to a writable folder"
    why = writable_dir_error(root, "the cache folder (PTCL_CACHE_DIR)") or writable_dir_error(
        p, "the cache folder (PTCL_CACHE_DIR)"
    )
    if why:
        raise ConfigError(f"{why}; {fix}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the cache folder {p} (PTCL_CACHE_DIR): {e}; {fix}") from None
    return p
