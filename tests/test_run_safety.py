"""Run folders survive interrupts, never lose the user's files, and runs reproduce byte for byte.

The subprocess tests run the real CLI (``python -m edgeslim.cli``): SIGINT, SIGTERM and SIGKILL at
several moments of a multi-step run, two runs racing for one folder, and the same recipe in two
fresh processes with fresh caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgeslim import io
from edgeslim.errors import OutputError
from edgeslim.io import RUN_MARKER, RunFolder

from test_bad_input_catalogue import snapshot


# ----------------------------------------------------------------------------- RunFolder, in process
def _run(target, files: dict[str, str], **kwargs) -> Path:
    with RunFolder(target, **kwargs) as folder:
        for name, text in files.items():
            io.write_text(folder.staging / name, text)
    return folder.target


def test_replacing_a_run_keeps_only_the_new_run(tmp_path):
    _run(tmp_path / "out", {"a.txt": "1", "sub/b.txt": "2"})
    _run(tmp_path / "out", {"a.txt": "3"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [RUN_MARKER, "a.txt"]
    assert (tmp_path / "out" / "a.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, old run or lock left


def test_run_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = _run(tmp_path / "out", {"sub/a.txt": "1"})
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755  # not mkdtemp's private 0700
    assert ((out / "sub" / "a.txt").stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600


def test_two_renames_where_the_file_system_cannot_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    _run(tmp_path / "out", {"a.txt": "1"})
    _run(tmp_path / "out", {"a.txt": "2"})
    assert (tmp_path / "out" / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_run_killed_between_the_two_renames_is_restored(tmp_path):
    _run(tmp_path / "out", {"a.txt": "old"})
    os.rename(tmp_path / "out", tmp_path / ".out.edgeslim-old.tmp")  # the state a SIGKILL can leave
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "out"):
            assert (tmp_path / "out" / "a.txt").read_text() == "old"  # restored before any work
            raise RuntimeError("the new run fails")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"


def test_user_files_are_refused_then_kept_with_overwrite(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="notes.txt"):
        _run(user, {"a.txt": "1"})
    _run(user, {"a.txt": "1", "sub/b.txt": "1"}, overwrite=True)
    _run(user, {"c.txt": "2"}, overwrite=True)  # the earlier run's files go, the user's stay
    assert sorted(p.name for p in user.iterdir()) == [RUN_MARKER, "c.txt", "notes.txt"]
    with pytest.raises(OutputError, match="would replace notes.txt"):
        _run(user, {"notes.txt": "overwritten?"}, overwrite=True)
    assert (user / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_file_the_user_put_into_a_run_folder_is_never_deleted(tmp_path):
    _run(tmp_path / "out", {"a.txt": "1"})
    (tmp_path / "out" / "analysis.ipynb").write_text("user work")
    with pytest.raises(OutputError, match="analysis.ipynb"):
        _run(tmp_path / "out", {"a.txt": "2"})
    _run(tmp_path / "out", {"a.txt": "2"}, overwrite=True)
    assert (tmp_path / "out" / "analysis.ipynb").read_text() == "user work"
    assert (tmp_path / "out" / "a.txt").read_text() == "2"


def test_a_run_file_the_user_edited_is_theirs(tmp_path):
    _run(tmp_path / "out", {"report.md": "generated"})
    (tmp_path / "out" / "report.md").write_text("generated, and my comments")
    with pytest.raises(OutputError, match="report.md"):
        _run(tmp_path / "out", {"report.md": "new"})
    with pytest.raises(OutputError, match="would replace report.md"):
        _run(tmp_path / "out", {"report.md": "new"}, overwrite=True)
    assert (tmp_path / "out" / "report.md").read_text() == "generated, and my comments"


def test_stale_staging_is_cleaned_but_foreign_files_in_it_are_not(tmp_path, capsys):
    ours = tmp_path / ".out.edgeslim-dead1.tmp"
    ours.mkdir()
    (ours / io.STAGING_MARKER).write_text("12345")
    (ours / "model.onnx").write_bytes(b"partial")
    odd = tmp_path / ".out.edgeslim-dead2.tmp"  # no marker: someone else's folder with that name
    odd.mkdir()
    (odd / "keep.me").write_text("x")
    _run(tmp_path / "out", {"a.txt": "1"})
    assert not ours.exists()
    assert (odd / "keep.me").read_text() == "x"
    assert "keep.me" in capsys.readouterr().err


def test_a_second_run_into_the_same_folder_fails_at_once(tmp_path):
    with RunFolder(tmp_path / "out") as first:
        io.write_text(first.staging / "a.txt", "first")
        t0 = time.perf_counter()
        with pytest.raises(OutputError, match="another edgeslim run"):
            with RunFolder(tmp_path / "out"):
                pass
        assert time.perf_counter() - t0 < 1.0
    assert (tmp_path / "out" / "a.txt").read_text() == "first"


def test_unwritable_destination_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile"):
        with RunFolder(tmp_path / "afile" / "deeper" / "out"):
            raise AssertionError("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ----------------------------------------------------------------------------- real CLI processes
RECIPE = """
model: {{name: lenet300, train: {{epochs: 2}}}}
data: {{dataset: digits, calibration_samples: 64}}
seed: 7
steps:
  - {{technique: prune_magnitude, sparsity: 0.5, fine_tune: {{epochs: 1, progress: false}}}}
  - {{technique: ptq_int8, progress: false}}
