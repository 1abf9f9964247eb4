"""File permissions of what vlm2emb writes.

Two writers make their output private whatever the user's umask says: ``tempfile.mkdtemp``
(0700, used for atomic writes beside the destination) and safetensors' ``save_file`` (0600).
Run folders, checkpoints and exports are meant to be shared like any file the user creates,
so they are given the permissions a plain ``mkdir`` / ``open`` would give under the
process's umask.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(paths: Iterable[Path]) -> None:
    """Gives each file ``0o666 & ~umask`` and each directory ``0o777 & ~umask``; links are
    left alone."""
    mask = current_umask()
    for path in paths:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        elif path.is_file():
            os.chmod(path, 0o666 & ~mask)


def honour_umask_tree(root: Path) -> None:
    """:func:`honour_umask` for ``root`` and everything under it (a folder vlm2emb owns)."""
    honour_umask([root, *root.rglob("*")])
