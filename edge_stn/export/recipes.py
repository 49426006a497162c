"""The next steps printed after an export: ``trtexec`` per TensorRT version and the daemon config.

Flags differ between versions: TensorRT 10 removed ``--workspace`` (``--memPoolSize`` replaces
it) and adds ``--stronglyTyped``, which builds each layer in the type the ONNX file gives it, so
an FP16 export keeps its FP32 geometry without naming layers. TensorRT 8.5/8.6 choose precisions
themselves: with ``--fp16`` they may run the grid in FP16 unless the geometry layers are pinned
with ``--precisionConstraints=obey --layerPrecisions=...:fp32`` (TensorRT names layers after the
ONNX nodes). The scripts in the top-level ``export/`` folder do the same from the sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRT8_MAX_OPSET = 17
TRT10_MAX_OPSET = 19  # 20 parses, but its GridSample 'linear' is misread


@dataclass(frozen=True)
class BatchProfile:
    min: int = 1
    opt: int = 8
    max: int = 32

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """``"1,8,32"`` -> BatchProfile(1, 8, 32); ValueError when malformed or unordered."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"batch profile {text!r}: expected MIN,OPT,MAX, e.g. 1,8,32")
        lo, opt, hi = (int(p) for p in parts)
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"batch profile {text!r}: need 1 <= MIN <= OPT <= MAX")
        return cls(lo, opt, hi)

    def shapes(self, chw: tuple[int, int, int]) -> tuple[str, str, str]:
        c, h, w = chw
        return (
            f"images:{self.min}x{c}x{h}x{w}",
            f"images:{self.opt}x{c}x{h}x{w}",
            f"images:{self.max}x{c}x{h}x{w}",
        )

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def trtexec_lines(
    model: Path,
    chw: tuple[int, int, int],
    profile: BatchProfile,
    *,
    fp16: bool,
    fp32_layers: list[str],
    opset: int = 17,
) -> list[tuple[str, str]]:
    """(TensorRT version, command) pairs for building an engine from ``model``.

    TensorRT 8.5/8.6 lines only for opsets they parse (<= 17); none at all for opset 20, whose
    GridSample TensorRT misreads.
    """
    if opset > TRT10_MAX_OPSET:
        return []
    lo, opt, hi = profile.shapes(chw)
    stem = model.with_suffix("")
    base = f"trtexec --onnx={model} --minShapes={lo} --optShapes={opt} --maxShapes={hi}"
    pin = ""
    if fp32_layers:
        layers = ",".join(f"{n}:fp32" for n in fp32_layers)
        pin = f" --precisionConstraints=obey --layerPrecisions={layers}"
    strong = " --stronglyTyped" if fp16 else ""
    lines = [
        ("10.x", f"{base} --saveEngine={stem}.trt10.engine --memPoolSize=workspace:1024{strong}")
    ]
    if opset <= TRT8_MAX_OPSET:
        trt8 = f"{base} --saveEngine={stem}.trt8.engine --workspace=1024"
        lines.append(("8.5/8.6", trt8 + (f" --fp16{pin}" if fp16 else "")))
        if not fp16 and fp32_layers:
            lines.append(
                (
                    "8.5/8.6, FP16 engine from this FP32 file",
                    f"{base} --saveEngine={stem}.trt8-fp16.engine --workspace=1024 --fp16{pin}",
                )
            )
    return lines


def run_config_snippet(model: Path, profile: BatchProfile, *, fp16: bool) -> str:
    """YAML for ``edge-stn run`` (keys as in configs/gateway.yaml)."""
    return "\n".join(
        [
            "model:",
            f"  path: {model}    # keep the sidecar {model.with_suffix('.json').name} beside it",
            "  providers:        # in order of preference; the first that loads is used",
            "    - name: tensorrt",
            "      options:",
            "        engine_cache_dir: /var/cache/edge-stn/trt",
            f"        fp16: {'true' if fp16 else 'false'}",
            f"        batch_profile: "
            f"{{min: {profile.min}, opt: {profile.opt}, max: {profile.max}}}",
            "    - name: cuda",
            "    - name: cpu",
        ]
    )


def next_steps(
    model: Path,
    chw: tuple[int, int, int],
    profile: BatchProfile,
    *,
    fp16: bool,
    fp32_layers: list[str],
    opset: int = 17,
) -> list[str]:
    out = ["Next steps"]
    lines = trtexec_lines(model, chw, profile, fp16=fp16, fp32_layers=fp32_layers, opset=opset)
    if lines:
        out.append("  Build a TensorRT engine on the target (see export/README.md):")
        for version, cmd in lines:
            out += [f"    # TensorRT {version}", f"    {cmd}"]
        if opset > TRT8_MAX_OPSET:
            out.append(
                f"    # (no TensorRT 8.5/8.6 line: they parse opsets up to {TRT8_MAX_OPSET})"
            )
    else:
        out.append(f"  Opset {opset} is for ONNX Runtime only: no TensorRT engine from this file.")
    out.append("  Run it on a gateway (`edge-stn run --config gateway.yaml`), with:")
    out += [f"    {line}" for line in run_config_snippet(model, profile, fp16=fp16).splitlines()]
    return out
