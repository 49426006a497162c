"""Verification of an exported file: the ONNX checker, ONNX Runtime (CPU) against PyTorch on the
checkpoint's stored test images, and per-image consistency across batch sizes.

Limits (the issue's): FP32 logits within 1e-4 and theta within 1e-5 of PyTorch, argmax
agreement 100%; FP16 argmax agreement >= 99.5%. ONNX Runtime's CPU provider runs FP16 nodes in
FP32 (it inserts casts), so FP16 figures measured here show the cost of FP16-rounded weights and
activations at the casts, not of FP16 arithmetic on a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edge_stn.errors import ExportError

logger = logging.getLogger(__name__)

FP32_LIMITS = {"logits": 1e-4, "theta": 1e-5}
FP32_MIN_AGREEMENT = 1.0
FP16_MIN_AGREEMENT = 0.995
BATCH_SIZES = (1, 7, 32)
# Across batch sizes ONNX Runtime may pick other kernels or blockings: same per-image outputs
# within these limits (FP32 as for parity; FP16 models round at their casts).
BATCH_LIMITS = {"fp32": {"logits": 1e-4, "theta": 1e-5}, "fp16": {"logits": 1e-2, "theta": 1e-3}}

Arrays = dict[str, npt.NDArray[np.float32]]


@dataclass
class Parity:
    images: int
    max_abs_diff: dict[str, float]
    argmax_agreement: float
    limits: dict[str, float]
    min_agreement: float
    error_onnx: float | None = None  # error of the exported model on these images, when labelled


@dataclass
class BatchConsistency:
    batch_sizes: list[int]
    max_abs_diff: dict[str, float]
    argmax_identical: bool
    limits: dict[str, float]


@dataclass
class CheckReport:
    """What a verification of a written model found: ``onnx.checker``'s verdict, notes, and the
    failures that make it refuse the file (none: passed). Subclasses add their measurements."""

    checker: str = "not run"
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def details(self) -> dict[str, Any]:
        """The measurements, as they go into the sidecar's report."""
        return {}

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checker": self.checker,
            **self.details(),
            "notes": self.notes,
            "failures": self.failures,
        }


@dataclass
class Verification(CheckReport):
    parity: Parity | None = None
    batches: BatchConsistency | None = None

    def details(self) -> dict[str, Any]:
        return {
            "parity": asdict(self.parity) if self.parity else None,
            "batch_consistency": asdict(self.batches) if self.batches else None,
        }

    def lines(self) -> list[str]:
        out = [f"onnx.checker: {self.checker}"]
        if self.parity:
            p = self.parity
            diffs = ", ".join(
                f"{k} {v:.2e} (limit {p.limits[k]:.0e})" if k in p.limits else f"{k} {v:.2e}"
                for k, v in p.max_abs_diff.items()
            )
            out.append(
                f"ONNX Runtime CPU vs PyTorch on {p.images} test images: max abs diff {diffs}; "
                f"argmax agreement {100 * p.argmax_agreement:.2f}% "
                f"(need >= {100 * p.min_agreement:.1f}%)"
            )
            if p.error_onnx is not None:
                out.append(f"error of the exported model on them: {100 * p.error_onnx:.2f}%")
        if self.batches:
            b = self.batches
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in b.max_abs_diff.items())
            out.append(
                f"batch sizes {', '.join(map(str, b.batch_sizes))}: "
                f"per-image max abs diff {diffs}; "
                f"argmax {'identical' if b.argmax_identical else 'DIFFERS'}"
            )
        out += [f"note: {n}" for n in self.notes]
        out += [f"FAILED: {f}" for f in self.failures]
        return out


def check_onnx(model: onnx.ModelProto, *, path: Path, what: str = "the file") -> str:
    """``onnx.checker`` full check and strict, type-checking shape inference: its verdict, or
    :class:`ExportError` naming ``what`` at ``path`` and the checker's first line."""
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ExportError(f"onnx.checker rejects {what}: {first}", path=path) from None
    return f"full check and strict shape inference passed (onnx {onnx.__version__})"


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the figures do not depend on the machine's core count
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(sess: Any, x: npt.NDArray[np.float32], batch: int) -> Arrays:
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[npt.NDArray[np.float32]]] = {n: [] for n in names}
    for i in range(0, x.shape[0], batch):
        for n, v in zip(names, sess.run(names, {"images": x[i : i + batch]}), strict=True):
            parts[n].append(np.asarray(v))
    return {n: np.concatenate(v) for n, v in parts.items()}


def run_torch(model: Any, x: npt.NDArray[np.float32]) -> Arrays:
    import torch

    model.eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(x))
    ref = {"logits": out.logits.float().numpy()}
    if out.theta is not None:
        ref["theta"] = out.theta.float().numpy()
        ref["canonical"] = out.canonical.float().numpy()
    return ref


def max_abs_diff(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def verify_runtime(
    path: Path,
    model: Any,
    images: npt.NDArray[np.uint8],
    *,
    fp16: bool,
    report: Verification,
    labels: npt.NDArray[np.int64] | None = None,
) -> None:
    """ONNX Runtime vs PyTorch and across batch sizes; results and failures go into ``report``."""
    x = np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)
    sess = ort_session(path)
    ref = run_torch(model, x)
    by_batch = {b: run_ort(sess, x, b) for b in BATCH_SIZES}
    got = by_batch[max(BATCH_SIZES)]
    diffs = {k: max_abs_diff(got[k], ref[k]) for k in got if k in ref}
    agree = float(np.mean(got["logits"].argmax(1) == ref["logits"].argmax(1)))
    limits = {} if fp16 else {k: v for k, v in FP32_LIMITS.items() if k in diffs}
    need = FP16_MIN_AGREEMENT if fp16 else FP32_MIN_AGREEMENT
    error = None
    if labels is not None and labels.shape == (x.shape[0],):
        error = float(np.mean(got["logits"].argmax(1) != labels))
    report.parity = Parity(int(x.shape[0]), diffs, agree, limits, need, error)
    for k, lim in limits.items():
        if not diffs[k] <= lim:
            report.failures.append(f"{k} differ from PyTorch by {diffs[k]:.2e} > {lim:.0e}")
    if agree < need:
        report.failures.append(
            f"argmax agreement with PyTorch {100 * agree:.2f}% < {100 * need:.1f}%"
        )

    first = by_batch[BATCH_SIZES[0]]
    blim = BATCH_LIMITS["fp16" if fp16 else "fp32"]
    bdiff = {k: max(max_abs_diff(by_batch[b][k], first[k]) for b in BATCH_SIZES[1:]) for k in first}
    same_argmax = all(
        np.array_equal(by_batch[b]["logits"].argmax(1), first["logits"].argmax(1))
        for b in BATCH_SIZES[1:]
    )
    report.batches = BatchConsistency(
        list(BATCH_SIZES), bdiff, same_argmax, {k: v for k, v in blim.items() if k in bdiff}
    )
    for k, lim in blim.items():
        if k in bdiff and not bdiff[k] <= lim:
            report.failures.append(f"{k} differ across batch sizes by {bdiff[k]:.2e} > {lim:.0e}")
    if not same_argmax:
        report.failures.append("argmax differs across batch sizes 1, 7, 32")
    if fp16:
        report.notes.append(
            "ONNX Runtime's CPU provider runs FP16 nodes in FP32: these figures show the "
            "cost of FP16-rounded weights and activations, not of FP16 arithmetic"
        )
