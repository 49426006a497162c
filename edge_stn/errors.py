"""One exception hierarchy for edge-stn.

Every error a user can cause (a bad config, a missing file, a foreign checkpoint) is an
`EdgeStnError`: the CLI prints its message on one line and exits with code 2. Anything else
is a bug and exits with code 1.
"""

from __future__ import annotations

from pathlib import Path


class EdgeStnError(Exception):
    """Base class of the errors a user can cause and fix."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        self.path = str(path) if path is not None else None
        self.key = key
        self.detail = message
        prefix = ""
        if self.path:
            prefix += f"{self.path}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message)


class ConfigError(EdgeStnError):
    """A configuration file or value is missing or invalid."""


class DataError(EdgeStnError):
    """A data set (image folder, MNIST source) is missing, empty or inconsistent."""


class CheckpointError(EdgeStnError):
    """A checkpoint is missing, truncated, or of another architecture or format."""


class ModelError(EdgeStnError):
    """An ONNX model is missing, unreadable or breaks the model file contract."""


class ModelIntegrityError(ModelError):
    """A model file is refused before it is parsed: missing, another sha256 than pinned or
    recorded in its sidecar, unsigned, mis-signed or not allow-listed. The daemon never falls
    back to a previous model for these (they are bad input, not a failed load)."""


class ExportError(EdgeStnError):
    """An export failed one of its checks; no model file was left behind."""


class SourceError(EdgeStnError):
    """A frame source cannot be opened or read."""


class FrameReadError(SourceError):
    """One read of a frame source failed (a corrupt frame, a hiccup of the stream); the source
    may still deliver later frames, so the reader counts it and goes on."""


class MissingExtraError(EdgeStnError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str, *, hint: str | None = None):
        super().__init__(
            f"{purpose} needs the Python module '{module}': pip install 'edge-stn[{extra}]'"
            + (f" ({hint})" if hint else "")
        )
        self.module = module
        self.extra = extra


class ShapeError(EdgeStnError):
    """An array or tensor does not have the expected shape."""

    def __init__(self, name: str, actual: tuple[int, ...], expected: str):
        super().__init__(f"{name} has shape {tuple(actual)}, expected {expected}")
        self.actual_shape = tuple(actual)
        self.expected_shape = expected


class DTypeError(EdgeStnError):
    """An array does not have the expected element type."""

    def __init__(self, name: str, actual: object, expected: str):
        super().__init__(f"{name} has dtype {actual}, expected {expected}")
        self.actual_dtype = str(actual)
        self.expected_dtype = expected


class PayloadError(EdgeStnError):
    """An MQTT payload cannot be built or encoded (a non-finite number, a value of the wrong
    type): a bug of its producer, reported with the field at fault."""
