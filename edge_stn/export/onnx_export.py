"""``edge-stn export``: a training checkpoint -> one verified, TensorRT-compatible ONNX file.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), on purpose.
torch 2.13 defaults to the dynamo exporter, which builds its graph at opset 18 and converts it
afterwards; asked for 17 it fails that conversion on our graph and leaves the file at opset 18,
which TensorRT 8.5/8.6 (JetPack 5) do not parse. The TorchScript exporter writes exactly the
requested opset (16-20), emits GridSample with ``mode="bilinear"`` below opset 20, and exports
our grid (a stored base grid times theta^T) as one MatMul, never AffineGrid. It is deprecated in
torch >= 2.9: its DeprecationWarnings are silenced for the one call that uses it, and should a
future torch drop it, the export fails with a message saying so. Whatever the exporter does, the
file is read back and checked against the contract (:mod:`edge_stn.export.contract`).

Atomicity (:mod:`edge_stn.export.files`): the model and its sidecar are written to hidden
temporary files beside the target, verified there, and renamed into place only when every check
passed; a failed export leaves nothing behind (and an older model of the same name untouched).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edge_stn import __version__
from edge_stn.checkpoint import load_checkpoint, model_from_checkpoint
from edge_stn.errors import CheckpointError, ExportError, MissingExtraError
from edge_stn.export.contract import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MAX_TRT_OPSET,
    MIN_OPSET,
    Expected,
    check_contract,
    default_opset,
)
from edge_stn.export.document import build_document, sidecar_document
from edge_stn.export.files import check_output_path, staged_model
from edge_stn.export.fp16 import convert_to_fp16, geometry_nodes
from edge_stn.export.recipes import BatchProfile, next_steps
from edge_stn.export.trt_report import TrtReport, tensorrt_report
from edge_stn.export.verify import Verification, check_onnx, verify_runtime
from edge_stn.runtime.metadata import METADATA_KEY, file_sha256, sidecar_path

logger = logging.getLogger(__name__)

EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    with_canonical: bool = False
    allow_opset_20: bool = False  # ONNX Runtime only; implies allow_non_trt
    allow_non_trt: bool = False
    simplify: bool = False
    verify: bool = True
    batch_profile: BatchProfile = field(default_factory=BatchProfile)


@dataclass
class ExportResult:
    model_path: Path
    sidecar_path: Path
    sha256: str
    size: int
    document: dict[str, Any]
    verification: Verification
    trt: TrtReport
    notes: list[str]
    next_steps: list[str]

    def lines(self) -> list[str]:
        d = self.document
        out = [
            f"exported {d.get('name') or 'model'} ({d['training']['arch']}, "
            f"{len(d['labels'])} labels, "
            f"opset {d['opset']}, {d['precision']}) -> {self.model_path} "
            f"({self.size / 1e6:.2f} MB, sha256 {self.sha256[:16]}...)",
            f"sidecar {self.sidecar_path}",
        ]
        out += [f"note: {n}" for n in self.notes]
        out += ["Verification"] + [f"  {line}" for line in self.verification.lines()]
        out += self.trt.lines()
        out += self.next_steps
        return out


def check_opset(opset: int, allow_opset_20: bool) -> None:
    if MIN_OPSET <= opset <= MAX_TRT_OPSET:
        return
    if opset == MAX_OPSET:
        if allow_opset_20:
            return
        raise ExportError(
            f"opset {opset} writes GridSample mode 'linear', which TensorRT reads as nearest: "
            f"use --opset {DEFAULT_OPSET}, or --allow-opset-20 for a file meant for ONNX Runtime "
            "only"
        )
    raise ExportError(
        f"unsupported opset {opset}: choose {MIN_OPSET}-{MAX_TRT_OPSET} (default {DEFAULT_OPSET}; "
        f"GridSample needs {MIN_OPSET}), or {MAX_OPSET} with --allow-opset-20"
    )


class _ExportGraph(nn.Module):
    """The model with the contract's outputs as a plain tuple: logits, theta[, canonical]."""

    def __init__(self, model: nn.Module, with_canonical: bool) -> None:
        super().__init__()
        self.model = model
        self.with_canonical = with_canonical

    def forward(self, images: torch.Tensor) -> Any:
        out = self.model(images)
        if out.theta is None:
            return out.logits
        if self.with_canonical:
            return out.logits, out.theta, out.canonical
        return out.logits, out.theta


