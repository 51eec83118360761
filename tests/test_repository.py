"""The repository stands on its own: no tracked file points to a path outside it, cites a
document that is not shipped, or tells how it was developed.

The path checks are structural, so they name nothing of any machine: an absolute folder
path must lie under a standard system folder, a ``../`` path must resolve (against the
folder of the file that spells it) to a place inside the repository, a Markdown link must
name a tracked file, and a document named in capitals (``NAME.md``) must be shipped.
The words that tell how the project was developed are held as digests, so that this file
spells none of them either."""

from __future__ import annotations

import hashlib
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
WORD = re.compile(r"\w+")
# SHA-256 of the lower-case phrases (one or two words, a number written "<n>") that tell
# how the project was developed: a word for a sitting of work, its plural, the phrase for
# the computer it was built on, and a tracker's ticket by number (singular and plural).
DEVELOPMENT_PHRASES = frozenset({
    "3f3af1ecebbd1410ab417ec0d27bbfcb5d340e177ae159b59fc8626c2dfd9175",
    "1225ae6c1ae69dcb4ee4781b703e12206f3b549cd3ca151070a8d8d8f371dd71",
    "75b2f0f7b2d3e8af97a3ec0e92930aa9c2f7d09b85aaea47b0c63328f232dfd1",
    "8db9ceb7805ef4fe3bd9df1b5733f9e4cea44ef47d74237956ddecb7c095476a",
    "7548bc3de16616d43fdcd6817d13865d70dced80b5769da4b6215006451ea107",
})


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def phrase_digest(phrase: str) -> str:
    return hashlib.sha256(phrase.encode()).hexdigest()


def forbidden_phrases(line: str, digests: frozenset[str]) -> list[str]:
    """The phrases of one or two words of ``line`` whose digest is in ``digests``."""
    words = ["<n>" if word.isdigit() else word.lower() for word in WORD.findall(line)]
    phrases = words + [f"{first} {second}" for first, second in zip(words, words[1:])]
    return [phrase for phrase in phrases if phrase_digest(phrase) in digests]


def leaves_repository(name: str, relative: str) -> bool:
    return posixpath.normpath(posixpath.join(posixpath.dirname(name), relative)).startswith("..")


def offences(name: str, text: str, shipped: set[str], development: frozenset[str] = DEVELOPMENT_PHRASES) -> list[str]:
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
        for phrase in forbidden_phrases(line, development):
            found.append(f"{where}: how the project was developed ({phrase!r})")
    return found


def test_the_checks_catch_what_they_should():
    shipped = {"README.md", "docs/experiments.md", "docs/full_length/README.md", "envs/lorabench.yaml"}
    for name, line in [
        ("README.md", "see /home/someone/lorabench/README.md"),
        ("README.md", "cd ../beside/paper"),
        ("docs/experiments.md", "as in ../../outside.md"),
        ("docs/experiments.md", "the [grid](GRIDS.md) of the paper"),
        ("src/x.py", "the table of NOTES_ON_GRIDS.md"),
    ]:
        assert offences(name, line, shipped), line
    # The phrase check, on stand-in phrases of the same three kinds: a word (in any case),
    # a pair of words, and a word followed by a number.
    stand_ins = frozenset(phrase_digest(phrase) for phrase in ("tangerine", "blue whale", "chapter <n>"))
    for line in ["Tangerine 1 measured", "on the BLUE  whale", "as asked in chapter #7", "(chapter 12)"]:
        assert offences("README.md", line, shipped, stand_ins), line
    for line in ["tangerines", "a blue sky and a whale", "chapter one", "chapter_7"]:
        assert not offences("README.md", line, shipped, stand_ins), line
    assert len(DEVELOPMENT_PHRASES) == 5 and all(len(digest) == 64 for digest in DEVELOPMENT_PHRASES)
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
