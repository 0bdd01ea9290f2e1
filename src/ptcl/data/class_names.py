"""Class names in words, for vision-language methods (text prompts such as "a photo of a {}.").

A dataset's class *ids* are its folder names (ImageFolder datasets) or its own class list
(CIFAR: ``aquarium_fish``; MNIST: ``0``). Their *names* (:attr:`DatasetSplits.class_names`,
indexed like the dataset's labels) come from, in this order:

1. ``dataset.class_names: PATH``, an explicit name map;
2. a name map beside the data: ``classnames.txt``, else ``words.txt``, in the folder holding
   ``train/`` and ``test/`` (inside the archive for a ``.tar.gz``) or in the dataset root;
3. the ids themselves, made readable by :func:`readable`: a leading ``NNN.`` numbering is
   dropped (CUB's ``001.Black_footed_Albatross``) and underscores become spaces.

Name-map formats (UTF-8; blank lines and lines starting with ``#`` are skipped):

* ``id<TAB>name`` or ``id name`` (split at the first tab, else the first space), one class
  per line; ids the dataset lacks are ignored (a big map may serve a subset), and an id the
  map lacks is a :class:`DataError` naming it;
* one name per line, in class-index order (the sorted folder names), used when no line
  starts with a class id; the count must equal the number of classes;
* a file named ``words.txt`` (Tiny-ImageNet / ImageNet's WordNet list:
  ``wnid<TAB>name, synonym, ...``): the first synonym is the name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ptcl.errors import DataError

log = logging.getLogger(__name__)

NAME_MAP_FILES = ("classnames.txt", "words.txt")
"""Name maps looked for beside the data, in this order."""

_NUMBERING = re.compile(r"^\d+\.(?=\D)")


def readable(class_id: str) -> str:
    """``class_id`` as words: a leading ``NNN.`` numbering dropped, ``_`` as spaces."""
    name = _NUMBERING.sub("", str(class_id)).replace("_", " ")
    return " ".join(name.split()) or str(class_id)


def default_names(class_ids: Sequence[str]) -> list[str]:
    """:func:`readable` of every id."""
    return [readable(c) for c in class_ids]


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the class-name map {path}: {e}") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def read_name_map(path: str | os.PathLike[str], class_ids: Sequence[str]) -> list[str]:
    """The names of ``class_ids`` (in their order) from the name map at ``path`` (formats in
    the module docstring). Raises :class:`DataError` for an unreadable file, an id the map
    lacks, or a list whose length differs from the number of classes."""
    p = Path(path)
    lines = _lines(p)
    wordnet = p.name == "words.txt"
    ids = set(class_ids)
    table: dict[str, str] = {}
    for ln in lines:
        key, sep, rest = ln.partition("\t") if "\t" in ln else ln.partition(" ")
        if sep and rest.strip():
            table.setdefault(key.strip(), rest.strip())
    if ids & table.keys():
        missing = [c for c in class_ids if c not in table]
        if missing:
            raise DataError(
                f"class-name map {p} lacks {len(missing)} of the {len(class_ids)} class ids, e.g. "
                f"{missing[:5]}; add a line 'id<TAB>name' for each (or fix dataset.class_names)"
            )
        names = [table[c] for c in class_ids]
        if wordnet:
            names = [n.split(",")[0].strip() for n in names]
    elif len(lines) == len(class_ids) and not wordnet:
        names = lines
    else:
        raise DataError(
            f"class-name map {p} neither maps the class ids (e.g. {list(class_ids)[:3]}) to names "
            f"('id<TAB>name' lines) nor lists one name per class ({len(lines)} names for "
            f"{len(class_ids)} classes)"
        )
    empty = [c for c, n in zip(class_ids, names) if not n]
    if empty:
        raise DataError(f"class-name map {p} gives class {empty[0]!r} an empty name")
    return names


def find_name_map(folders: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The first of :data:`NAME_MAP_FILES` found in ``folders`` (in order), or None."""
    for folder in folders:
        for f in NAME_MAP_FILES:
            p = Path(folder) / f
            if p.is_file():
                return p
    return None


def class_names(
    class_ids: Sequence[str],
    folders: Sequence[str | os.PathLike[str]] = (),
    explicit: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Names of ``class_ids``: from ``explicit`` (a name map), else from a name map found
    in ``folders``, else :func:`default_names`."""
    path = Path(explicit) if explicit is not None else find_name_map(folders)
    if path is None:
        return default_names(class_ids)
    if not path.is_file():
        raise DataError(f"dataset.class_names: {path} is not a file")
    names = read_name_map(path, class_ids)
    log.info("class names from %s (e.g. %s)", path, ", ".join(names[:3]))
    return names
