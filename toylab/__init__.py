"""The toy labs: the paper's 2-D toy (``blobs``), the image sweep (``images``), FroSSL's dynamics (``dynamics``)."""

from __future__ import annotations

import sys


def split_overrides(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the lab's own arguments, the Hydra overrides after ``--`` for every pretraining it runs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
