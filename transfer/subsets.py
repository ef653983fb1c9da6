"""Labelled subsets for semi-supervised fine-tuning, in the SimCLR list format.

A list file names one training image per line, ``<class>_<id>.<ext>`` (ImageNet: ``n01440764_10026.JPEG``),
as in SimCLR's ``imagenet_subsets/{1,10}percent.txt``. The class is the part before the first ``_``
(the ImageNet wnid, i.e. the ImageFolder class folder).

- ``resolve_subset_list(value)``: ``1percent`` / ``10percent`` name SimCLR's lists shipped in this package
  (``transfer/imagenet_subsets/``, see its README for the source); anything else is a path.
- ``read_subset_list(path)``: the file names (blank lines skipped; malformed lines and duplicates are errors).
- ``subset_indices(samples, names)``: the positions of those files in an ImageFolder's ``samples``;
  files the tree does not have are an error that says how many are missing and shows a few.
- ``balanced_subset(samples, percent, seed)``: for datasets without official lists, a deterministic
  class-balanced draw (the same share of every class, at least one image each), returned as file names;
  ``write_subset_list`` saves it in the same format so the run can be repeated with ``subset.list``.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.atomic import atomic_write_text
from common.errors import UserError

_ENTRY = re.compile(r"^([^_/\\\s]+)_([^/\\\s]+)\.([A-Za-z0-9]+)$")


SHIPPED_DIR = Path(__file__).resolve().parent / "imagenet_subsets"
SHIPPED_LISTS = ("1percent", "10percent")  # SimCLR's ImageNet lists (google-research/simclr imagenet_subsets/)


class SubsetError(UserError, ValueError):
    """A subset list that does not fit the dataset; the message names the problem and the fix."""


def resolve_subset_list(value: str | os.PathLike) -> Path:
    """The list file of ``subset.list``: a shipped list by name (``1percent``, ``10percent``), else a path."""
    name = str(value)
    if name in SHIPPED_LISTS:
        return SHIPPED_DIR / f"{name}.txt"
    return Path(name).expanduser()


def read_subset_list(path: str | os.PathLike) -> list[str]:
    path = resolve_subset_list(path)
    if not path.is_file():
        raise SubsetError(f"subset list {str(path)!r} does not exist; fix: subset.list=10percent or 1percent (SimCLR's "
                          "lists, shipped), a list file (one <wnid>_<id>.JPEG per line), or subset.percent")
    names, bad, seen, dups = [], [], set(), []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if not _ENTRY.match(name):
            bad.append(f"line {lineno}: {name!r}")
        elif name in seen:
            dups.append(name)
        else:
            seen.add(name)
            names.append(name)
    if bad:
        raise SubsetError(f"subset list {path}: {len(bad)} lines are not <class>_<id>.<ext> file names, e.g. "
                          f"{bad[:3]}; fix: one image file name per line, as in SimCLR's 10percent.txt")
    if dups:
        raise SubsetError(f"subset list {path} names {len(dups)} files twice, e.g. {dups[:3]}; "
                          "fix: remove the duplicates")
    if not names:
        raise SubsetError(f"subset list {path} is empty; fix: one image file name per line")
    return names


def class_of(name: str) -> str:
    """The class (wnid) of a list entry: the part before the first ``_``."""
    return name.split("_", 1)[0]


def subset_classes(names: Iterable[str]) -> set[str]:
    return {class_of(n) for n in names}


def subset_indices(samples: Sequence[tuple[str, int]], names: Sequence[str], root: str = "the dataset") -> list[int]:
    """Positions in ``samples`` (an ImageFolder's ``(path, class_index)`` list) of the listed files, in list order.

    A file is matched by its class folder and file name (``<root>/<wnid>/<wnid>_<id>.JPEG``), so files
    with the same name in different folders cannot be confused.
    """
    where = {(Path(p).parent.name, Path(p).name): i for i, (p, _) in enumerate(samples)}
    indices, missing = [], []
    for n in names:
        i = where.get((class_of(n), n))
        if i is None:
            missing.append(n)
        else:
            indices.append(i)
    if missing:
        raise SubsetError(f"{len(missing)} of the {len(names)} files of the subset list are not in {root} "
                          f"(e.g. {missing[:5]}); fix: point data.root/data.train_dir at the full training set the "
                          "list was made for (its files are <train_dir>/<wnid>/<wnid>_<id>.JPEG), or draw a subset "
                          "of this dataset with subset.percent")
    return indices


def balanced_subset(samples: Sequence[tuple[str, int]], percent: float, seed: int) -> list[str]:
    """``percent`` % of every class (rounded up, at least 1), drawn from ``seed``; file names sorted per class.

    Deterministic: the draw depends only on the seed and the sorted file names of each class.
    """
    if not 0 < percent <= 100:
        raise SubsetError(f"subset percent must be in (0, 100], got {percent}")
    by_class: dict[int, list[str]] = defaultdict(list)
    bad = []
    for p, target in samples:
        name = Path(p).name
        if not _ENTRY.match(name) or class_of(name) != Path(p).parent.name:
            bad.append(f"{Path(p).parent.name}/{name}")
        by_class[target].append(name)
    if bad:
        raise SubsetError(f"{len(bad)} images cannot be named in a SimCLR list, which needs <class>/<class>_<id>.<ext> "
                          f"(e.g. {bad[:3]}); fix: name the images <class>_<id>.<ext> inside their class folder, as "
                          "ImageNet does")
    names = []
    for target in sorted(by_class):
        files = sorted(by_class[target])
        k = max(1, math.ceil(len(files) * percent / 100.0 - 1e-9))
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(target)]))
        chosen = sorted(rng.choice(len(files), size=k, replace=False).tolist())
        names.extend(files[i] for i in chosen)
    return names


def write_subset_list(path: str | os.PathLike, names: Sequence[str]) -> Path:
    return atomic_write_text(path, "".join(f"{n}\n" for n in names))
