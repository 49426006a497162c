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
FP16_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Clip",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Gemm",
        "MatMul",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Concat",
        "BatchNormalization",
        "Softmax",
    }
)
# Ops that only move data: walking back from theta through them reaches the regression layer.
_LAYOUT_OPS = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}
)
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


@dataclass(frozen=True)
class Fp16Result:
    model: onnx.ModelProto
    fp32_nodes: list[str]  # nodes kept in FP32: give them to TensorRT as FP32 layers
    fp16_nodes: int
    casts: int


def _geometry_indices(g: onnx.GraphProto) -> list[int]:
    """Indices of the nodes that compute theta and the sampling grid, and of the samplers."""
    nodes = list(g.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    regression: int | None = None
    if "theta" in {o.name for o in g.output}:
        k = producer.get("theta")
        while k is not None and nodes[k].op_type in _LAYOUT_OPS:
            keep.add(k)
            k = producer.get(nodes[k].input[0])
        if k is not None:
            regression = k
            keep.add(k)
    for s_idx, s in enumerate(nodes):
        if s.op_type != "GridSample":
            continue
        keep.add(s_idx)
        stack = [s.input[1]]
        while stack:
            k = producer.get(stack.pop())
            if k is None or k in keep:
                continue
            keep.add(k)
            if k != regression:
                stack.extend(i for i in nodes[k].input if i)
    return sorted(keep)


def geometry_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute theta and the sampling grid, and the samplers.

    Walking back from the ``theta`` output through layout ops finds the regression layer; the
    set is that layer, the nodes between it and ``theta`` or a GridSample grid, and every
    GridSample. A model without a transformer has none. Constants are not listed: they take
    the precision of their consumers and are no TensorRT layers.
    """
    g = model.graph
    return [g.node[k].name for k in _geometry_indices(g) if g.node[k].op_type != "Constant"]


def convert_to_fp16(model: onnx.ModelProto) -> Fp16Result:
    """An FP16 copy of ``model`` with float32 graph inputs and outputs; see the module docstring."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    nodes = list(g.node)
    elem: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        elem[t.name] = t.data_type
    keep = set(_geometry_indices(g))
    fp32_nodes = geometry_nodes(model)

    def wants_fp16(k: int) -> bool:
        return nodes[k].op_type in FP16_OPS and k not in keep

    consumers: dict[str, list[int]] = defaultdict(list)
    for k, n in enumerate(nodes):
        for i in n.input:
            consumers[i].append(k)
    half: list[bool] = []  # per node: runs FP16
    for k, n in enumerate(nodes):
        if n.op_type == "Constant":
            users = consumers.get(n.output[0], [])
            half.append(bool(users) and all(wants_fp16(c) for c in users))
        else:
            half.append(wants_fp16(k))

    # Graph outputs made by FP16 nodes get an FP16 name inside and a Cast to the public name.
    out_names = {o.name for o in g.output}
    renamed: dict[str, str] = {}
    for k, n in enumerate(nodes):
        if half[k]:
            for j, o in enumerate(n.output):
                if o in out_names and elem.get(o) == TensorProto.FLOAT:
                    renamed[o] = f"{o}/fp16"
                    n.output[j] = renamed[o]
    for n in nodes:
        for j, i in enumerate(n.input):
            if i in renamed:
                n.input[j] = renamed[i]
    for public, inner in renamed.items():
        elem[inner] = elem[public]

    fp16_tensors: set[str] = set()  # float tensors that are FP16 after conversion
    done_inits: set[str] = set()
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            casts[key] = f"{name}/cast_{suffix}"
            new_nodes.append(
                helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{name}/Cast_{suffix}")
            )
        return casts[key]

    def to_half(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name)

    n_fp16 = 0
    for k, n in enumerate(nodes):
        n = onnx.NodeProto.FromString(n.SerializeToString())
        if n.op_type == "Constant":
            value = next((a for a in n.attribute if a.name == "value"), None)
            if half[k] and value is not None and value.t.data_type == TensorProto.FLOAT:
                value.t.CopyFrom(to_half(value.t, value.t.name))
                fp16_tensors.add(n.output[0])
            new_nodes.append(n)
            continue
        for j, i in enumerate(n.input):
            if not i or elem.get(i) not in _FLOATS:
                continue
            if half[k] and i not in fp16_tensors:
                if i in inits and elem[i] == TensorProto.FLOAT:
                    if all(half[c] for c in consumers[i]):  # only FP16 users: convert in place
                        if i not in done_inits:
                            inits[i].CopyFrom(to_half(inits[i], i))
                            done_inits.add(i)
                        fp16_tensors.add(i)
                    else:  # shared with FP32 users: an FP16 copy
                        copy = f"{i}/fp16"
                        if copy not in done_inits:
                            new_inits.append(to_half(inits[i], copy))
                            done_inits.add(copy)
                        n.input[j] = copy
                else:
                    n.input[j] = cast(i, TensorProto.FLOAT16)
            elif not half[k] and i in fp16_tensors and n.op_type != "Cast":
                n.input[j] = cast(i, TensorProto.FLOAT)
        if half[k]:
            n_fp16 += 1
            fp16_tensors.update(o for o in n.output if elem.get(o) == TensorProto.FLOAT)
        new_nodes.append(n)
    for public, inner in renamed.items():
        new_nodes.append(
            helper.make_node(
                "Cast", [inner], [public], to=TensorProto.FLOAT, name=f"{public}/Cast_fp32"
            )
        )

    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    del g.value_info[:]  # stale types; the verification infers them again
    n_casts = len(casts) + len(renamed)
    logger.debug("fp16: %d nodes FP16, %d kept FP32, %d casts", n_fp16, len(fp32_nodes), n_casts)
    return Fp16Result(model, fp32_nodes, n_fp16, n_casts)
