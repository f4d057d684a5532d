"""The edgeslim command line: a thin layer over the Python API.

Errors caused by input (recipe, data, model, checkpoint, ONNX file) print one line on stderr and
exit with code 2; nothing is left half-written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained PyTorch models small and fast for edge devices, measured on ONNX Runtime.")


def _print_result(result) -> None:
    from rich.console import Console

    from edgeslim.report import rich_table

    console = Console()
    if not console.is_terminal:  # pipes and CI: do not squeeze the table into 80 columns
        console = Console(width=130)
    console.print(rich_table(result))
    if result.out_dir is not None:
        console.print(f"run folder: {result.out_dir}  (metrics.json, report.md, pareto.png, */model.onnx)")


_CPUS = os.cpu_count() or 1
_FORCE_HELP = ("Also write into a folder that holds files edgeslim did not write (they are kept; "
               "only an earlier run's files are replaced).")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder to write."),
         force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bars.")) -> None:
    """Train (or load the cached) small CNN on the bundled MNIST sample, then fp32 -> int8 PTQ."""
    from edgeslim.recipe import DEMO_RECIPE, parse_recipe, run_recipe

    recipe = parse_recipe({**DEMO_RECIPE, "output": str(out)})
    _print_result(run_recipe(recipe, progress=not quiet, overwrite=force))


@app.command()
def run(recipe_path: Path = typer.Argument(..., metavar="RECIPE.yaml", help="Recipe file."),
        out: Optional[Path] = typer.Option(None, "--out", help="Override the recipe's output folder."),
        force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars.")) -> None:
    """Run a YAML recipe: baseline, then each step, measured after each."""
    import dataclasses

    from edgeslim.recipe import load_recipe, run_recipe

    recipe = load_recipe(recipe_path)
    if out is not None:
        recipe = dataclasses.replace(recipe, output=str(out))
    _print_result(run_recipe(recipe, progress=not quiet, overwrite=force))


_SHAPE_HELP = "Size of an input's dynamic axes, e.g. --shape input=1x3x224x224 (repeat per input)."


@app.command()
def bench(model: Path = typer.Argument(..., metavar="MODEL.onnx"),
          threads: int = typer.Option(1, "--threads", min=1, max=_CPUS, help="Intra-op threads (at most the cores)."),
          batch_size: int = typer.Option(1, "--batch-size", min=1, max=65_536),
          runs: int = typer.Option(300, "--runs", min=1, max=100_000),
          warmup: int = typer.Option(30, "--warmup", min=0, max=10_000),
          shape: list[str] = typer.Option([], "--shape", help=_SHAPE_HELP),
          flush_denormals: bool = typer.Option(False, "--flush-denormals",
                                               help="Time with denormal floats flushed to zero (x86 FTZ/DAZ).")) -> None:
    """Latency percentiles and peak memory of an ONNX model on ONNX Runtime."""
    from rich.console import Console
    from rich.table import Table

    from edgeslim.runtime import (benchmark_latency, dummy_feed, input_shapes, make_session, parse_shapes,
                                  peak_memory_bytes, size_bytes)

    shapes = parse_shapes(shape)  # before loading the model: a typo fails at once
    session = make_session(model, threads=threads)
    feeds = dummy_feed(session, input_shapes(session, shapes, batch_size))
    stats = benchmark_latency(model, feeds, threads=threads, warmup=warmup, runs=runs, flush_denormals=flush_denormals)
    memory = peak_memory_bytes(model, {k: list(v.shape) for k, v in feeds.items()}, threads=threads)
    ftz = ", denormals flushed" if flush_denormals else ""
    table = Table(title=f"{model.name} on ONNX Runtime ({threads} thread, batch {batch_size}{ftz})")
    for col in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "runs", "size", "peak memory"):
        table.add_column(col, justify="right")
    table.add_row(f"{stats.p50_ms:.3f}", f"{stats.p90_ms:.3f}", f"{stats.p99_ms:.3f}", f"{stats.mean_ms:.3f}",
                  str(stats.runs), f"{size_bytes(model):,} B", f"{memory / 2**20:.1f} MiB")
    Console().print(table)


@app.command()
def inspect(model: Path = typer.Argument(..., metavar="MODEL.onnx"),
            threads: int = typer.Option(1, "--threads", min=1, max=_CPUS),
            shape: list[str] = typer.Option([], "--shape", help=_SHAPE_HELP + " Optimizes for those sizes.")) -> None:
    """Op histogram of the ORT-optimized graph and the share of compute ops on integer kernels."""
    from rich.console import Console
    from rich.table import Table

    from edgeslim.runtime import input_shapes, inspect_optimized, make_session, parse_shapes, with_static_shapes

    shapes = parse_shapes(shape)
    target = model
    if shapes:
        import onnx

        from edgeslim.errors import RuntimeToolError

        session = make_session(model, optimization="disable")
        full = input_shapes(session, shapes)  # checks names, ranks and fixed axes
        try:
            target = with_static_shapes(onnx.load(str(model)), full)
        except Exception as err:
            raise RuntimeToolError(f"cannot read {model}: {err}") from None
    report = inspect_optimized(target, threads=threads)
    table = Table(title=f"{model.name}: ORT-optimized graph")
    table.add_column("op type")
    table.add_column("count", justify="right")
    for op, n in sorted(report.op_histogram.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(op, str(n))
    console = Console()
    console.print(table)
    frac = "n/a" if report.int8_op_fraction is None else f"{report.int8_op_fraction:.0%}"
    console.print(f"compute ops: {report.compute_ops}, on integer kernels: {report.int_compute_ops} ({frac})")
    if report.fp_compute_nodes:
        console.print("still in float: " + ", ".join(report.fp_compute_nodes))


@app.command("list")
def list_() -> None:
    """Registered techniques, bundled models and data sets."""
    from rich.console import Console
    from rich.table import Table

    from edgeslim.data import DATASETS
    from edgeslim.recipe import TEXT_DATASETS, known_models
    from edgeslim.registry import list_techniques

    table = Table(title="techniques (recipe: steps: - technique: NAME)")
    for col in ("name", "config", "what it does"):
        table.add_column(col)
    for t in list_techniques():
        table.add_row(t.name, t.config_type.__name__, t.summary)
    console = Console()
    console.print(table)
    console.print("models: " + ", ".join(known_models()))
    console.print("data sets: " + ", ".join(DATASETS + TEXT_DATASETS)
                  + "; or data: images: DIR (+ labels: CSV), arrays: FILE.npz, factory: 'module:function'")


def _on_signal(signum, frame) -> None:
    from edgeslim.errors import Interrupted

    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning input errors into one line on stderr and exit code 2.

    SIGINT and SIGTERM stop a run cleanly: its staging folder is removed, the output folder is
    left as it was, and the exit code is 130 / 143 (128 + the signal number).
    """
    import signal

    from edgeslim.errors import EdgeslimError, Interrupted, first_line

    previous = {}
    try:
        # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signal handling to the host program
        pass
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args or ["--help"], prog_name="edgeslim", standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except typer.Exit as exit_:
        return exit_.exit_code
    except Interrupted as err:
        print(f"edgeslim: interrupted ({signal.Signals(err.signum).name}); the output folder was left as it was",
              file=sys.stderr)
        return 128 + err.signum
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except EdgeslimError as err:
        print(f"edgeslim: error: {first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int):
            # a usage error of the command line parser (typer's click): one line, exit 2
            param = getattr(err, "param", None)
            name = "/".join(getattr(param, "opts", None) or []) or getattr(param, "name", None)
            msg = " ".join(err.format_message().split())
            if name and "'" not in msg:  # the parser's message names the option in quotes
                msg = f"{name}: {msg}"
            print(f"edgeslim: error: {msg}", file=sys.stderr)
            return 2
        if os.environ.get("EDGESLIM_DEBUG"):
            raise
        first = first_line(err)
        print(f"edgeslim: internal error: {type(err).__name__}: {first} (set EDGESLIM_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def console_main() -> None:
    """The ``edgeslim`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
