"""End to end: a recipe runs through the CLI, writes a complete run folder, and bad input exits 2."""

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.cli import main
from edgeslim.errors import DataError, ModelError
from edgeslim.task import Task

FAST_RUNTIME = {"threads": 1, "warmup": 2, "runs": 20, "rounds": 2}


def write_recipe(tmp_path, body: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One real run on digits: lenet300 trained 4 epochs, fp32 -> ptq_int8."""
    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp, f"""
        model: {{name: lenet300, train: {{epochs: 4, lr: 0.002}}}}
        data: {{dataset: digits, calibration_samples: 256}}
        steps:
          - {{technique: ptq_int8}}
        runtime: {json.dumps(FAST_RUNTIME)}
        output: out
    """)
    code = main(["run", str(recipe), "--quiet"])
    return code, tmp / "out"


def test_run_folder_is_complete(digits_run):
    code, out = digits_run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [".edgeslim-run.json", "00_fp32", "01_ptq_int8", "metrics.json", "pareto.png",
                                                     "recipe.yaml", "report.md"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".out.*"))  # no staging leftovers
    report = (out / "report.md").read_text()
    assert sum(line.startswith("| 0") for line in report.splitlines()) == 2  # one table row per stage


def test_metrics_json_contract(digits_run):
    _, out = digits_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["baseline"] == "00_fp32"
    keys = {"name", "accuracy", "size_bytes", "params", "macs", "latency_ms_p50", "latency_ms_p90",
            "latency_ms_p99", "int8_op_fraction", "speedup_vs_baseline", "size_ratio_vs_baseline", "step_seconds"}
    for stage in m["stages"]:
        assert keys <= set(stage)
        assert stage["latency_ms_p50"] <= stage["latency_ms_p90"] <= stage["latency_ms_p99"]
    fp32, q = m["stages"]
    assert fp32["accuracy"] > 0.9
    assert fp32["int8_op_fraction"] == 0.0 and q["int8_op_fraction"] == 1.0
    assert fp32["speedup_vs_baseline"] == 1.0 and fp32["size_ratio_vs_baseline"] == 1.0
    assert q["size_ratio_vs_baseline"] > 3.0
    assert q["params"] == fp32["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert q["macs"] == fp32["macs"] == 64 * 300 + 300 * 100 + 100 * 10
    assert abs(q["accuracy"] - fp32["accuracy"]) <= 0.02
    assert m["runtime"]["threads"] == 1 and m["machine"]["cpu_count"] >= 1
    assert m["runtime"]["seq_lens"] == "eval" and m["runtime"]["measured_seq_lens"] is None  # no sequence axis


def test_list_shows_techniques(capsys):
    assert main(["list"]) == 0
    assert "ptq_int8" in capsys.readouterr().out


def test_inspect_and_bench_commands(digits_run, capsys):
    _, out = digits_run
    assert main(["inspect", str(out / "01_ptq_int8" / "model.onnx")]) == 0
    text = capsys.readouterr().out
    assert "QGemm" in text and "100%" in text
    assert main(["bench", str(out / "00_fp32" / "model.onnx"), "--runs", "20", "--warmup", "2"]) == 0
    assert "p50" in capsys.readouterr().out


def _fails_cleanly(argv, capsys, needle: str, out_dir=None) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle in err
    if out_dir is not None:
        assert not out_dir.exists() and not list(out_dir.parent.glob(f".{out_dir.name}.*"))


def test_unknown_technique_exits_2(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "model: {name: lenet300}\ndata: {dataset: digits}\nsteps: [{technique: magic}]\noutput: out\n")
    _fails_cleanly(["run", str(recipe)], capsys, "steps[0].technique", tmp_path / "out")


def test_unknown_field_exits_2(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "model: {name: lenet300}\ndata: {dataset: digits, calib: 3}\noutput: out\n")
    _fails_cleanly(["run", str(recipe)], capsys, "data.calib", tmp_path / "out")


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "model: {name: lenet300, checkpoint: gone.safetensors}\ndata: {dataset: digits}\noutput: out\n")
    _fails_cleanly(["run", str(recipe)], capsys, "gone.safetensors", tmp_path / "out")


def test_pickle_checkpoint_is_refused(tmp_path, capsys):
    from edgeslim.models import build_model

    torch.save(build_model("lenet300", input_size=8), tmp_path / "whole_model.pt")  # a pickle, not a state dict
    recipe = write_recipe(tmp_path, "model: {name: lenet300, checkpoint: whole_model.pt}\ndata: {dataset: digits}\n"
                                    "steps: [{technique: ptq_int8}]\noutput: out\n")
    _fails_cleanly(["run", str(recipe)], capsys, "whole_model.pt", tmp_path / "out")


def test_forward_failure_exits_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "badmodels.py").write_text("from torch import nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(10, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe(tmp_path, "model: {factory: 'badmodels:make', train: {epochs: 1}}\ndata: {dataset: digits}\noutput: out\n")
    _fails_cleanly(["run", str(recipe)], capsys, "(1, 1, 8, 8)", tmp_path / "out")


def test_empty_calibration_set_is_refused():
    x = np.zeros((4, 1, 8, 8), np.float32)
    y = np.zeros(4, np.int64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(DataError, match="calibration set is empty"):
        Task(model, (torch.from_numpy(x[:1]),), calibration=(x[:0], y[:0]), evaluation=(x, y))
    with pytest.raises(ModelError, match=r"\(1, 1, 8, 8\)"):
        Task(nn.Linear(3, 3), (torch.from_numpy(x[:1]),), calibration=(x, y), evaluation=(x, y))


def test_a_factory_module_beside_the_recipe_is_importable_from_any_folder(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "beside_recipe_nets.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    recipe = write_recipe(project, f"""
        model: {{factory: "beside_recipe_nets:make", train: {{epochs: 1}}}}
        data: {{dataset: digits, calibration_samples: 32}}
        runtime: {json.dumps({**FAST_RUNTIME, "measure_memory": False})}
        output: out
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(recipe), "--quiet"]) == 0, capsys.readouterr().err
    assert (project / "out" / "00_fp32" / "model.onnx").is_file()
    import sys

    assert str(project) not in sys.path  # searched for that import only


def test_every_technique_config_is_exported_at_the_top_level():
    import edgeslim
    from edgeslim.registry import list_techniques

    for tech in list_techniques():
        assert getattr(edgeslim, tech.config_type.__name__) is tech.config_type
        assert tech.config_type.__name__ in edgeslim.__all__


def test_python_dash_m_edgeslim_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edgeslim", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ptq_int8" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "edgeslim", "run", "missing.yaml"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


def test_compress_can_be_silenced(capsys):
    from edgeslim import PTQInt8Config, RuntimeConfig, compress

    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    y = np.arange(32) % 10
    torch.manual_seed(0)
    task = Task(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), (torch.from_numpy(x[:1]),), (x, y), (x, y))
    runtime = RuntimeConfig(warmup=1, runs=5, rounds=1, measure_memory=False)
    compress(task, [PTQInt8Config(progress=False)], runtime=runtime, progress=False)
    assert capsys.readouterr().err == ""
    compress(task, [PTQInt8Config(progress=False)], runtime=runtime)
    assert "stage 1/1" in capsys.readouterr().err
