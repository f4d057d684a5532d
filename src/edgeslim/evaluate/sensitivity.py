"""Per-layer sensitivity scans: change one layer at a time, measure, one row per change.

Two techniques ask "which layer can take it?": mixed precision quantizes one layer alone and
measures the metric and output SQNR (quantize/mixed.py, also weight-only int4 with a budget);
pruning sensitivity prunes one layer alone at each ratio and measures the metric (Han et al.
2015, fig. 6; prune/sensitivity.py). Both are :func:`scan` over the changes, then a markdown table
(:func:`sensitivity_markdown`) for the stage folder or the benchmark.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, TypeVar

from edgeslim.report.markdown import table_lines

__all__ = ["Row", "scan", "sensitivity_markdown"]

Row = dict[str, Any]
Change = TypeVar("Change")
Model = TypeVar("Model")


def scan(
    layers: Iterable[Change],
    apply_one: Callable[[Change], Model],
    measure: Callable[[Change, Model], Row],
    *,
    on_row: Callable[[int, Row], None] | None = None,
) -> list[Row]:
    """``measure(change, apply_one(change))`` for each change in ``layers``, in order: the rows.

    A change is what one row is about: a layer name, or a ``(layer, ratio)`` pair. ``apply_one``
    returns a model with only that change applied, as a new model (a graph lowered anew, a
    pruned copy): the scanned model is never modified, so there is nothing to restore between
    rows. ``measure`` returns the row (its keys are the caller's; their order is kept, e.g. in
    ``sensitivity.json``). ``on_row(i, row)`` is called after each row (progress, logging).
    """
    rows: list[Row] = []
    for i, change in enumerate(layers):
        rows.append(measure(change, apply_one(change)))
        if on_row is not None:
            on_row(i, rows[-1])
    return rows


def sensitivity_markdown(title: Sequence[str], headers: Sequence[str], cells: Iterable[Sequence[str]]) -> str:
    """A markdown document: the ``title`` lines, a blank line, then the table; ends with a newline."""
    return "\n".join([*title, "", *table_lines(headers, cells)]) + "\n"