def _torch_export(
    model: nn.Module, example: torch.Tensor, outputs: list[str], opset: int, with_canonical: bool
) -> onnx.ModelProto:
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in ["images", *outputs]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                _ExportGraph(model, with_canonical),
                (example,),
                buf,  # type: ignore[arg-type]  # the TorchScript exporter takes a file object
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=outputs,
                dynamic_axes=axes,
                do_constant_folding=True,
                external_data=False,
            )
        except (TypeError, RuntimeError, ValueError, torch.onnx.errors.OnnxExporterError) as exc:
            text = str(exc).strip()
            first = text.splitlines()[0][:200] if text else type(exc).__name__
            raise ExportError(
                f"the {EXPORTER} failed under torch {torch.__version__}: {first}"
            ) from None
    for w in caught:
        # The TorchScript exporter's deprecation notices: it is chosen on purpose (see above).
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            logger.debug("exporter: %s", w.message)
        else:
            logger.warning("exporter: %s", w.message)
    return onnx.load_from_string(buf.getvalue())


def _set_output_dims(model: onnx.ModelProto, dims: dict[str, tuple[int, ...]]) -> None:
    """The exporter names inferred dims after nodes ("Reshapetheta_dim_1"): make them static."""
    for o in model.graph.output:
        shape = o.type.tensor_type.shape
        del shape.dim[:]
        shape.dim.add().dim_param = "batch"
        for d in dims[o.name]:
            shape.dim.add().dim_value = int(d)


def _simplify(model: onnx.ModelProto, notes: list[str]) -> tuple[onnx.ModelProto, str | None]:
    try:
        import onnxslim
    except ImportError:
        notes.append("--simplify skipped: onnxslim is not installed (pip install onnxslim)")
        return model, None
    before = len(model.graph.node)
    slim = onnxslim.slim(model)
    if not isinstance(slim, onnx.ModelProto):
        raise ExportError("onnxslim returned no model")
    version = str(getattr(onnxslim, "__version__", "?"))
    notes.append(
        f"simplified with onnxslim {version}: {before} -> {len(slim.graph.node)} nodes "
        "(verified after)"
    )
    return slim, version


@dataclass
class _Source:
    """The checkpoint, its model and what the exported file must declare."""

    path: Path
    ckpt: dict[str, Any]
    model: nn.Module
    spec: dict[str, Any]
    dims: dict[str, tuple[int, ...]]  # output name -> dims after the batch axis
    images: np.ndarray | None  # the stored test images (uint8 NCHW), None with --no-verify
    labels: np.ndarray | None

    @property
    def chw(self) -> tuple[int, int, int]:
        h, w = self.spec["in_size"]
        return int(self.spec["in_channels"]), int(h), int(w)

    @property
    def is_stn(self) -> bool:
        return bool(self.spec["arch"] == "stcnn")


def _load_source(path: Path, opts: ExportOptions) -> _Source:
    try:
        ckpt = load_checkpoint(path)
    except OSError as exc:  # torch's zip reader on a truncated file
        raise CheckpointError(
            f"not a readable PyTorch checkpoint (truncated or corrupt?): {exc.strerror or exc}",
            path=path,
        ) from None
    model = model_from_checkpoint(ckpt, path)
    spec = ckpt["spec"]
    if spec["num_classes"] != len(ckpt["labels"]):
        raise CheckpointError(
            f"the model has {spec['num_classes']} classes but {len(ckpt['labels'])} labels",
            path=path,
        )
    dims: dict[str, tuple[int, ...]] = {"logits": (len(ckpt["labels"]),)}
    if spec["arch"] == "stcnn":
        dims["theta"] = (2, 3)
        if opts.with_canonical:
            dims["canonical"] = (int(spec["in_channels"]), *map(int, spec["stn_out"]))
    elif opts.with_canonical:
        raise ExportError("--with-canonical needs an ST-CNN checkpoint, not a plain CNN", path=path)
    src = _Source(path, ckpt, model, spec, dims, None, None)
    if opts.verify:
        src.images = _stored_images(ckpt, src.chw, path)
        labels = ckpt.get("verify_labels")
        if isinstance(labels, torch.Tensor):
            src.labels = labels.numpy().astype(np.int64)
    return src


def _stored_images(ckpt: dict[str, Any], chw: tuple[int, int, int], path: Path) -> np.ndarray:
    images = ckpt.get("verify_images")
    if images is None:
        raise CheckpointError(
            "the checkpoint stores no test images ('verify_images') to verify with: "
            "re-train with this edge-stn, or export with --no-verify",
            path=path,
        )
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != chw or not len(arr):
        raise CheckpointError(
            f"verify_images are {arr.dtype} {tuple(arr.shape)}, expected uint8 (N, {chw})",
            path=path,
        )
    return np.ascontiguousarray(arr)


