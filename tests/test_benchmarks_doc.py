"""Every command BENCHMARKS.md shows parses with its script's own argument parser, names data that
exists beside the checkout, and BENCHMARKS.md stays a short page for users."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"
COMMANDS = [line.strip() for line in DOC.read_text().splitlines() if line.startswith("python benchmarks/")]


class _Parsed(Exception):
    """Raised right after parse_args: the command is valid, nothing is run."""


def test_benchmarks_md_is_short_and_shows_commands():
    assert len(DOC.read_text().splitlines()) < 350
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("[!_]*.py")}
    shown = {Path(shlex.split(c)[1]).stem for c in COMMANDS}
    assert shown == scripts  # one command at least for every benchmark, none for a missing one


@pytest.mark.parametrize("command", COMMANDS)
def test_command_parses_as_written(command, monkeypatch):
    argv = shlex.split(command)[1:]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # exits 2 on an unknown flag or a bad value
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(_Parsed):
        runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    for data in re.findall(r"--data-dir (\S+)", command):
        if not (ROOT.parent / "shared").is_dir():
            pytest.skip("no shared/ data beside this checkout")
        assert (ROOT / data).exists(), f"{command}: {data} does not exist"
