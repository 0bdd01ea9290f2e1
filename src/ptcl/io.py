"""Atomic file writes: write to a temporary file in the same folder, then ``os.replace``.

A run killed at any moment leaves either the old file or the new one, never half of one.
The temporary file is named ``.<name>.<host>-<pid>.<random>.tmp``: a leftover of a killed
writer is recognised (its process is gone) and removed by :func:`remove_stale_tmp` on the
next start. Written files get the mode the process's umask gives any new file (``0644``
under the usual ``022``), not ``mkstemp``'s private ``0600``, so a teammate can read results.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ptcl.errors import BackboneError

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
_TMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
STALE_TMP_S = 6 * 3600  # a temporary file of another machine (shared disk) is stale after this


def umask() -> int:
    """The process's current umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(old)
    return old


def file_mode() -> int:
    """Mode of a new regular file under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask (``0o777 & ~umask``)."""
    return 0o777 & ~umask()


def tmp_prefix(name: str) -> str:
    """Prefix of this process's temporary files for ``name`` (see the module docstring)."""
    return f".{name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_tmp(path: Path, owned: bool = False) -> bool:
    """Whether ``path`` is a leftover temporary file or folder of a writer that is gone.

    ``owned``: the caller holds the folder's lock, so every temporary entry in it is stale.
    Otherwise: stale when its process (this host) is gone, or, for another host's or an
    older unnamed one, when older than :data:`STALE_TMP_S`.
    """
    if owned:
        return True
    m = _TMP.match(path.name)
    if m and m["host"] == _HOST:
        return not _pid_alive(int(m["pid"]))
    try:
        return time.time() - path.lstat().st_mtime > STALE_TMP_S
    except OSError:
        return False


def remove_stale_tmp(folder: str | os.PathLike, owned: bool = False) -> int:
    """Remove leftover ``.*.tmp`` files of killed writers in ``folder``; returns how many."""
    import shutil

    n = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for p in entries:
        if not (p.name.startswith(".") and (p.name.endswith(".tmp") or ".tmp-" in p.name)):
            continue
        if is_stale_tmp(p, owned):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                n += 1
                log.info("removed a leftover of an interrupted write: %s", p)
            except OSError:
                pass
    return n


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically.

    Raises ``OSError`` as the file system does (``ENOSPC`` on a full disk); the temporary
    file is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, w)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors (contiguous CPU copies) atomically."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint, read safely: ``.safetensors`` with safetensors,
    anything else with ``torch.load(weights_only=True)`` (no code runs); a ``{"state_dict":
    {...}}`` wrapper is unwrapped. ``what`` names the file in errors (e.g. the config key).

    Raises :class:`~ptcl.errors.BackboneError` when the file is missing, unreadable or holds
    anything but a dict of tensors (every user-named weights file is a backbone's)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BackboneError(f"{what} {p} does not exist")
    try:
        sd = load_tensors(p) if p.suffix == ".safetensors" else torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure means a bad file the user can replace
        raise BackboneError(f"cannot read {what} {p}: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{what} {p} does not hold a state_dict of tensors")
    return sd


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is the file system saying it has no space (or quota) left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)  # writers that wrap the OS error (safetensors) keep its text
    return f"os error {errno.ENOSPC})" in text or "No space left on device" in text


def writable_dir_error(path: str | os.PathLike, what: str) -> str | None:
    """Why folder ``path`` (existing or to be created) cannot be written, or ``None``.

    Checks that ``path`` is not a file, that no part of it is a file, and that the nearest
    existing folder is writable (``os.access``; root bypasses permission bits).
    """
    try:
        p = Path(path).expanduser()
    except RuntimeError as e:  # ~user of an unknown user
        return f"{what} {path}: {e}"
    if p.exists() and not p.is_dir():
        return f"{what} {p} exists and is not a folder"
    q = p
    while not os.path.lexists(q):
        if q.parent == q:
            break
        q = q.parent
    if q.is_symlink() and not q.exists():
        return f"{what} {p} is or lies below {q}, a dangling (or looping) symbolic link"
    if q.exists() and not q.is_dir():
        return f"{what} {p} lies below {q}, which is a file"
    if not os.access(q, os.W_OK | os.X_OK):
        return f"{what} {p} is not writable ({q} is read-only for this user)"
    return None
