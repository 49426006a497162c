"""The previous model, kept to fall back on (issue 7).

With ``model.fallback_dir`` set, every model that loaded *and* warmed up is copied there (with
its sidecar ``.json`` and signature ``.sig``), as ``<dir>/<sha256>/<file name>``, and
``<dir>/last-good.json`` names it. At most :data:`KEEP` models are kept (the newest).

:func:`open_engine` loads the configured model; when that model cannot be *loaded or warmed up*
(a corrupt file, a graph ONNX Runtime refuses, a run that fails) it logs the reason and runs
the last good model instead, after checking it again under the current ``model.trust``. Bad
input is never papered over: a missing file, a sha256 that differs from ``model.sha256`` or
the sidecar, and an unsigned or mis-signed model (:class:`ModelIntegrityError`) stop the
start-up. With ``model.sha256`` pinned there is no fallback either (the pin names one file).

Writing the copy is best effort: a full disk or a read-only folder is logged as a warning and
the daemon runs on without a fallback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_stn.errors import ModelError, ModelIntegrityError
from edge_stn.runtime.metadata import sidecar_path
from edge_stn.runtime.signing import signature_path

if TYPE_CHECKING:
    from edge_stn.config import ModelConfig
    from edge_stn.runtime.engine import Engine

logger = logging.getLogger(__name__)

KEEP = 2
"""Models kept in the fallback folder: the running one and the one before."""
INDEX = "last-good.json"


@dataclass(frozen=True)
class KeptModel:
    path: Path
    sha256: str
    saved_at: float


class FallbackStore:
    """The fallback folder: :meth:`keep` a model that worked, :meth:`last_good` to run it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def last_good(self) -> KeptModel | None:
        index = self.folder / INDEX
        try:
            doc = json.loads(index.read_text("utf-8"))
            kept = KeptModel(self.folder / doc["file"], str(doc["sha256"]), float(doc["saved_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("fallback index %s is unreadable (%s): ignored", index, exc)
            return None
        return kept if kept.path.is_file() else None

    def keep(self, engine: Engine) -> KeptModel | None:
        """Copy the engine's model (and its sidecar and signature) in, unless it is there
        already; None (logged) when the copy cannot be written."""
        current = self.last_good()
        if current is not None and current.sha256 == engine.sha256:
            return current
        target_dir = self.folder / engine.sha256
        target = target_dir / engine.path.name
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            for src in (engine.path, sidecar_path(engine.path), signature_path(engine.path)):
                if src.is_file():
                    _copy_atomic(src, target_dir / src.name)
            kept = KeptModel(target, engine.sha256, time.time())
            doc = {
                "file": str(target.relative_to(self.folder)),
                "sha256": kept.sha256,
                "saved_at": kept.saved_at,
            }
            _write_atomic(self.folder / INDEX, json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            shutil.rmtree(target_dir, ignore_errors=True)
            logger.warning(
                "cannot keep a copy of model %s in %s for fallback (%s): running without one",
                engine.path,
                self.folder,
                exc.strerror or exc,
            )
            return None
        self._prune(keep={engine.sha256} | ({current.sha256} if current is not None else set()))
        logger.info("model %s kept for fallback in %s", engine.path.name, target_dir)
        return kept

    def _prune(self, keep: set[str]) -> None:
        folders = [p for p in self.folder.iterdir() if p.is_dir() and len(p.name) == 64]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        survivors = [p for p in folders if p.name in keep][:KEEP]
        for p in folders:
            if p not in survivors:
                shutil.rmtree(p, ignore_errors=True)


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_engine(model: ModelConfig) -> Engine:
    """The configured model on ONNX Runtime, or the last good one if it fails to load or warm
    up (see the module docstring). Raises what :class:`Engine` raises when there is no
    fallback."""
    from edge_stn.runtime.engine import Engine

    store = FallbackStore(model.fallback_dir) if model.fallback_dir is not None else None
    try:
        engine = Engine(model)
    except ModelIntegrityError:
        raise
    except ModelError as exc:
        kept = store.last_good() if store is not None else None
        if kept is None or model.sha256 is not None:
            raise
        logger.error(
            "model %s failed to load: %s; running the previous model %s (sha256 %s...) instead",
            model.model_path,
            exc.detail,
            kept.path.name,
            kept.sha256[:12],
        )
        try:
            return Engine(model.model_copy(update={"path": kept.path}))
        except ModelError as again:
            logger.error("the previous model %s failed too: %s", kept.path, again.detail)
            raise exc from None
    if store is not None:
        store.keep(engine)
    return engine
