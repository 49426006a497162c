# Sourced by the build-engine scripts: checks MODEL.onnx against its sidecar MODEL.json and sets
# INPUT, C, H, W, PRECISION, OPSET, SHA256, PROFILE_MIN/OPT/MAX and FP32_LAYERS from it.
# usage (inside a script): load_model "$model"
load_model() {
    local model=$1 here sidecar actual
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    sidecar=${model%.onnx}.json
    [ -f "$model" ] || { echo "$0: no such model: $model" >&2; exit 2; }
    [ -f "$sidecar" ] || { echo "$0: no sidecar $sidecar beside the model (re-export it)" >&2; exit 2; }
    eval "$(python3 "$here/_sidecar.py" "$sidecar")"
    actual=$(sha256sum "$model" | cut -d' ' -f1)
    if [ -n "$SHA256" ] && [ "$actual" != "$SHA256" ]; then
        echo "$0: $model does not match its sidecar's sha256: re-export it" >&2
        exit 2
    fi
}
