"""Writing a model and its sidecar atomically, for the exporter and the INT8 quantizer.

The model goes to a hidden temporary file beside the target, where it is read back and verified;
the model and its sidecar are renamed into place only when every check passed. A failed run
leaves nothing behind (and an older model of the same name untouched), and a new model never
sits beside a stale sidecar, even for a moment.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_stn.errors import ExportError
from edge_stn.runtime.metadata import sidecar_path


def check_output_path(out: Path) -> Path:
    """The target must be a ``.onnx`` file in an existing, writable folder."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(
            "the output must be a .onnx file (its sidecar takes the same name with .json)", path=out
        )
    if out.is_dir():
        raise ExportError("the output is a folder; name a .onnx file", path=out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ExportError(f"the output folder {what}", path=parent)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ExportError(
            f"cannot write in the output folder: {exc.strerror or exc}", path=parent
        ) from None
    for existing in (out, sidecar_path(out)):
        if existing.exists() and not os.access(existing, os.W_OK):
            raise ExportError("an existing file cannot be replaced (not writable)", path=existing)
    return out


def write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class StagedModel:
    """A model being written: ``model`` is its temporary file, to verify before :meth:`commit`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.sidecar = sidecar_path(out)
        self.model = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        self.tmp_sidecar = self.sidecar.with_name(f".{self.sidecar.name}.{os.getpid()}.tmp")

    def write_model(self, data: bytes) -> None:
        try:
            write_file(self.model, data)
        except OSError as exc:
            raise ExportError(
                f"cannot write the model: {exc.strerror or exc}", path=self.out
            ) from None

    def commit(self, sidecar_doc: dict[str, Any]) -> None:
        """Write the sidecar, then move both into place."""
        try:
            write_file(self.tmp_sidecar, (json.dumps(sidecar_doc, indent=1) + "\n").encode())
            if self.sidecar.exists():  # never a new model beside a stale sidecar
                self.sidecar.unlink()
            os.replace(self.model, self.out)
            os.replace(self.tmp_sidecar, self.sidecar)
        except OSError as exc:
            raise ExportError(
                f"cannot write the model: {exc.strerror or exc}", path=self.out
            ) from None

    def discard(self) -> None:
        for tmp in (self.model, self.tmp_sidecar):
            if tmp.exists():
                tmp.unlink()


@contextmanager
def staged_model(out: Path) -> Iterator[StagedModel]:
    """A :class:`StagedModel` for ``out``; whatever was not committed is removed on exit."""
    stage = StagedModel(out)
    try:
        yield stage
    finally:
        stage.discard()
