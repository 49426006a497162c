#!/usr/bin/env bash
# Re-export the bundled models (edge_stn/assets/) from their checkpoints in models/.
#
#   export/export-bundled.sh            # every models/*-stcnn.pt that exists
#
# Each export is verified (ONNX Runtime vs PyTorch, batch sizes, TensorRT static report) and
# written atomically with its sidecar. SOURCE_DATE_EPOCH, when set, fixes the 'created' stamp so
# re-exports are byte-identical.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
edge_stn=${EDGE_STN:-edge-stn}
[ -x .venv/bin/edge-stn ] && edge_stn=.venv/bin/edge-stn

shopt -s nullglob
found=0
for ckpt in models/*-stcnn.pt; do
    name=$(basename "$ckpt" .pt)
    int8=()
    # The daemon's default on the CPU is the demo model's INT8 build (edge-stn quantize).
    [ "$name" = demo-stcnn ] && int8=(--int8)
    "$edge_stn" export "$ckpt" --out "edge_stn/assets/$name.onnx" --with-canonical ${int8[@]+"${int8[@]}"}
    found=1
done
[ "$found" = 1 ] || { echo "$0: no models/*-stcnn.pt checkpoints to export" >&2; exit 2; }
