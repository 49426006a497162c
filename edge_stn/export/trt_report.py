"""A static TensorRT compatibility report: every node against TensorRT's ONNX support matrix.

It is a static check: no TensorRT build runs here (our machines have no TensorRT). It reads the
graph and compares each node's op, data type and attributes with what TensorRT's ONNX parser
documents; a clean report means "nothing known to fail", and ``trtexec`` on the target is the
real test (the recipes in the top-level ``export/`` folder).

Sources:
- ``tensorrt10-onnx-operators.tsv`` (package data, copied verbatim from the project's
  ``shared/reference/``): onnx-tensorrt's ``docs/operators.md`` of TensorRT 10.1 GA, as
  operator, supported (Y/N), types, restrictions. TensorRT 10 parses opsets 9 to 20.
- TensorRT 8.5/8.6 (JetPack 5.1): onnx-tensorrt's 8.5 ``docs/operators.md``, for the ops our
  models use (``_TRT8_TYPES``). Differences that matter here: opsets only up to 17; GridSample
  first appears in 8.5 (FP32, FP16); INT64 is not native (the parser casts INT64 weights and
  shape tensors down to INT32, with a warning); no BF16.
TensorRT's GridSample has no INT8 at any version, so there is no INT8 path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import onnx
from onnx import TensorProto, helper

MATRIX_FILE = "tensorrt10-onnx-operators.tsv"
TRT10 = "TensorRT 10.x"
TRT8 = "TensorRT 8.5/8.6"
TRT10_OPSETS = (9, 20)
TRT8_MAX_OPSET = 17

_TYPE_NAMES: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.DOUBLE: "DOUBLE",
}

# TensorRT 8.5's support matrix (onnx-tensorrt 8.5 docs/operators.md), the ops an edge-stn model
# may contain. 8.6 documents the same rows for these ops.
_TRT8_TYPES: dict[str, tuple[str, ...]] = {
    "AveragePool": ("FP32", "FP16", "INT8", "INT32"),
    "BatchNormalization": ("FP32", "FP16"),
    "Cast": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Concat": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Constant": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Conv": ("FP32", "FP16", "INT8"),
    "Flatten": ("FP32", "FP16", "INT32", "BOOL"),
    "Gather": ("FP32", "FP16", "INT8", "INT32", "BOOL"),
    "Gemm": ("FP32", "FP16", "INT8"),
    "GlobalAveragePool": ("FP32", "FP16", "INT8"),
    "GridSample": ("FP32", "FP16"),
    "Identity": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "MatMul": ("FP32", "FP16"),
    "MaxPool": ("FP32", "FP16", "INT8"),
    "Relu": ("FP32", "FP16", "INT8"),
    "Reshape": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Shape": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Slice": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Squeeze": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Transpose": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
    "Unsqueeze": ("FP32", "FP16", "INT32", "INT8", "BOOL"),
}
# Restrictions this module checks itself; any other restriction text is reported for a human.
_CHECKED_RESTRICTIONS = {
    "GridSample",
    "AveragePool",
    "MaxPool",
    "Constant",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "ReduceMean",
    "Dropout",
}
_AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1}


@dataclass(frozen=True)
class MatrixRow:
    op: str
    supported: bool
    types: tuple[str, ...]
    restrictions: str


def load_matrix() -> dict[str, MatrixRow]:
    text = resources.files("edge_stn.export").joinpath(MATRIX_FILE).read_text(encoding="utf-8")
    rows: dict[str, MatrixRow] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        op, sup, types, restr = [*line.split("\t"), "", "", ""][:4]
        rows[op] = MatrixRow(
            op,
            sup.strip() == "Y",
            tuple(t.strip() for t in types.split(",") if t.strip()),
            restr.strip(),
        )
    return rows


@dataclass(frozen=True)
class Finding:
    target: str  # TRT10 or TRT8
    level: str  # "error" (will not build or builds wrong) or "warning"
    node: str
    op: str
    message: str

    def line(self) -> str:
        where = f"{self.op} '{self.node}'" if self.node else self.op
        return f"{self.level}: {self.target}: {where}: {self.message}"


@dataclass
class TrtReport:
    opset: int
    op_counts: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    STATIC_NOTE = (
        "static check against TensorRT's ONNX operator support matrix; no TensorRT "
        "build ran here: build the engine with trtexec on the target to be sure"
    )

    def compatible(self, target: str) -> bool:
        return not any(f.target == target and f.level == "error" for f in self.findings)

    def blocking(self) -> list[Finding]:
        """Errors that fail the export unless ``--allow-non-trt``.

        Every TensorRT 10 error, and TensorRT 8.5/8.6 errors other than the opset: opsets 18
        and 19 are a documented choice (DESIGN §5) that gives up JetPack 5, with a warning.
        """
        return [
            f
            for f in self.findings
            if f.level == "error" and (f.target == TRT10 or f.op != "opset")
        ]

    def lines(self) -> list[str]:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.op_counts.items()))
        out = [f"TensorRT report ({self.STATIC_NOTE})", f"  opset {self.opset}; ops: {ops}"]
        for target in (TRT10, TRT8):
            verdict = "compatible" if self.compatible(target) else "NOT compatible"
            out.append(f"  {target}: {verdict}")
        out += [f"  {f.line()}" for f in self.findings]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "static_check": True,
            "note": self.STATIC_NOTE,
            "matrix": f"onnx-tensorrt 10.1 ({MATRIX_FILE})",
            "opset": self.opset,
            "ops": dict(sorted(self.op_counts.items())),
            "compatible": {TRT10: self.compatible(TRT10), TRT8: self.compatible(TRT8)},
            "findings": [asdict(f) for f in self.findings],
        }


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def tensorrt_report(model: onnx.ModelProto) -> TrtReport:
    """Check ``model`` (typed by shape inference here) against TensorRT 10.x and 8.5/8.6."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    elem: dict[str, int] = {}
    rank: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        elem[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            rank[vi.name] = len(tt.shape.dim)
    constants = {t.name for t in g.initializer}
    for t in g.initializer:
        elem[t.name] = t.data_type
    constants.update(n.output[0] for n in g.node if n.op_type == "Constant")
    counts: dict[str, int] = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    report = TrtReport(opset, counts)
    add = report.findings.append

    lo, hi = TRT10_OPSETS
    if not lo <= opset <= hi:
        add(
            Finding(
                TRT10,
                "error",
                "",
                "opset",
                f"opset {opset} is outside the {lo}-{hi} that TensorRT 10 parses",
            )
        )
    if opset > TRT8_MAX_OPSET:
        add(
            Finding(
                TRT8,
                "error",
                "",
                "opset",
                f"opset {opset}: TensorRT 8.5/8.6 parse opsets up to {TRT8_MAX_OPSET} "
                "(export with --opset 17 for JetPack 5)",
            )
        )

    matrix = load_matrix()
    int64_seen = False
    for n in g.node:
        name = n.name
        if n.domain not in ("", "ai.onnx"):
            for target in (TRT10, TRT8):
                add(
                    Finding(
                        target,
                        "error",
                        name,
                        n.op_type,
                        f"custom domain '{n.domain}' needs a TensorRT plugin",
                    )
                )
            continue
        row = matrix.get(n.op_type)
        if row is None or not row.supported:
            why = (
                "not in TensorRT's ONNX support matrix"
                if row is None
                else "not supported by TensorRT's ONNX parser"
            )
            for target in (TRT10, TRT8):
                add(Finding(target, "error", name, n.op_type, why))
            continue
        dtype = _data_type(n, elem)
        tname = _TYPE_NAMES.get(dtype, f"type {dtype}") if dtype else ""
        if tname and row.types and tname not in row.types:
            add(
                Finding(
                    TRT10,
                    "error",
                    name,
                    n.op_type,
                    f"input type {tname} not in {', '.join(row.types)}",
                )
            )
        if tname == "INT64":
            int64_seen = True
        trt8 = _TRT8_TYPES.get(n.op_type)
        if trt8 is None:
            add(
                Finding(
                    TRT8,
                    "warning",
                    name,
                    n.op_type,
                    "op not in this report's TensorRT 8.5 table: check it by hand",
                )
            )
        elif tname and tname != "INT64" and tname not in trt8:
            add(
                Finding(
                    TRT8, "error", name, n.op_type, f"input type {tname} not in {', '.join(trt8)}"
                )
            )
        for target, message in _restrictions(n, row, opset, rank, constants):
            add(Finding(target, "error", name, n.op_type, message))
        if row.restrictions and n.op_type not in _CHECKED_RESTRICTIONS:
            add(
                Finding(
                    TRT10,
                    "warning",
                    name,
                    n.op_type,
                    f"restriction not checked here: {row.restrictions}",
                )
            )
    if int64_seen or any(t.data_type == TensorProto.INT64 for t in g.initializer):
        add(
            Finding(
                TRT8,
                "warning",
                "",
                "INT64",
                "TensorRT 8.x casts INT64 shape tensors and weights down to INT32 "
                "(a parser warning, harmless here)",
            )
        )
    if "GridSample" in counts:
        add(
            Finding(
                TRT8,
                "warning",
                "",
                "GridSample",
                "needs TensorRT >= 8.5 (JetPack 5.1); TensorRT's GridSample has no INT8 mode",
            )
        )
    return report


def _data_type(n: onnx.NodeProto, elem: dict[str, int]) -> int:
    """Element type of the node's data (first input; a Constant's value); 0 when unknown."""
    if n.input and n.input[0]:
        return elem.get(n.input[0], 0)
    value = _attr(n, "value")
    return int(value.data_type) if isinstance(value, onnx.TensorProto) else 0


def _restrictions(
    n: onnx.NodeProto, row: MatrixRow, opset: int, rank: dict[str, int], constants: set[str]
) -> list[tuple[str, str]]:
    both = (TRT10, TRT8)
    out: list[tuple[str, str]] = []
    op = n.op_type
    if op == "GridSample":
        r = rank.get(n.input[0])
        if r != 4:
            out += [(t, f"input must be 4-D, got rank {r}") for t in both]
        mode = _attr(n, "mode", "linear" if opset >= 20 else "bilinear")
        if mode == "linear":
            out += [
                (
                    t,
                    "mode 'linear' (opset 20's spelling of bilinear): TensorRT's parser does not "
                    "read it as bilinear and samples nearest; export at opset 16-19",
                )
                for t in both
            ]
        elif mode not in ("bilinear", "nearest", "bicubic"):
            out += [(t, f"mode {mode!r} is not a TensorRT GridSample mode") for t in both]
    elif op in ("AveragePool", "MaxPool"):
        k = _attr(n, "kernel_shape", [])
        if len(k) not in (2, 3):
            out += [(t, f"{len(k)}-D pooling: only 2-D or 3-D") for t in both]
        d = _attr(n, "dilations", [])
        if d and any(x != 1 for x in d):
            out.append((TRT10, "dilations must be empty or all ones"))
        if op == "MaxPool" and len([o for o in n.output if o]) > 1:
            out += [(t, "the Indices output is unsupported") for t in both]
    elif op == "Constant":
        bad = [
            a.name
            for a in n.attribute
            if a.name in ("sparse_value", "value_string", "value_strings")
        ]
        if bad:
            out += [(t, f"attribute {bad[0]} is unsupported") for t in both]
    elif op in _AXES_INPUT:
        k = _AXES_INPUT[op]
        if len(n.input) > k and n.input[k] and n.input[k] not in constants:
            out += [(t, "axes must be an initializer or constant") for t in both]
    elif op == "Dropout" and len(n.input) > 2 and n.input[2] and n.input[2] not in constants:
        out += [(t, "training_mode must be an initializer that is False") for t in both]
    return out
