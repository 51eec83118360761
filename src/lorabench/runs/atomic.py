"""Outputs appear whole or not at all: write to a temporary name beside the target, then
rename (atomic on POSIX within one folder). A killed job leaves at most a hidden
``.<name>.*.tmp`` file, which nothing reads.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask; the file is given
the mode a plain ``open()`` would have (0666 less the umask) before it is renamed, so
outputs are as readable as any other file the user creates."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only
    read it by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, then move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
