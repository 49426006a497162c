"""`edge-stn train`: trains an ST-CNN or the plain CNN baseline.

Fresh distortions every epoch (deterministic by seed and epoch, so a resumed run sees the same
data), AdamW with a one-cycle learning rate, the localization net at a reduced rate, best and
last checkpoints, per-epoch metrics as CSV and JSON. Under ``torchrun`` it trains with
DistributedDataParallel (gloo on CPU, NCCL on CUDA), each rank on its shard of every epoch.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from edge_stn import __version__
from edge_stn.checkpoint import load_checkpoint, save_checkpoint
from edge_stn.data.base import Samples, draw_passes
from edge_stn.data.factory import DataSources, build_sources
from edge_stn.errors import CheckpointError, ConfigError
from edge_stn.evaluate import score_torch, to_input
from edge_stn.nn.models import STCNN, ModelSpec, PlainCNN, build_model, count_flops
from edge_stn.training_config import TrainConfig

logger = logging.getLogger(__name__)

VERIFY_IMAGES = 256  # test images stored with the checkpoint for the export's parity check


@dataclass
class TrainResult:
    out_dir: Path
    best_path: Path
    last_path: Path
    val_error: float | None
    test_error: float
    test_ci: tuple[float, float]
    seconds: float


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def spec_for(cfg: TrainConfig, sources: DataSources) -> ModelSpec:
    m = cfg.model
    return ModelSpec(
        arch=cfg.arch,
        in_channels=sources.train.channels,
        in_size=tuple(sources.train.size),  # type: ignore[arg-type]
        num_classes=len(sources.label_names),
        widths=m.widths,
        dropout=m.dropout,
        stn_out=m.stn_out,
        padding_mode=m.padding_mode,
        loc_downsample=m.loc_downsample,
        loc_channels=m.loc_channels,
        loc_hidden=m.loc_hidden,
    )


def _param_groups(model: STCNN | PlainCNN, cfg: TrainConfig) -> list[dict[str, Any]]:
    if isinstance(model, STCNN):
        loc = list(model.transformer.parameters())
        loc_ids = {id(p) for p in loc}
        rest = [p for p in model.parameters() if id(p) not in loc_ids]
        return [
            {"params": rest, "lr": cfg.optim.lr},
            {"params": loc, "lr": cfg.optim.lr * cfg.optim.loc_lr_scale},
        ]
    return [{"params": list(model.parameters()), "lr": cfg.optim.lr}]


def random_thetas(
    n: int,
    generator: torch.Generator,
    *,
    angle: float = 20.0,
    scale: tuple[float, float] = (0.85, 1.15),
    shift: float = 0.15,
) -> torch.Tensor:
    """Random similarity transforms (normalized theta) for the consistency loss."""
    a = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(angle)
    s = scale[0] + torch.rand(n, generator=generator) * (scale[1] - scale[0])
    t = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift
    c, si = torch.cos(a) / s, torch.sin(a) / s
    return torch.stack([torch.stack([c, -si, t[:, 0]], 1), torch.stack([si, c, t[:, 1]], 1)], 1)


def consistency_loss(
    model: STCNN,
    x: torch.Tensor,
    canonical: torch.Tensor,
    generator: torch.Generator,
    angle: float = 20.0,
) -> torch.Tensor:
    """The canonical crop of x and of a re-transformed x should agree (pose invariance)."""
    thetas = random_thetas(x.shape[0], generator, angle=angle).to(x.device)
    # Re-transform at the input's own size (the transformer's warp would give its output size).
    grid = F.affine_grid(thetas, list(x.shape), align_corners=False)
    x2 = F.grid_sample(
        x, grid, mode="bilinear", padding_mode=model.transformer.padding_mode, align_corners=False
    )
    canonical2, _ = model.transformer(x2)
    return F.mse_loss(canonical2, canonical.detach())


def _epoch_samples(sources: DataSources, cfg: TrainConfig, epoch: int, d: Dist) -> Samples:
    full = draw_passes(
        sources.train,
        cfg.data.passes_per_epoch,
        seed=cfg.seed * 100_003 + epoch,
        workers=cfg.data.workers,
    )
    per_rank = len(full) // d.world
    sl = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    return Samples(full.images[sl], full.labels[sl])


def _write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    (out / "metrics.json").write_text(json.dumps(rows, indent=1) + "\n")
    with (out / "metrics.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def _progress(iterable: Any, enabled: bool, **kw: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kw)


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, max_steps: int | None = None
) -> TrainResult:
    """Train per ``cfg``. ``max_steps`` stops early (tests), after the step count, mid-epoch."""
    t_start = time.time()
    device = _pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = _init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    out = cfg.out
    last_path, best_path = out / "last.pt", out / "best.pt"
    if not resume and last_path.exists():
        raise ConfigError(
            f"{out} already holds a training run; pass --resume to continue it or choose another --out"
        )
    ckpt: dict[str, Any] | None = None
    if resume:
        if not last_path.exists():
            raise CheckpointError("nothing to resume: no last.pt", path=out)
        ckpt = load_checkpoint(last_path, expect_arch=cfg.arch)

    sources = build_sources(cfg)
    spec = spec_for(cfg, sources)
    if ckpt is not None and ModelSpec.from_dict(ckpt["spec"]) != spec:
        raise CheckpointError(
            "the checkpoint's model spec differs from this config's", path=last_path
        )
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device)
    flops = count_flops(model, spec.in_channels, spec.in_size)
    opt = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.optim.weight_decay)
    per_rank = (sources.train.num_items() * cfg.data.passes_per_epoch) // d.world
    steps_per_epoch = max(1, per_rank // cfg.optim.batch_size)
    total_steps = cfg.optim.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=[g["lr"] for g in opt.param_groups],
        total_steps=total_steps,
        pct_start=0.2,
    )
    rows: list[dict[str, Any]] = []
    start_epoch, best_val = 0, math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"]) + 1
        rows = list(ckpt.get("metrics", []))
        best_val = float(ckpt.get("best_val_error", math.inf))
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.type == "cuda" else None
        )
    val_samples = draw_passes(sources.val, 2, seed=cfg.seed + 7_777) if sources.val else None
    verify = draw_passes(sources.test, 1, seed=12_345)
    verify = Samples(verify.images[:VERIFY_IMAGES], verify.labels[:VERIFY_IMAGES])
    gen = torch.Generator().manual_seed(cfg.seed)
    base_payload = {
        "spec": spec.to_dict(),
        "labels": sources.label_names,
        "background_label": sources.background_label,
        "input": {
            "pixel_scale": 1.0 / 255.0,
            "mean": 0.0,
            "std": 1.0,
            "color": "gray" if spec.in_channels == 1 else "bgr",
        },
        "dataset": {"name": cfg.dataset, "description": sources.description},
        "window": getattr(sources.train, "window_info", None),
        "config": json.loads(cfg.model_dump_json()),
        "flops": flops,
        "producer": {"edge_stn": __version__, "torch": str(torch.__version__)},
        "verify_images": torch.from_numpy(verify.images),
        "verify_labels": torch.from_numpy(verify.labels),
    }
    steps_done = 0
    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1_000 + epoch)
        samples = _epoch_samples(sources, cfg, epoch, d)
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(samples))
        net.train()
        loss_sum, wrong, seen = 0.0, 0, 0
        bar = _progress(
            range(steps_per_epoch),
            progress and d.main,
            desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
            leave=False,
            unit="batch",
        )
        for step in bar:
            idx = order[step * cfg.optim.batch_size : (step + 1) * cfg.optim.batch_size]
            x = to_input(samples.images[idx], device)
            y = torch.from_numpy(samples.labels[idx]).to(device)
            outp = net(x)
            loss = F.cross_entropy(outp.logits, y, label_smoothing=cfg.optim.label_smoothing)
            if cfg.optim.consistency_weight > 0 and isinstance(model, STCNN):
                loss = loss + cfg.optim.consistency_weight * consistency_loss(
                    model, x, outp.canonical, gen, cfg.optim.consistency_angle
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            wrong += int((outp.logits.argmax(1) != y).sum())
            seen += len(idx)
            steps_done += 1
            if max_steps is not None and steps_done >= max_steps:
                break
        if d.world > 1:  # BN running statistics differ per rank: take rank 0's everywhere
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        val_err = None
        if val_samples is not None and d.main:
            val_err = score_torch(model, val_samples, device).error
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / max(seen, 1), 5),
            "train_error": round(wrong / max(seen, 1), 5),
            "val_error": None if val_err is None else round(val_err, 5),
            "lr": round(float(sched.get_last_lr()[0]), 7),
            "seconds": round(time.time() - t0, 2),
        }
        rows.append(row)
        if d.main:
            logger.info("epoch %d: %s", epoch + 1, row)
            if progress:
                print(
                    f"epoch {epoch + 1:3d}/{cfg.optim.epochs}  loss {loss_sum / max(seen, 1):.4f}  "
                    f"train err {100 * wrong / max(seen, 1):.2f}%  "
                    + ("" if val_err is None else f"val err {100 * val_err:.2f}%  ")
                    + f"{row['seconds']:.0f}s",
                    flush=True,
                )
            improved = val_err is None or val_err <= best_val
            if val_err is not None and improved:
                best_val = val_err
            payload = {
                **base_payload,
                "state_dict": model.state_dict(),
                "epoch": epoch,
                "metrics": rows,
                "best_val_error": best_val,
            }
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                last_path,
                {**payload, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
            )
            if improved:
                save_checkpoint(best_path, payload)
            _write_metrics(out, rows)
        if max_steps is not None and steps_done >= max_steps:
            break
    if d.world > 1:
        dist.barrier()
    test_err, ci = math.nan, (math.nan, math.nan)
    if d.main:
        best = load_checkpoint(best_path)
        model.load_state_dict(best["state_dict"])
        test = draw_passes(sources.test, cfg.data.eval_passes, seed=2_024, shuffle=False)
        res = score_torch(model, test, device)
        test_err, ci = res.error, (res.ci_low, res.ci_high)
        # The held-out score travels with the selected checkpoint (the export embeds it).
        best["test"] = {
            "error": test_err,
            "ci95": list(ci),
            "samples": res.samples,
            "passes": cfg.data.eval_passes,
            "seed": 2_024,
        }
        save_checkpoint(
            best_path, {k: v for k, v in best.items() if k not in ("format", "format_version")}
        )
        summary = {
            "name": cfg.name,
            "arch": cfg.arch,
            "dataset": cfg.dataset,
            "best_epoch": int(best["epoch"]) + 1,
            "val_error": best_val if best_val < math.inf else None,
            "test_error": test_err,
            "test_ci95": list(ci),
            "test_samples": res.samples,
            "flops_per_image": flops,
            "train_seconds": round(time.time() - t_start, 1),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if progress:
            print(
                f"test error {100 * test_err:.2f}% (95% CI {100 * ci[0]:.2f}-{100 * ci[1]:.2f}%, "
                f"{res.samples} samples); checkpoints in {out}",
                flush=True,
            )
    if d.world > 1:
        dist.destroy_process_group()
    return TrainResult(
        out,
        best_path,
        last_path,
        None if best_val == math.inf else best_val,
        test_err,
        ci,
        time.time() - t_start,
    )
