"""The one reader of users' CSV files (labels files, scored sentence pairs): columns found by
header name, errors that name the file and line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Sequence

from edgeslim.errors import DataError

__all__ = ["csv_rows"]


def csv_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, list[str | None]]]:
    """Yield ``(line, cells)`` per data row of ``path``: the physical line that ended the row
    (quoted cells may span lines) and the cells of ``columns``, in that order (None where a row is
    short). Columns may come in any order, extra ones are ignored. DataError naming the file for a
    missing column, text that is not UTF-8 or malformed CSV, and for a file without data rows."""
    rows = 0
    try:
        # utf-8-sig: spreadsheets often prepend a BOM, which would otherwise corrupt the first column name.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (needs {','.join(columns)}); "
                                f"header is {','.join(header) or 'empty'}")
            reader.fieldnames = header
            for row in reader:
                rows += 1
                yield reader.line_num, [row.get(c) for c in columns]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
