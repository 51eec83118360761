"""The repository stands on its own: no tracked file points to a path outside it, cites a
document that is not shipped, or tells how it was developed.

The path checks are structural, so they name nothing of any machine: an absolute folder
path must lie under a standard system folder, a ``../`` path must resolve (against the
folder of the file that spells it) to a place inside the repository, a Markdown link must
name a tracked file, and a document named in capitals (``NAME.md``) must be shipped."""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Folders every POSIX system has; anything else absolute belongs to one machine.
SYSTEM_FOLDERS = {"bin", "dev", "etc", "proc", "run", "sbin", "sys", "tmp", "usr", "var"}
# A path segment starts right after a slash that is not part of a URL (://), a JSON
# pointer (#/), a substitution ({dir}/, $OUT/) or a relative path (a/b).
ABSOLUTE_FOLDER = re.compile(r"(?<![\w.:/~#}\)$-])/([A-Za-z_][\w.-]*)/")
PARENT_PATH = re.compile(r"(?<![\w./])((?:\.\./)+[\w.-]*)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
CAPITAL_DOCUMENT = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
DEVELOPMENT = re.compile(r"\bsessions?\b|\bdevelopment machine\b|\bissues? #?\d+", re.IGNORECASE)


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def leaves_repository(name: str, relative: str) -> bool:
    return posixpath.normpath(posixpath.join(posixpath.dirname(name), relative)).startswith("..")


def offences(name: str, text: str, shipped: set[str]) -> list[str]:
    """What in ``text`` (the file ``name``, relative to the root) points outside the repository."""
    shipped_names = {posixpath.basename(path) for path in shipped}
    markdown = name.endswith(".md")
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{number}"
        for match in ABSOLUTE_FOLDER.finditer(line):
            if match.group(1) not in SYSTEM_FOLDERS and not name.endswith(".gitignore"):
                found.append(f"{where}: an absolute path outside the system folders ({match.group(0)!r})")
        for match in PARENT_PATH.finditer(line):
            if leaves_repository(name, match.group(1)):
                found.append(f"{where}: a relative path that leaves the repository ({match.group(1)!r})")
        if markdown:
            for match in MARKDOWN_LINK.finditer(line):
                target = match.group(1)
                if "://" in target or target.startswith("mailto:"):
                    continue
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
                if resolved not in shipped and not any(path.startswith(resolved + "/") for path in shipped):
                    found.append(f"{where}: a link to a file that is not shipped ({target!r})")
        for match in CAPITAL_DOCUMENT.finditer(line):
            if match.group(1) not in shipped_names:
                found.append(f"{where}: a document that is not shipped ({match.group(1)!r})")
        match = DEVELOPMENT.search(line)
        if match:
            found.append(f"{where}: how the project was developed ({match.group(0)!r})")
    return found


def test_the_checks_catch_what_they_should():
    shipped = {"README.md", "docs/experiments.md", "docs/full_length/README.md", "envs/lorabench.yaml"}
    for name, line in [
        ("README.md", "see /home/someone/lorabench/README.md"),
        ("README.md", "cd ../beside/paper"),
        ("docs/experiments.md", "as in ../../outside.md"),
        ("docs/experiments.md", "the [grid](GRIDS.md) of the paper"),
        ("src/x.py", "the table of NOTES_ON_GRIDS.md"),
        ("README.md", "Session 1 measured"),
        ("README.md", "on the Development Machine"),
        ("README.md", "as asked in issue #7"),
    ]:
        assert offences(name, line, shipped), line
    for name, line in [
        ("README.md", "see docs/experiments.md and [the run](docs/full_length/README.md#claims)"),
        ("docs/full_length/README.md", "[schema](../experiments.md) and [home](../../README.md)"),
        ("workflow/rules/common.smk", 'CONDA_ENV = "../../envs/lorabench.yaml"'),
        ("README.md", "https://github.com/a/b, #/definitions/x, {out}/runs.tsv, $OUT/logs/"),
        ("README.md", "/tmp/lorabench-slurm/ and /usr/bin/env and /proc/cpuinfo; x/y/z; lr / 2"),
        ("README.md", "a fresh cell per seed"),
    ]:
        assert not offences(name, line, shipped), line


def test_no_tracked_file_points_outside_or_tells_how_it_was_developed():
    names = tracked_files()
    shipped = set(names)
    found = []
    for name in names:
        path = ROOT / name
        if name == THIS or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary (figures)
            continue
        found.extend(offences(name, data.decode("utf-8", errors="replace"), shipped))
    assert not found, "\n".join(found)
