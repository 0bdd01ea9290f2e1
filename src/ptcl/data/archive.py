"""Safe, once-only extraction of dataset archives (``.tar``, ``.tar.gz``, ``.tgz``, ... and
``.zip``, the format of official downloads such as Tiny-ImageNet-200's).

An archive is unpacked into ``cache_dir("extracted", KEY)`` where ``KEY`` is derived from
the archive's absolute path, size and modification time, so a changed archive gets a fresh
folder. Extraction goes into a temporary sibling folder that is renamed into place only
when complete: a killed extraction never looks like a finished one, and its leftover
(named after its host and process, :func:`ptcl.io.tmp_prefix`) is removed on the next start.
The extracted folder gets the umask's folder mode (not ``mkdtemp``'s private ``0700``).
Both formats get the same checks: members with absolute paths, ``..`` components or drive
letters are refused (the whole archive, with a one-line :class:`DataError`), as are unsafe
links and device files in a tar and symbolic links or encrypted members in a zip.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from ptcl.errors import DataError
from ptcl.io import dir_mode, is_disk_full, remove_stale_tmp, tmp_prefix
from ptcl.paths import cache_dir

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a tar or zip archive we can extract (by its suffix)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def is_zip(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a zip archive (by its suffix)."""
    return str(path).lower().endswith(ZIP_SUFFIXES)


def archive_key(path: str | os.PathLike[str]) -> str:
    """16 hex digits identifying an archive by absolute path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _unsafe(name: str) -> bool:
    """Whether member name ``name`` is absolute, has a drive letter or a ``..`` component."""
    pp = PurePosixPath(name.replace("\\", "/"))
    drive = len(name) > 2 and name[0].isalpha() and name[1] == ":" and name[2] in "/\\"
    return name.startswith(("/", "\\")) or pp.is_absolute() or ".." in pp.parts or drive


def _check_member(m: tarfile.TarInfo, archive: Path) -> None:
    """Reject members that could write outside the destination folder."""
    if _unsafe(m.name):
        raise DataError(
            f"unsafe member {m.name!r} in archive {archive} (absolute path or '..'); "
            "refusing to extract it: repack the archive with relative paths"
        )
    if (m.issym() or m.islnk()) and _unsafe(m.linkname):
        raise DataError(
            f"unsafe link {m.name!r} -> {m.linkname!r} in archive {archive}; refusing to extract it"
        )
    if m.isdev():
        raise DataError(f"device file {m.name!r} in archive {archive}; refusing to extract it")


def _checked_members(tf: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    for m in tf:
        _check_member(m, archive)
        yield m


def _extract_tar(src: Path, dest: Path) -> None:
    with tarfile.open(src, "r:*") as tf:
        members = _checked_members(tf, src)
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tf.extractall(dest, members=members)


def _check_zip_member(m: zipfile.ZipInfo, archive: Path) -> None:
    """Reject zip members that could write outside the destination or are not plain data."""
    if _unsafe(m.filename):
        raise DataError(
            f"unsafe member {m.filename!r} in archive {archive} (absolute path or '..'); "
            "refusing to extract it: repack the archive with relative paths"
        )
    if stat.S_ISLNK(m.external_attr >> 16):
        raise DataError(f"symbolic link {m.filename!r} in archive {archive}; refusing to extract it")
    if m.flag_bits & 0x1:
        raise DataError(f"encrypted member {m.filename!r} in archive {archive}; unpack it by hand")


def _extract_zip(src: Path, dest: Path) -> None:
    """Check every member first (nothing is written for a refused archive), then extract;
    each member's CRC is verified as it is read."""
    with zipfile.ZipFile(src) as zf:
        members = zf.infolist()
        for m in members:
            _check_zip_member(m, src)
        zf.extractall(dest, members=members)


def _extractor(src: Path) -> Callable[[Path, Path], None]:
    return _extract_zip if is_zip(src) else _extract_tar


def extract_once(archive: str | os.PathLike[str]) -> Path:
    """Extract ``archive`` into the cache unless already done; return the extracted folder.

    A ``.zip`` (by suffix, :data:`ZIP_SUFFIXES`) is read with :mod:`zipfile`, anything else
    with :mod:`tarfile`. Members with absolute paths, ``..`` components, unsafe links or
    device files (tar), symbolic links or encryption (zip) raise :class:`DataError`; on
    Python versions that have it, tarfile's ``"data"`` filter is also applied. A corrupt
    archive (bad header, truncated, CRC mismatch) raises a one-line :class:`DataError` and
    leaves nothing behind.
    """
    src = Path(archive).resolve()
    if not src.is_file():
        raise DataError(f"archive {src} does not exist or is not a file")
    key = archive_key(src)
    parent = cache_dir("extracted")
    dest = parent / key
    if dest.is_dir():
        log.info("using extracted archive %s at %s", src, dest)
        return dest
    remove_stale_tmp(parent)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(key), suffix=".tmp", dir=parent))
    t0 = time.perf_counter()
    log.info("extracting %s into %s (once; cached afterwards)", src, dest)
    try:
        _extractor(src)(src, tmp)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError,
            EOFError, zlib.error, OSError) as e:  # NotImplementedError: an unknown zip method
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DataError(f"cannot extract archive {src} into {parent}: the disk is full; free "
                            "space or set PTCL_CACHE_DIR to a folder with room") from None
        raise DataError(f"cannot extract archive {src}: {e}; the file may be corrupt") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.chmod(tmp, dir_mode())
        os.rename(tmp, dest)
    except OSError:
        # Another process finished the same extraction first: use its result.
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    log.info("extracted %s in %.1f s", src, time.perf_counter() - t0)
    return dest
