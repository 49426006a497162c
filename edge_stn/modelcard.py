"""Measures the figures of docs/model-card.md for the shipped checkpoints in one run:
test error with its 95% interval, multiply-accumulates per image, and CPU latency (PyTorch eager,
``inference_mode``, batch 1 and 32) measured here, in the same process, one model after another.

    python -m edge_stn.modelcard [--models models] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_stn.checkpoint import load_checkpoint, model_from_checkpoint
from edge_stn.evaluate import evaluate, to_input
from edge_stn.nn.models import count_flops


def latency_ms(
    model: torch.nn.Module, shape: tuple[int, ...], batch: int, repeats: int = 5
) -> float:
    """Median over ``repeats`` rounds of the per-image time, in milliseconds."""
    x = to_input(np.random.default_rng(0).integers(0, 255, size=(batch, *shape), dtype=np.uint8))
    rounds = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        n = max(1, 200 // batch)
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(n):
                model(x)
            rounds.append((time.perf_counter() - t) / (n * batch) * 1000)
    return statistics.median(rounds)


def measure(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    spec = ckpt["spec"]
    dataset = ckpt["dataset"]["name"]
    ev = evaluate(path, dataset, passes=ckpt["config"]["data"]["eval_passes"], figure=None)
    shape = (spec["in_channels"], *spec["in_size"])
    return {
        "model": path.name,
        "arch": spec["arch"],
        "dataset": dataset,
        "input": f"{spec['in_size'][0]}x{spec['in_size'][1]}",
        "error": ev.error,
        "ci95": list(ev.ci95),
        "samples": ev.samples,
        "mmacs": count_flops(model, spec["in_channels"], tuple(spec["in_size"])) / 1e6,
        "params": sum(p.numel() for p in model.parameters()),
        "ms_b1": latency_ms(model, shape, 1),
        "ms_b32": latency_ms(model, shape, 32),
        "stn_pose": ev.stn_pose,
        "epochs": f"{int(ckpt['epoch']) + 1}/{len(ckpt['metrics'])}",
        "train_minutes": round(sum(r["seconds"] for r in ckpt["metrics"]) / 60, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | arch | data | input | test error (95% CI) | MMACs/image | params | CPU ms/image b1 | b32 | best/trained epochs | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['arch']} | {r['dataset']} | {r['input']} | {100 * r['error']:.2f}% "
            f"({100 * r['ci95'][0]:.2f}-{100 * r['ci95'][1]:.2f}) | {r['mmacs']:.1f} | {r['params']:,} | "
            f"{r['ms_b1']:.2f} | {r['ms_b32']:.3f} | {r['epochs']} | {r['train_minutes']} |"
        )
    out += [
        "",
        "| model | median zoom | mean abs rotation (deg) | mean abs shift (normalized) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        p = r.get("stn_pose")
        if p:
            out.append(
                f"| {r['model']} | {p['median_zoom']:.2f}x | {p['mean_abs_rotation_deg']:.1f} | "
                f"{p['mean_abs_shift']:.2f} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="models")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(p) for p in sorted(Path(args.models).glob("*.pt"))]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
