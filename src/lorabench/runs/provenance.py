"""Where a number came from, beyond its config: the code that computed it and the CPU.

``code_version`` is the package version, and, when the package runs from a git checkout,
the commit (``0.1.0+g1a2b3c4``, ``.dirty`` when the package's sources differ from it), so
that rows computed at different commits, as the pieces of a long run are, say which.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

from .. import __version__

PACKAGE = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(PACKAGE))
    except (OSError, subprocess.SubprocessError):
        return __version__  # an installed copy: no checkout to name
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() == "model name":
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
