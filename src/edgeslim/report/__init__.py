"""Reports of a run: the markdown table, the Pareto plot, and the terminal table."""

from edgeslim.report.markdown import markdown_table, rich_table
from edgeslim.report.plot import pareto_plot


def write_report(result, out_dir) -> None:
    """Write ``report.md`` and ``pareto.png`` for ``result`` into ``out_dir``."""
    from pathlib import Path

    from edgeslim import io

    out_dir = Path(out_dir)
    io.write_text(out_dir / "report.md", markdown_table(result))
    pareto_plot(result, out_dir / "pareto.png")


__all__ = ["markdown_table", "pareto_plot", "rich_table", "write_report"]
