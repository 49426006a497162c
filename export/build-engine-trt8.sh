#!/usr/bin/env bash
# Build a TensorRT 8.5/8.6 engine from an edge-stn export (JetPack 5.1.x).
#
#   export/build-engine-trt8.sh MODEL.onnx [ENGINE]
#
# Reads the input size, precision, batch profile and FP32 layers from the sidecar MODEL.json
# written by `edge-stn export`, and checks the model's sha256 against it first.
# Environment: MIN/OPT/MAX (batch sizes, default: the sidecar's profile), FP16=1 (build an FP32
# file with FP16 kernels), TRTEXEC (path to trtexec; on JetPack /usr/src/tensorrt/bin/trtexec),
# WORKSPACE_MIB (default 1024).
#
# TensorRT 8.5/8.6: parse opsets up to 17 (export with the default --opset 17); GridSample exists
# from 8.5; no --stronglyTyped, so FP16 builds pin the geometry layers (theta, grid, GridSample)
# to FP32 with --precisionConstraints=obey --layerPrecisions (layers are named after the ONNX
# nodes; `--verbose` lists them if a name is reported missing). INT64 shape tensors are cast to
# INT32 by the parser, with a warning that is harmless here.
set -euo pipefail

model=${1:?usage: $0 MODEL.onnx [ENGINE]}
engine=${2:-${model%.onnx}.trt8.engine}
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_model.sh"
load_model "$model"
if [ "$OPSET" -gt 17 ]; then
    echo "$0: opset $OPSET: TensorRT 8.5/8.6 parse opsets up to 17; re-export with --opset 17" >&2
    exit 2
fi

trtexec=${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}
min=${MIN:-$PROFILE_MIN} opt=${OPT:-$PROFILE_OPT} max=${MAX:-$PROFILE_MAX}
shape() { echo "$INPUT:${1}x${C}x${H}x${W}"; }
args=(
    --onnx="$model" --saveEngine="$engine"
    --minShapes="$(shape "$min")" --optShapes="$(shape "$opt")" --maxShapes="$(shape "$max")"
    --workspace="${WORKSPACE_MIB:-1024}"
)
if [ "$PRECISION" = fp16 ] || [ "${FP16:-0}" = 1 ]; then
    args+=(--fp16)
    [ -n "$FP32_LAYERS" ] && args+=(--precisionConstraints=obey --layerPrecisions="$FP32_LAYERS")
fi
set -x
"$trtexec" "${args[@]}"
