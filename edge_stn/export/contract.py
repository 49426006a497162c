"""The model file contract (DESIGN §5), checked on the exported file as read back from disk.

What the exporter asked for is not proof of what it wrote: exporters have written another
opset than requested, weights to a second file, and GridSample with opset 20's ``linear`` mode.
So the file is loaded again and every clause checked; any failure fails the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

# Opsets: GridSample exists from 16; TensorRT 8.5/8.6 parse up to 17, TensorRT 10 up to 20; at
# 20 GridSample's "bilinear" is spelled "linear", which TensorRT's parser takes as nearest.
MIN_OPSET = 16
DEFAULT_OPSET = 17
MAX_TRT_OPSET = 19
MAX_OPSET = 20  # the TorchScript exporter's highest


@dataclass(frozen=True)
class Expected:
    """What the file must declare: its input, outputs and the sampler's settings."""

    channels: int
    height: int
    width: int
    outputs: dict[str, tuple[int, ...]]  # name -> static dims after the batch axis
    align_corners: bool = False
    padding_mode: str = "zeros"
    opset_range: tuple[int, int] = (MIN_OPSET, MAX_TRT_OPSET)
    allow_linear_mode: bool = False  # opset 20, for ONNX Runtime only


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param
        if d.HasField("dim_param")
        else (d.dim_value if d.HasField("dim_value") else "?")
        for d in vi.type.tensor_type.shape.dim
    ]


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def check_contract(model: onnx.ModelProto, exp: Expected) -> list[str]:
    """Every way ``model`` breaks the contract, as one line each (empty when it holds)."""
    problems: list[str] = []
    lo, hi = exp.opset_range
    opset = default_opset(model)
    if not lo <= opset <= hi:
        problems.append(f"the file's opset is {opset}, outside the accepted {lo}-{hi}")
    others = [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    if others:
        problems.append(f"the file imports non-standard op domains {others}")

    g = model.graph
    external = [t.name for t in g.initializer if _is_external(t)]
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and _is_external(a.t):
                external.append(n.name or n.op_type)
    if external:
        problems.append(
            f"{len(external)} tensors are stored outside the file (first: {external[0]}): "
            "the model must be one self-contained file"
        )

    inputs = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
    if [i.name for i in inputs] != ["images"]:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected ['images']")
    else:
        vi = inputs[0]
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append("input 'images' is not float32")
        dims = _dims(vi)
        want = [exp.channels, exp.height, exp.width]
        if len(dims) != 4 or not isinstance(dims[0], str) or dims[1:] != want:
            problems.append(
                f"input 'images' has dims {dims}, expected [batch, {exp.channels}, "
                f"{exp.height}, {exp.width}] with a dynamic batch axis"
            )
    names = [o.name for o in g.output]
    if names != list(exp.outputs):
        problems.append(f"outputs are {names}, expected {list(exp.outputs)}")
    else:
        for o in g.output:
            if o.type.tensor_type.elem_type != TensorProto.FLOAT:
                problems.append(f"output '{o.name}' is not float32")
            dims = _dims(o)
            want_rest = list(exp.outputs[o.name])
            if not dims or not isinstance(dims[0], str) or dims[1:] != want_rest:
                problems.append(
                    f"output '{o.name}' has dims {dims}, "
                    f"expected [batch, {', '.join(map(str, want_rest))}]"
                )

    typed = onnx.shape_inference.infer_shapes(model)
    rank = {
        vi.name: len(vi.type.tensor_type.shape.dim)
        for vi in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]
        if vi.type.tensor_type.HasField("shape")
    }
    modes_ok = ("bilinear", "linear") if exp.allow_linear_mode else ("bilinear",)
    for n in g.node:
        if n.op_type == "AffineGrid":
            problems.append(
                f"node '{n.name}' is an AffineGrid: TensorRT cannot build it "
                "(the grid must be the stored base grid times theta^T)"
            )
        if n.op_type != "GridSample":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        mode = attrs.get("mode", b"linear" if opset >= 20 else b"bilinear")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in modes_ok:
            problems.append(
                f"GridSample '{n.name}' has mode {mode!r}, expected 'bilinear'"
                + (
                    " (opset 20 spells it 'linear', which TensorRT reads as nearest)"
                    if mode == "linear"
                    else ""
                )
            )
        ac = bool(attrs.get("align_corners", 0))
        if ac != exp.align_corners:
            problems.append(
                f"GridSample '{n.name}' has align_corners={int(ac)}, "
                f"training used {int(exp.align_corners)}"
            )
        pm = attrs.get("padding_mode", b"zeros")
        pm = pm.decode() if isinstance(pm, bytes) else pm
        if pm != exp.padding_mode:
            problems.append(
                f"GridSample '{n.name}' has padding_mode {pm!r}, training used {exp.padding_mode!r}"
            )
        for i, what in ((n.input[0], "input"), (n.input[1], "grid")):
            if rank.get(i) != 4:
                problems.append(f"GridSample '{n.name}' {what} has rank {rank.get(i)}, expected 4")
    return problems