def _producer(ckpt: dict[str, Any], verify: bool) -> dict[str, Any]:
    producer: dict[str, Any] = {
        "edge_stn": __version__,
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "exporter": EXPORTER,
        "checkpoint_producer": ckpt.get("producer"),
    }
    try:
        import onnxruntime

        producer["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        if verify:
            raise MissingExtraError("onnxruntime", "cpu", "verifying an export") from None
    return producer


def export_model(checkpoint: Path, out: Path, options: ExportOptions | None = None) -> ExportResult:
    """Export, verify and write ``out`` and its sidecar; raise an EdgeStnError on any failure."""
    opts = options or ExportOptions()
    check_opset(opts.opset, opts.allow_opset_20)
    out = check_output_path(Path(out))
    src = _load_source(Path(checkpoint), opts)
    producer = _producer(src.ckpt, opts.verify)

    example = torch.zeros(2, *src.chw)
    if src.images is not None:
        example = torch.from_numpy(src.images[:2]).float() / 255.0
    proto = _torch_export(src.model, example, list(src.dims), opts.opset, opts.with_canonical)
    _set_output_dims(proto, src.dims)
    notes: list[str] = []
    if opts.simplify:
        proto, slim_version = _simplify(proto, notes)
        if slim_version:
            producer["onnxslim"] = slim_version
    fp32_layers = geometry_nodes(proto)
    if opts.fp16:
        conv = convert_to_fp16(proto)
        proto, fp32_layers = conv.model, conv.fp32_nodes
        notes.append(
            f"FP16: {conv.fp16_nodes} nodes in FP16; {len(conv.fp32_nodes)} geometry nodes "
            f"(theta, grid, GridSample) kept FP32; {conv.casts} casts; float32 inputs and outputs"
        )
    doc = build_document(
        src.ckpt,
        src.path,
        opset=default_opset(proto),
        outputs={k: ["batch", *v] for k, v in src.dims.items()},
        precision="fp16" if opts.fp16 else "fp32",
        producer=producer,
        ckpt_sha256=file_sha256(src.path),
        tensorrt={
            "min_version": "8.5",
            "int8": False,
            "fp32_layers": fp32_layers,
            "batch_profile": opts.batch_profile.to_json(),
        },
    )
    proto.producer_name = "edge-stn"
    proto.producer_version = __version__
    proto.doc_string = f"edge-stn {src.spec['arch']} from {src.path.name}; see '{METADATA_KEY}'"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(doc, separators=(",", ":"))})
    data = proto.SerializeToString()

    with staged_model(out) as stage:
        stage.write_model(data)
        result = _check_written(stage.model, out, src, opts, doc, notes)
        verification = {**result.verification.to_json(), "tensorrt": result.trt.to_json()}
        stage.commit(
            sidecar_document(
                doc,
                model_name=out.name,
                sha256=result.sha256,
                size=result.size,
                verification=verification,
            )
        )
    result.next_steps = next_steps(
        out,
        src.chw,
        opts.batch_profile,
        fp16=opts.fp16,
        fp32_layers=fp32_layers if src.is_stn else [],
        opset=opts.opset,
    )
    return result


def _check_written(
    tmp: Path,
    out: Path,
    src: _Source,
    opts: ExportOptions,
    doc: dict[str, Any],
    notes: list[str],
) -> ExportResult:
    """Read the written file back and check it: contract, checker, TensorRT, runtime parity."""
    written = onnx.load(str(tmp))
    c, h, w = src.chw
    expected = Expected(
        channels=c,
        height=h,
        width=w,
        outputs=src.dims,
        align_corners=False,
        padding_mode=str(src.spec["padding_mode"]),
        opset_range=(MIN_OPSET, MAX_OPSET if opts.allow_opset_20 else MAX_TRT_OPSET),
        allow_linear_mode=opts.allow_opset_20,
    )
    problems = check_contract(written, expected)
    if default_opset(written) != opts.opset:
        problems.insert(0, f"asked for opset {opts.opset}, got {default_opset(written)}")
    if problems:
        raise ExportError(
            "the written file breaks the model contract: " + "; ".join(problems), path=out
        )
    report = Verification()
    report.checker = check_onnx(written, path=out)
    trt = tensorrt_report(written)
    blocking = trt.blocking()
    if blocking and not (opts.allow_non_trt or opts.allow_opset_20):
        raise ExportError(
            "TensorRT cannot build it (static check): "
            + "; ".join(f.line() for f in blocking)
            + "; pass --allow-non-trt to export for ONNX Runtime only",
            path=out,
        )
    if src.images is not None:
        verify_runtime(tmp, src.model, src.images, fp16=opts.fp16, report=report, labels=src.labels)
        if not report.passed:
            raise ExportError("verification failed: " + "; ".join(report.failures), path=out)
    else:
        report.notes.append("ONNX Runtime verification skipped (--no-verify)")
    return ExportResult(
        out, sidecar_path(out), file_sha256(tmp), tmp.stat().st_size, doc, report, trt, notes, []
    )
