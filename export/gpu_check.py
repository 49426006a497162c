"""Workstation check on a CUDA machine: parity of the shipped models on CUDA, and training speed.

    python export/gpu_check.py --out DIR [--train-seconds 300]

1. Parity. For each shipped ST-CNN (models/*-stcnn.pt and its bundled ONNX in edge_stn/assets),
   on the checkpoint's stored test images: PyTorch on CUDA (FP32 with TF32 off, FP32 with TF32
   on, FP16 autocast) against PyTorch on the CPU and against ONNX Runtime's CPU provider on the
   exported file; argmax agreement, error against the stored labels, and CUDA's consistency
   across batch sizes 1, 7 and 32. ONNX Runtime's CUDA and TensorRT providers are used when the
   installed onnxruntime has them, and the report says when it does not.
2. Training speed. `edge-stn train --config configs/train-tc.yaml` on CUDA (the whole schedule,
   or as many epochs as --train-seconds allows) and, on the same machine, one epoch on the CPU
   with all cores and with 2 threads (a gateway-sized CPU): seconds per epoch, ratios, and the
   GPU run's test error.

Writes DIR/gpu-check.json and prints a summary. Needs torch with CUDA and the train extra.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tc-stcnn", "rts-stcnn", "demo-stcnn")


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _torch_outputs(model: Any, x: Any, batch: int) -> dict[str, np.ndarray]:
    import torch

    parts: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            out = model(x[i : i + batch])
            got = {"logits": out.logits, "theta": out.theta, "canonical": out.canonical}
            for k, v in got.items():
                if v is not None:
                    parts.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, Any]:
    keys = sorted(set(a) & set(b))
    return {
        "max_abs_diff": {k: _diff(a[k], b[k]) for k in keys},
        "argmax_agreement": float(np.mean(a["logits"].argmax(1) == b["logits"].argmax(1))),
    }


def parity() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from edge_stn.checkpoint import load_checkpoint, model_from_checkpoint
    from edge_stn.export.verify import ort_session, run_ort

    providers = ort.get_available_providers()
    report: dict[str, Any] = {"onnxruntime": ort.__version__, "ort_providers": providers}
    if "CUDAExecutionProvider" not in providers:
        report["note"] = (
            "this onnxruntime has no CUDA or TensorRT provider (the GPU build is not installed "
            "here), so the exported file is checked on CUDA through PyTorch only: CUDA PyTorch "
            "against ONNX Runtime on the CPU on the same file's weights"
        )
    for name in MODELS:
        ckpt = load_checkpoint(ROOT / "models" / f"{name}.pt")
        model = model_from_checkpoint(ckpt).eval()
        images = ckpt["verify_images"]
        images = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
        labels = ckpt.get("verify_labels")
        labels = labels.numpy() if hasattr(labels, "numpy") else labels
        x = np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)
        onnx_path = ROOT / "edge_stn" / "assets" / f"{name}.onnx"
        ort_cpu = run_ort(ort_session(onnx_path), x, 32)
        cpu = _torch_outputs(model, torch.from_numpy(x), 32)
        model = model.cuda()
        xc = torch.from_numpy(x).cuda()
        res: dict[str, Any] = {"images": int(x.shape[0])}
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        fp32 = _torch_outputs(model, xc, 32)
        res["cuda_fp32_vs_ort_cpu"] = _compare(fp32, ort_cpu)
        res["cuda_fp32_vs_torch_cpu"] = _compare(fp32, cpu)
        by_batch = {b: _torch_outputs(model, xc, b) for b in (1, 7, 32)}
        res["cuda_batches_1_7_32_max_abs_diff"] = {
            k: max(_diff(by_batch[b][k], by_batch[1][k]) for b in (7, 32)) for k in by_batch[1]
        }
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        res["cuda_tf32_vs_ort_cpu"] = _compare(_torch_outputs(model, xc, 32), ort_cpu)
        with torch.autocast("cuda", dtype=torch.float16):
            half = _torch_outputs(model, xc, 32)
        res["cuda_fp16_autocast_vs_ort_cpu"] = _compare(half, ort_cpu)
        if "CUDAExecutionProvider" in providers:
            sess = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
            res["ort_cuda_vs_ort_cpu"] = _compare(run_ort(sess, x, 32), ort_cpu)
        if labels is not None:
            res["error"] = {
                "ort_cpu": float(np.mean(ort_cpu["logits"].argmax(1) != labels)),
                "cuda_fp32": float(np.mean(fp32["logits"].argmax(1) != labels)),
                "cuda_fp16_autocast": float(np.mean(half["logits"].argmax(1) != labels)),
            }
        report[name] = res
    return report


def _train(config: dict[str, Any], out: Path, device: str, timeout: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    cmd = [sys.executable, "-m", "edge_stn.cli", "train", "--config", str(cfg_path)]
    cmd += ["--device", device, "--out", str(out), "--quiet"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        rc: int | str = proc.returncode
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", ""
    wall = time.time() - t0
    rows = []
    metrics = out / "metrics.csv"
    if metrics.is_file():
        with metrics.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    secs = [float(r["seconds"]) for r in rows]
    summary = out / "summary.json"
    return {
        "device": device,
        "threads": config.get("threads"),
        "rc": rc,
        "wall_seconds": round(wall, 1),
        "epochs_done": len(rows),
        "epoch_seconds": secs,
        "median_epoch_seconds": float(np.median(secs[1:] if len(secs) > 1 else secs))
        if secs
        else None,
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        "tail": tail if rc != 0 else "",
    }


def training(out: Path, budget: float) -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "configs" / "train-tc.yaml").read_text(encoding="utf-8"))
    res: dict[str, Any] = {"config": "configs/train-tc.yaml"}
    res["cuda"] = _train(dict(base), out / "tc-cuda", "cuda", budget)
    # The demo recipe adds the consistency loss: a few epochs on CUDA exercise that path too.
    demo = yaml.safe_load((ROOT / "configs" / "train-demo.yaml").read_text(encoding="utf-8"))
    demo["optim"] = dict(demo["optim"], epochs=3)
    res["demo_cuda_3_epochs"] = _train(demo, out / "demo-cuda", "cuda", 120)
    for threads in (os.cpu_count() or 1, 2):
        cfg = dict(base, threads=threads)
        cfg["optim"] = dict(base["optim"], epochs=2)
        res[f"cpu_{threads}_threads"] = _train(cfg, out / f"tc-cpu{threads}", "cpu", 240)
    g = res["cuda"]["median_epoch_seconds"]
    for k in list(res):
        if k.startswith("cpu_") and g and res[k]["median_epoch_seconds"]:
            res[f"speedup_cuda_vs_{k}"] = round(res[k]["median_epoch_seconds"] / g, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-seconds", type=float, default=300.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0),
        "cpu_count": os.cpu_count(),
    }
    report["parity"] = parity()
    print(json.dumps(report["parity"], indent=1), flush=True)
    report["training"] = training(out, args.train_seconds)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report["training"], indent=1))


if __name__ == "__main__":
    main()
