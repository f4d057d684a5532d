"""One-line, actionable errors. The CLI prints ``str(err)`` on stderr and exits with code 2.

Every message names what is wrong (file, field, layer, shape) so a user can fix it without
reading a traceback. Never ``assert`` on user input: asserts vanish under ``python -O``.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour / cursor codes in library messages


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception message (ORT and torch errors are long)."""
    text = _ANSI.sub("", str(exc))
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


class OutputError(EdgeslimError):
    """The output location cannot be used: it holds files edgeslim did not write, is a file, is
    not writable, or another run is writing it. The message names the user's path."""


class NumericalError(EdgeslimError):
    """A NaN or Inf appeared in weights, a loss, calibration statistics or outputs; the message
    names the layer or step where it was found."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the command line: raised from the signal handler so that every
    ``finally`` and context manager cleans up (a BaseException: ``except Exception`` lets it by)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def exception_chain(exc: BaseException | None, limit: int = 20) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first (at most ``limit``:
    libraries wrap the cause we need to read several layers deep)."""
    chain = []
    while exc is not None and len(chain) < limit:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def reraise_interrupt(exc: BaseException) -> None:
    """Re-raise an interrupt that a library wrapped into its own exception (the ONNX exporter
    turns anything raised while it traces into an export error)."""
    for inner in exception_chain(exc):
        if isinstance(inner, (Interrupted, KeyboardInterrupt)):
            raise inner
