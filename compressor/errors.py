"""The error root of the tool.

Every failure a user can cause or fix (a bad recipe, a model file we refuse to load, a rank that does
not fit a layer, an export that disagrees with PyTorch) raises a ``CompressorError``. The CLI turns it
into one line on stderr and its ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def describe_error(err: BaseException) -> str:
    """``Type: message`` on one line, for errors that wrap another library's (often multi-line) text."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class CompressorError(Exception):
    """Root of every expected failure; the CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 2


class RecipeError(CompressorError):
    """The recipe is malformed, or does not fit the model it is applied to."""


class ModelLoadError(CompressorError):
    """The model file cannot be loaded safely or is not something we can rewrite."""


class RankError(CompressorError):
    """A requested rank does not fit the layer (above full rank, not divisible by groups, ...)."""


class DataError(CompressorError):
    """Calibration or evaluation data (``--data``/``--eval-data``) is missing, unreadable or does not fit the model."""


class ExportError(CompressorError):
    """ONNX export or ONNX Runtime execution failed."""


class ParityError(CompressorError):
    """ONNX Runtime disagrees with PyTorch beyond the recipe tolerance.

    Exit code 1 rather than 2: the run itself worked, its verification failed.
    """

    exit_code = 1
