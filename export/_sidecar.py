"""Print shell assignments from an edge-stn sidecar (<model>.json) for the build scripts.

Usage: python3 export/_sidecar.py MODEL.json  ->  C=1 H=60 W=60 PRECISION=fp32 ...
Standard library only: it runs on a Jetson without edge-stn installed.
"""

import json
import shlex
import sys
from pathlib import Path

doc = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
inp, trt = doc["input"], doc.get("tensorrt") or {}
profile = trt.get("batch_profile") or {"min": 1, "opt": 8, "max": 32}
values = {
    "C": inp["channels"],
    "H": inp["height"],
    "W": inp["width"],
    "INPUT": inp["name"],
    "PRECISION": doc.get("precision", "fp32"),
    "OPSET": doc["opset"],
    "SHA256": doc.get("sha256", ""),
    "FP32_LAYERS": ",".join(f"{n}:fp32" for n in trt.get("fp32_layers", [])),
    "PROFILE_MIN": profile["min"],
    "PROFILE_OPT": profile["opt"],
    "PROFILE_MAX": profile["max"],
}
for key, value in values.items():
    print(f"{key}={shlex.quote(str(value))}")