runtime: {{threads: 1, warmup: 5, runs: {runs}, rounds: 2, measure_memory: false}}
output: out
"""


def _cli(cwd: Path, cache: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "EDGESLIM_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgeslim.cli", "run", "recipe.yaml", "--quiet", *args],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """Read the process's stderr until a line contains ``marker``; return what was read."""
    seen, t0 = [], time.monotonic()
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        if time.monotonic() - t0 > timeout:
            break
    proc.kill()
    raise AssertionError(f"never saw {marker!r}; stderr: {''.join(seen)[-2000:]}")


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out."))


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """A folder with a complete run of a three-stage recipe whose latency phase lasts seconds."""
    tmp = tmp_path_factory.mktemp("interrupt")
    (tmp / "recipe.yaml").write_text(RECIPE.format(runs=20_000))
    proc = _cli(tmp, tmp / "cache")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return tmp


MOMENTS = [
    (signal.SIGINT, "stage 1/2", 130),
    (signal.SIGTERM, "stage 0/2", 143),
    (signal.SIGTERM, "measuring latency", 143),
    (signal.SIGKILL, "stage 0/2", -9),
    (signal.SIGKILL, "stage 2/2", -9),
    (signal.SIGKILL, "measuring latency", -9),
]


@pytest.mark.parametrize("sig, marker, code", MOMENTS, ids=[f"{s.name}-{m.split()[0]}{m[-3:]}" for s, m, _ in MOMENTS])
def test_interrupt_leaves_the_previous_run_intact(slow_run, sig, marker, code):
    before = snapshot(slow_run / "out")
    proc = _cli(slow_run, slow_run / "cache")
    _wait_for(proc, marker)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == code, rest
    assert snapshot(slow_run / "out") == before  # the previous run, byte for byte
    if sig != signal.SIGKILL:  # a handled signal cleans up after itself
        assert "interrupted" in rest and len(rest.strip().splitlines()) == 1, rest
        assert _debris(slow_run) == []


def test_the_next_run_removes_what_killed_runs_left(slow_run):
    # after the SIGKILL cases (pytest runs them first, in file order); also fine on its own
    proc = _cli(slow_run, slow_run / "cache", "--force")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _debris(slow_run) == []
    assert sorted(p.name for p in slow_run.iterdir()) == ["cache", "out", "recipe.yaml"]
    assert json.loads((slow_run / "out" / "metrics.json").read_text())["seed"] == 7


def test_two_runs_into_one_folder_one_wins_the_other_fails_at_once(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(runs=20_000))
    first = _cli(tmp_path, tmp_path / "cache")
    _wait_for(first, "stage 0/2")  # the first run holds the folder from before its training
    t0 = time.monotonic()
    second = _cli(tmp_path, tmp_path / "cache")
    _, err2 = second.communicate(timeout=120)
    waited = time.monotonic() - t0
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "another edgeslim run" in err2 and "output out" in err2, err2
    assert waited < 30  # it did not wait for, or redo, the first run's work
    assert (tmp_path / "out" / "02_ptq_int8" / "model.onnx").is_file()
    assert _debris(tmp_path) == []


def _digests(out: Path) -> dict[str, str]:
    # metrics.json, report.md and pareto.png hold latencies (which vary); recipe.yaml its --out
    other = {"metrics.json", "report.md", "pareto.png", "recipe.yaml", RUN_MARKER}  # (the marker hashes those)
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in other}


def _untimed(out: Path) -> list[dict]:
    keys = ("name", "accuracy", "size_bytes", "onnx_size_bytes", "params", "macs", "int8_op_fraction",
            "compute_ops", "int_compute_ops", "config")
    m = json.loads((out / "metrics.json").read_text())
    return [m["seed"]] + [{k: s.get(k) for k in keys} for s in m["stages"]]


def test_same_seed_same_bytes_in_fresh_processes(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(runs=20))
    procs = [_cli(tmp_path, tmp_path / f"cache{i}", "--out", f"run{i}") for i in (1, 2)]  # fresh caches
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a, b = _digests(tmp_path / "run1"), _digests(tmp_path / "run2")
    assert len([k for k in a if k.endswith("model.onnx")]) == 3
    assert a == b  # every model.onnx (and sparse file) is byte-identical
    assert _untimed(tmp_path / "run1") == _untimed(tmp_path / "run2")
    recipes = [yaml.safe_load((tmp_path / f"run{i}" / "recipe.yaml").read_text()) for i in (1, 2)]
    assert [r.pop("output") for r in recipes] == ["run1", "run2"] and recipes[0] == recipes[1]
    assert _untimed(tmp_path / "run1")[0] == 7
    # and the deployable files carry no path of this machine (the exporter's stack traces would)
    import edgeslim

    checkout = os.fsencode(str(Path(edgeslim.__file__).resolve().parents[1]))
    for onnx_file in (tmp_path / "run1").rglob("model.onnx"):
        data = onnx_file.read_bytes()
        assert checkout not in data and b"site-packages" not in data
