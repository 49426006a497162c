#!/usr/bin/env bash
# Build a TensorRT 10.x engine from an edge-stn export (JetPack 6, or a TensorRT 10 container).
#
#   export/build-engine-trt10.sh MODEL.onnx [ENGINE]
#
# Reads the input size, precision, batch profile and FP32 layers from the sidecar MODEL.json
# written by `edge-stn export`, and checks the model's sha256 against it first.
# Environment: MIN/OPT/MAX (batch sizes, default: the sidecar's profile), FP16=1 (build an FP32
# file with FP16 kernels, the geometry layers pinned to FP32), TRTEXEC (path to trtexec),
# WORKSPACE_MIB (default 1024).
#
# TensorRT 10 flags: --memPoolSize replaces 8.x's --workspace; an FP16 export is built with
# --stronglyTyped, which keeps every layer in the type the file gives it (theta and the sampling
# grid in FP32) without naming layers.
set -euo pipefail

model=${1:?usage: $0 MODEL.onnx [ENGINE]}
engine=${2:-${model%.onnx}.trt10.engine}
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_model.sh"
load_model "$model"
if [ "$OPSET" -ge 20 ]; then
    echo "$0: opset $OPSET: exported for ONNX Runtime only (GridSample 'linear'); re-export with --opset 17" >&2
    exit 2
fi

min=${MIN:-$PROFILE_MIN} opt=${OPT:-$PROFILE_OPT} max=${MAX:-$PROFILE_MAX}
shape() { echo "$INPUT:${1}x${C}x${H}x${W}"; }
args=(
    --onnx="$model" --saveEngine="$engine"
    --minShapes="$(shape "$min")" --optShapes="$(shape "$opt")" --maxShapes="$(shape "$max")"
    --memPoolSize=workspace:"${WORKSPACE_MIB:-1024}"
)
if [ "$PRECISION" = fp16 ]; then
    args+=(--stronglyTyped)
elif [ "${FP16:-0}" = 1 ]; then
    args+=(--fp16)
    [ -n "$FP32_LAYERS" ] && args+=(--precisionConstraints=obey --layerPrecisions="$FP32_LAYERS")
fi
set -x
"${TRTEXEC:-trtexec}" "${args[@]}"
