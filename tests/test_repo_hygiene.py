"""Repository hygiene: tracked files hold no absolute paths of a particular machine and no notes
about how the work was organised (work-log words such as "stop 12" or "closing note").

The files are the ones ``git ls-files`` lists (binary files skipped); the tests skip when git or
a git checkout is not available. A line that must keep such text on purpose can carry the marker
``repo-hygiene: ignore``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()
IGNORE_MARKER = "repo-hygiene: ignore"
BINARY_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".ico", ".pdf", ".safetensors", ".onnx", ".pt", ".pth", ".bin",
    ".npy", ".npz", ".pkl", ".gz", ".zip", ".tar", ".whl", ".data", ".idx", ".ubyte",
}

# An absolute path rooted in a machine's own folders. The look-behind keeps out relative paths
# (``../shared/data``, a ``tmp`` folder inside ``runs``), home-relative ones (``~`` first) and
# URLs whose path starts with such a folder name; a ``file://`` URL of an absolute path is still
# caught (examples below).
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~-])/(?:work|tmp|home|root|Users|mnt)/"
    r"|(?<![\w\\])[A-Za-z]:\\"  # C:\ (also its escaped form C:\\ in source and JSON)
)

# Work-log vocabulary. "session" alone is not flagged: ONNX Runtime sessions and pytest's
# session scope are ordinary code words; only phrasings about a working session are.
ORGANISATION = re.compile(
    r"\bstops?(?: |-(?=\d))\d{1,2}\b"  # "stop 10", "stops 10-11", "stop-10 recipe"
    r"|\bthis stop\b"
    r"|\bclosing[ -]notes?\b"
    r"|\b(?:this|that|next|previous|last|earlier|later|work|working|coding)[ -]session\b"
    r"|\b(?:fit|fits|fitted|end of|rest of|left in)\s+the\s+session\b",
    re.IGNORECASE,
)


def _git_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True,
                             timeout=30).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


@lru_cache(maxsize=1)
def _text_files() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(path relative to the root, lines) of every tracked text file that exists in the work tree."""
    files = []
    for path in _git_files():
        if path.resolve() == SELF or path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
            continue  # the patterns themselves; binaries; tracked files deleted in the work tree
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        files.append((path.relative_to(ROOT).as_posix(), tuple(data.decode("utf-8", "replace").splitlines())))
    return tuple(files)


def _offences(pattern: re.Pattern[str]) -> list[str]:
    found = []
    for name, lines in _text_files():
        for number, line in enumerate(lines, 1):
            match = pattern.search(line)
            if match and IGNORE_MARKER not in line:
                found.append(f"{name}:{number}: {match.group(0)!r} in: {line.strip()[:160]}")
    return found


def test_tracked_files_hold_no_absolute_machine_paths() -> None:
    offences = _offences(ABSOLUTE_PATH)
    assert not offences, ("absolute paths of a machine (use paths relative to the repository, "
                          "e.g. ../shared/data/mnist or tmp_path):\n" + "\n".join(offences))


def test_tracked_files_hold_no_work_organisation_notes() -> None:
    offences = _offences(ORGANISATION)
    assert not offences, ("notes about how the work was organised (say what the code or the "
                          "figures are, not when or in which step they came):\n" + "\n".join(offences))


def _abs(folder: str, rest: str) -> str:
    """An absolute path of a machine, built here so that this file does not hold one itself."""
    return "/" + folder + "/" + rest


@pytest.mark.parametrize("text", [
    "--data-dir " + _abs("work", "shared/data/mnist"), "--json " + _abs("tmp", "x.json"),
    "open('" + _abs("home", "ann/model.onnx") + "')", "cd " + _abs("root", "repo"), _abs("Users", "ann/data"),
    '"C:\\\\Users\\\\ann"', r"C:\data", "file://" + _abs("tmp", "x"),
])
def test_absolute_path_pattern_catches(text: str) -> None:
    assert ABSOLUTE_PATH.search(text)


@pytest.mark.parametrize("text", [
    "--data-dir ../shared/data/mnist", "tmp_path / 'model.onnx'", "runs" + _abs("tmp", "x"), "~" + _abs("work", "notes"),
    "https://example.org" + _abs("home", "index.html"), "benchmarks/results/prune_han.json", "a/b: c\\d",
])
def test_absolute_path_pattern_spares(text: str) -> None:
    assert not ABSOLUTE_PATH.search(text)


@pytest.mark.parametrize("text", [
    "Stop 10-11 teacher", "the stop-10 recipe", "stop 8's export", "measured in stop 12",
    "this stop's run", "Closing note: done", "did not fit the session", "in this session",
])
def test_organisation_pattern_catches(text: str) -> None:
    assert ORGANISATION.search(text)


@pytest.mark.parametrize("text", [
    "session = make_session(path)", "ORT sessions", "Run the session once", "the session's input names",
    "per-session temp cache", 'scope="session"', "range(start, stop - 1)", "early stopping after 10 epochs",
    "stop_gradient(x)", "ort.InferenceSession(model)",
])
def test_organisation_pattern_spares(text: str) -> None:
    assert not ORGANISATION.search(text)
