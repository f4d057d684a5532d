"""One-line, actionable errors. The CLI prints ``str(err)`` on stderr and exits with code 2.

Every message names what is wrong (file, field, layer, shape) so a user can fix it without
reading a traceback. Never ``assert`` on user input: asserts vanish under ``python -O``.
"""

from __future__ import annotations


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception message (ORT and torch errors are long)."""
    text = str(exc)
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return type(exc).__name__ if isinstance(exc, BaseException) else text


class EdgeslimError(Exception):
    """Base class for errors caused by user input (bad recipe, data, model or checkpoint)."""


class ConfigError(EdgeslimError):
    """A recipe or technique config is invalid; the message names the field."""


class DataError(EdgeslimError):
    """A data file or data set is missing, malformed or empty; the message names the file."""


class CheckpointError(EdgeslimError):
    """A checkpoint is missing, unsafe (pickle) or does not fit the model."""


class ModelError(EdgeslimError):
    """A model cannot be built, run or traced; the message names the module or shape."""


class ExportError(EdgeslimError):
    """ONNX export failed or ONNX Runtime outputs diverge from PyTorch's."""


class RuntimeToolError(EdgeslimError):
    """An ONNX file cannot be loaded or run by ONNX Runtime."""
