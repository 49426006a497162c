"""FP16 conversion that keeps the geometry in FP32.

The features (localization convolutions, classifier) run in FP16; the STN's regression layer,
everything from it to ``theta`` and to GridSample's grid, and GridSample itself stay FP32: a grid
rounded to FP16 moves sample points by up to ~1/1000 of the image, visible in the canonical crop
and in the affine published per detection. Inputs and outputs stay float32, so callers and the
metadata contract do not change.

Written here rather than taken from onnxconverter-common: for this small graph a precise rule
(which nodes stay FP32, one Cast per tensor and direction) is shorter than configuring and
checking a general converter, and it adds no dependency.

Note: ONNX Runtime's CPU provider has few FP16 kernels; it inserts casts and runs FP16 nodes in
FP32. CPU parity of an FP16 model therefore only shows the cost of rounded weights and of the
FP16 values at the casts, not of FP16 arithmetic, which only a GPU (TensorRT, CUDA) exercises.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

# Ops that are safe in FP16 on ONNX Runtime and TensorRT (data input and output FP16).
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "MatMul", "Flatten", "Reshape",
    "Transpose", "Squeeze", "Unsqueeze", "Identity", "Add", "Sub", "Mul", "Div", "Concat",
    "BatchNormalization", "Softmax",
})
# Ops that only move data: walking back from theta through them reaches the regression layer.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"})
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


@dataclass(frozen=True)
class Fp16Result:
    model: onnx.ModelProto
    fp32_nodes: list[str]  # nodes kept in FP32: give them to TensorRT as FP32 layers
    fp16_nodes: int
    casts: int


def geometry_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute theta and the sampling grid, and the samplers.

    Walking back from the ``theta`` output through layout ops finds the regression layer; the
    set is that layer, the nodes between it and ``theta`` or a GridSample grid, and every
    GridSample. A model without a transformer has none.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    keep: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def add(n: onnx.NodeProto) -> None:
        if id(n) not in seen:
            seen.add(id(n))
            keep.append(n)

    regression: onnx.NodeProto | None = None
    outputs = {o.name for o in g.output}
    if "theta" in outputs:
        n = producer.get("theta")
        while n is not None and n.op_type in _LAYOUT_OPS:
            add(n)
            n = producer.get(n.input[0])
        if n is not None:
            regression = n
            add(n)
    for s in (n for n in g.node if n.op_type == "GridSample"):
        add(s)
        stack = [s.input[1]]
        while stack:
            p = producer.get(stack.pop())
            if p is None or id(p) in seen:
                continue
            add(p)
            if p is not regression:
                stack.extend(i for i in p.input if i)
    order = {id(n): i for i, n in enumerate(g.node)}
    return [n.name for n in sorted(keep, key=lambda n: order[id(n)])]


def convert_to_fp16(model: onnx.ModelProto) -> Fp16Result:
    """An FP16 copy of ``model`` with float32 graph inputs and outputs; see the module docstring."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    elem: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        elem[t.name] = t.data_type
    keep = set(geometry_nodes(model))

    def wants_fp16(n: onnx.NodeProto) -> bool:
        return n.op_type in FP16_OPS and n.name not in keep

    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    prec: dict[int, bool] = {}  # id(node) -> runs FP16
    for n in g.node:
        if n.op_type == "Constant":
            outs = consumers.get(n.output[0], [])
            prec[id(n)] = bool(outs) and all(wants_fp16(c) for c in outs)
        else:
            prec[id(n)] = wants_fp16(n)

    # Graph outputs made by FP16 nodes get an FP16 name inside and a Cast to the public name.
    out_names = {o.name for o in g.output}
    renamed: dict[str, str] = {}
    for n in g.node:
        if prec[id(n)]:
            for k, o in enumerate(n.output):
                if o in out_names and elem.get(o) == TensorProto.FLOAT:
                    renamed[o] = f"{o}/fp16"
                    n.output[k] = renamed[o]
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in renamed:
                n.input[k] = renamed[i]
    for public, inner in renamed.items():
        elem[inner] = elem[public]

    fp16_tensors: set[str] = set()  # float tensors that are FP16 after conversion
    init_users = {name: consumers.get(name, []) for name in inits}
    converted_inits: set[str] = set()
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            casts[key] = f"{name}/cast_{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to,
                                              name=f"{name}/Cast_{suffix}"))
        return casts[key]

    n_fp16 = 0
    for n in g.node:
        half = prec[id(n)]
        if n.op_type == "Constant":
            if half:
                attr = next(a for a in n.attribute if a.name == "value")
                if attr.t.data_type == TensorProto.FLOAT:
                    arr = numpy_helper.to_array(attr.t).astype(np.float16)
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
                    fp16_tensors.add(n.output[0])
            new_nodes.append(n)
            continue
        for k, i in enumerate(n.input):
            if not i or elem.get(i) not in _FLOATS:
                continue
            is_half = i in fp16_tensors
            if half and not is_half:
                if i in inits and elem[i] == TensorProto.FLOAT:
                    if all(prec[id(c)] for c in init_users[i]):
                        if i not in converted_inits:
                            t = inits[i]
                            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), i))
                            converted_inits.add(i)
                        fp16_tensors.add(i)
                    else:
                        copy = f"{i}/fp16"
                        if copy not in converted_inits:
                            arr = numpy_helper.to_array(inits[i]).astype(np.float16)
                            new_inits.append(numpy_helper.from_array(arr, copy))
                            converted_inits.add(copy)
                        n.input[k] = copy
                else:
                    n.input[k] = cast(i, TensorProto.FLOAT16)
            elif not half and is_half and n.op_type != "Cast":
                n.input[k] = cast(i, TensorProto.FLOAT)
        if half:
            n_fp16 += 1
            fp16_tensors.update(o for o in n.output if elem.get(o) == TensorProto.FLOAT)
        new_nodes.append(n)
    for public, inner in renamed.items():
        new_nodes.append(helper.make_node("Cast", [inner], [public], to=TensorProto.FLOAT,
                                          name=f"{public}/Cast_fp32"))

    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.value_info[:]
    fp32 = sorted(keep)
    logger.debug("fp16: %d nodes FP16, %d kept FP32, %d casts", n_fp16, len(fp32), len(casts) + len(renamed))
    return Fp16Result(model, geometry_nodes(model), n_fp16, len(casts) + len(renamed))
