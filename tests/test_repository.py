"""The repository stands on its own: no tracked file points to a path of the machine it
was written on, cites a document that is not shipped, or tells how it was developed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

FORBIDDEN = {
    "a path outside the repository": re.compile(r"/work/|/root/|\.\./shared"),
    # upper case: the unshipped documents; docs/experiments.md is fine
    "an unshipped document": re.compile(r"EXPERIMENTS\.md|INVENTORY"),
    "how the project was developed": re.compile(r"\bsessions?\b|\bdevelopment machine\b", re.IGNORECASE),
}


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def offences(name: str, text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            match = pattern.search(line)
            if match:
                found.append(f"{name}:{number}: {what} ({match.group(0)!r})")
    return found


def test_the_patterns_catch_what_they_should():
    assert offences("x", "see /work/main/README.md")
    assert offences("x", "cd ../shared/paper")
    assert offences("x", "as in INVENTORY 4.1")
    assert offences("x", "Session 1 measured")
    assert offences("x", "on the Development Machine")
    assert not offences("x", "see docs/experiments.md; a fresh cell per seed; /tmp/lorabench-slurm")


def test_no_tracked_file_points_outside_or_tells_how_it_was_developed():
    found = []
    for name in tracked_files():
        path = ROOT / name
        if name == THIS or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary (figures)
            continue
        found.extend(offences(name, data.decode("utf-8", errors="replace")))
    assert not found, "\n".join(found)
