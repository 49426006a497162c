"""The `edge-stn` command. Heavy modules (torch) are imported inside the subcommands that need
them, so `edge-stn run` on a gateway never loads torch.

Exit codes: 0 ok; 2 bad input (one line on stderr, no traceback); 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_stn import __version__
from edge_stn.errors import EdgeStnError, MissingExtraError

logger = logging.getLogger("edge_stn")


class UsageError(EdgeStnError):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _need(module: str, extra: str, purpose: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(module, extra, purpose)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> int:
    from edge_stn.training_config import load_train_config

    overrides = {"arch": args.arch, "out": args.out, "device": args.device}
    cfg = load_train_config(Path(args.config), overrides)
    _need("torch", "train", "training")
    from edge_stn.train import train

    train(cfg, resume=args.resume, progress=not args.quiet, max_steps=args.max_steps)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    path = Path(args.model)
    if not path.is_file():
        raise EdgeStnError("no such model file", path=path)
    if path.suffix != ".onnx":
        _need("torch", "train", "evaluating a checkpoint")
    from edge_stn.evaluate import evaluate, evaluation_json

    figure = (
        Path(args.figure)
        if args.figure
        else path.with_name(path.stem + f"-{args.dataset.split(':')[0]}.png")
    )
    ev = evaluate(path, args.dataset, passes=args.passes, figure=None if args.no_figure else figure)
    if args.json:
        print(evaluation_json(ev))
    else:
        print(ev.table())
    if args.json_out:
        Path(args.json_out).write_text(evaluation_json(ev) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    for module in ("torch", "onnx"):
        _need(module, "export", "exporting a model")
    if not args.no_verify:
        _need("onnxruntime", "cpu", "verifying an export")
    from edge_stn.export.onnx_export import ExportOptions, export_model
    from edge_stn.export.recipes import BatchProfile

    try:
        profile = BatchProfile.parse(args.batch_profile)
    except ValueError as exc:
        raise UsageError(f"--batch-profile: {exc}") from None
    opts = ExportOptions(
        opset=args.opset,
        fp16=args.fp16,
        with_canonical=args.with_canonical,
        allow_opset_20=args.allow_opset_20,
        allow_non_trt=args.allow_non_trt,
        simplify=args.simplify,
        verify=not args.no_verify,
        batch_profile=profile,
    )
    if args.int8 and args.fp16:
        raise UsageError("--int8 quantizes the fp32 model: it does not combine with --fp16")
    if args.int8:
        _need("onnxruntime", "cpu", "quantizing a model")
    result = export_model(Path(args.checkpoint), Path(args.out), opts)
    print("\n".join(result.lines()))
    if args.int8:
        from edge_stn.export.quantize import quantize_model

        print("\n".join(quantize_model(result.model_path).lines()))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    _need("onnx", "export", "quantizing a model")
    _need("onnxruntime", "cpu", "quantizing a model")
    from edge_stn.export.quantize import QuantizeOptions, quantize_model

    if not 0.0 <= args.min_agreement <= 1.0:
        raise UsageError(f"--min-agreement must be within 0-1, got {args.min_agreement}")
    opts = QuantizeOptions(
        calibration_samples=args.calibration,
        seed=args.seed,
        verify_samples=args.verify_samples,
        min_agreement=args.min_agreement,
        data_folder=Path(args.data_folder) if args.data_folder else None,
    )
    result = quantize_model(Path(args.model), Path(args.out) if args.out else None, opts)
    print("\n".join(result.lines()))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from edge_stn.config import check_config, describe, load_config

    path = Path(args.file)
    cfg = load_config(path)
    print(f"ok: {path}: {describe(cfg)}")
    for warning in check_config(cfg):
        print(f"warning: {warning}")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _range(text: str) -> tuple[float, float]:
    """``A`` or ``A-B`` (non-negative numbers) as a range."""
    parts = text.split("-")
    try:
        lo, hi = (float(parts[0]), float(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or hi is None or not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI with 0 <= LO <= HI, got {text!r}")
    return lo, hi


def _range_max(text: str) -> float:
    lo, hi = _range(text)
    if lo != hi:
        raise argparse.ArgumentTypeError(f"expected one number, got {text!r}")
    return hi


def _angle(text: str) -> float:
    lo, hi = _range(text)
    if lo != hi or hi > 180:
        raise argparse.ArgumentTypeError(f"expected degrees in [0, 180], got {text!r}")
    return hi


def cmd_synth_video(args: argparse.Namespace) -> int:
    from edge_stn.video.synth_video import write_synthetic_video
    from edge_stn.video.synthetic import MotionSettings

    try:
        settings = MotionSettings(
            count=(int(args.objects[0]), int(args.objects[1])),
            height=args.digit_height,
            angle=args.angle,
            shear=args.shear,
            aspect=args.aspect,
            contrast=args.contrast,
            noise=args.noise,
            blur=args.blur,
            clutter=args.clutter,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    result = write_synthetic_video(
        Path(args.out),
        Path(args.truth),
        frames=args.frames,
        width=args.width,
        height=args.height,
        fps=args.fps,
        seed=args.seed,
        settings=settings,
        codec=args.codec,
    )
    print(
        f"wrote {result.video} ({result.frames} frames, {args.width}x{args.height} at "
        f"{args.fps:g} fps, {result.codec}) and {result.truth} ({result.objects} objects)"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edge_stn.daemon import run_daemon

    if not args.verbose:
        logging.getLogger("edge_stn").setLevel(logging.INFO)
    return run_daemon(Path(args.config))


def cmd_sign_model(args: argparse.Namespace) -> int:
    from edge_stn.runtime import signing

    if args.new_key:
        key = signing.new_private_key()
        signing.write_private_key(key, Path(args.new_key))
        print(f"wrote {args.new_key} (Ed25519 private key, mode 0600: keep it off the gateways)")
        print("public key for model.trust.public_keys in the gateway config:")
        print(f"  {signing.public_key_text(key.public_key())}")
        if not args.model:
            return 0
    if not args.model:
        raise UsageError("sign-model: give a MODEL to sign, or --new-key FILE")
    if not args.key and not args.new_key:
        raise UsageError("sign-model: --key PRIVATE_KEY is required")
    if not Path(args.model).is_file():
        raise EdgeStnError("no such model file", path=args.model)
    key = signing.load_private_key(Path(args.new_key or args.key))
    sig = signing.sign_model(Path(args.model), key, Path(args.out) if args.out else None)
    kid = signing.key_id(key.public_key())
    print(f"signed {args.model} with key {kid}: {sig}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_stn.demo import run_demo

    return run_demo(seconds=args.seconds, out=Path(args.out))


def cmd_subscribe(args: argparse.Namespace) -> int:
    from edge_stn.subscriber import (
        SubscribeOptions,
        broker_arguments,
        options_from_config,
        run_subscribe,
    )

    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port: expected 1-65535, got {args.port}")
    given = {
        **broker_arguments(args),
        "devices": tuple(args.device),
        "cameras": tuple(args.camera),
        "labels": tuple(args.label),
        "json_lines": args.json,
        "crops_dir": Path(args.crops) if args.crops else None,
        "share": args.share,
        "session": args.session,
        "session_expiry_s": args.session_expiry,
        "count": args.count,
        "seconds": args.seconds,
    }
    if args.config:
        opts = options_from_config(Path(args.config), **given)
    else:
        opts = SubscribeOptions(**{k: v for k, v in given.items() if v is not None})
    if opts.share and not opts.v5:
        raise UsageError("--share needs MQTT v5 (--protocol v5)")
    return run_subscribe(opts)


def cmd_command(args: argparse.Namespace) -> int:
    from edge_stn.remote import run_command_cli

    return run_command_cli(args)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4,8, got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    _need("onnxruntime", "cpu", "benchmarking")
    from edge_stn.bench import BenchOptions, run_bench
    from edge_stn.bench.report import markdown, plot, write_json, write_markdown

    given = {
        "sections": tuple(s.strip() for s in args.sections.split(",") if s.strip())
        if args.sections
        else None,
        "repeats": args.repeats,
        "threads": args.threads,
        "video_frames": args.video_frames,
        "latency_seconds": args.latency_seconds,
        "warmup_seconds": args.warmup_seconds,
        "scaling_seconds": args.scaling_seconds,
        "scaling_cameras": args.cameras,
        "checkpoint": Path(args.checkpoint) if args.checkpoint else None,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    opts = BenchOptions.quick_run(**overrides) if args.quick else BenchOptions(**overrides)
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out / "bench.json"
    md_path = Path(args.markdown) if args.markdown else out / "benchmarks.md"
    png_path = Path(args.plot) if args.plot else out / "benchmarks.png"
    doc = run_bench(opts, progress=lambda line: print(line, flush=True))
    problem = plot(doc, png_path)
    if problem:
        doc["notes"].append(problem)
    command = " ".join(["edge-stn", *getattr(args, "argv", [])])
    write_json(json_path, doc)
    write_markdown(md_path, markdown(doc, command))
    print("targets:")
    for t in doc["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        print(f"  {met:6s} {t['what']}: {value} {t['unit']} (wanted {t['target']})")
    print(f"wrote {json_path}, {md_path}" + ("" if problem else f", {png_path}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-stn", description="Spatial Transformer Networks at the edge")
    p.add_argument("--version", action="version", version=f"edge-stn {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train an ST-CNN or the CNN baseline")
    t.add_argument("--config", required=True, help="training YAML (configs/train-*.yaml)")
    t.add_argument("--arch", choices=["stcnn", "cnn"], help="override the config's architecture")
    t.add_argument("--out", help="output folder (default: the config's 'out')")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument(
        "--max-steps", type=int, help="stop after this many optimizer steps (smoke runs)"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="error rate with a 95%% confidence interval")
    e.add_argument("--model", required=True, help="checkpoint (.pt) or exported model (.onnx)")
    e.add_argument("--dataset", default="tc", help="tc, rts, windows or folder:DIR")
    e.add_argument(
        "--passes", type=_positive_int, default=10, help="distortions per test item (default 10)"
    )
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--json-out", help="also write the JSON to this file")
    e.add_argument("--figure", help="PNG of inputs and STN outputs (default: beside the model)")
    e.add_argument("--no-figure", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a checkpoint to a verified ONNX file for TensorRT")
    x.add_argument("checkpoint", help="training checkpoint (.pt)")
    x.add_argument("--out", required=True, help="the .onnx to write (sidecar: same name, .json)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset, 16-19 (default 17)")
    x.add_argument("--fp16", action="store_true", help="FP16; theta and the grid stay FP32")
    x.add_argument("--with-canonical", action="store_true", help="also output the canonical crop")
    x.add_argument(
        "--allow-opset-20",
        action="store_true",
        help="accept opset 20: for ONNX Runtime only (implies --allow-non-trt)",
    )
    x.add_argument(
        "--allow-non-trt",
        action="store_true",
        help="export even if TensorRT cannot build the graph",
    )
    x.add_argument("--simplify", action="store_true", help="simplify with onnxslim, then verify")
    x.add_argument("--no-verify", action="store_true", help="skip ONNX Runtime vs PyTorch")
    x.add_argument(
        "--batch-profile",
        default="1,8,32",
        metavar="MIN,OPT,MAX",
        help="TensorRT batch sizes for trtexec and the metadata (default 1,8,32)",
    )
    x.add_argument(
        "--int8",
        action="store_true",
        help="also write OUT-int8.onnx, the INT8 build for CPU gateways (see edge-stn quantize)",
    )
    x.set_defaults(func=cmd_export)

    qz = sub.add_parser(
        "quantize",
        help="the INT8 build of an exported fp32 model for CPU gateways, verified against it",
        description="Static INT8 (QDQ) quantization of the classifier; its first layer, the "
        "localization net, theta, the grid and GridSample stay float. Calibrates on the training split of the "
        "data set recorded in the model, verifies against the fp32 model on the test split "
        "and writes nothing when the argmax agreement is below --min-agreement.",
    )
    qz.add_argument("model", help="the exported fp32 .onnx (with its sidecar .json)")
    qz.add_argument("--out", help="the .onnx to write (default MODEL-int8.onnx)")
    qz.add_argument(
        "--calibration",
        type=_positive_int,
        default=1024,
        help="training samples to calibrate on (default 1024)",
    )
    qz.add_argument("--seed", type=int, default=0, help="calibration draw seed (default 0)")
    qz.add_argument(
        "--verify-samples",
        type=_positive_int,
        default=5000,
        help="test samples to verify on, rounded up to whole passes (default 5000)",
    )
    qz.add_argument(
        "--min-agreement",
        type=float,
        default=0.98,
        help="least argmax agreement with the fp32 model (default 0.98)",
    )
    qz.add_argument("--data-folder", help="the image folder of a model trained on one")
    qz.set_defaults(func=cmd_quantize)

    v = sub.add_parser("synth-video", help="a test video of moving digits with ground truth")
    v.add_argument("--out", required=True, help="the video to write (.mp4)")
    v.add_argument("--truth", required=True, help="the ground-truth JSON to write")
    v.add_argument("--frames", type=_positive_int, default=300, help="frames (default 300)")
    v.add_argument("--width", type=_positive_int, default=640, help="pixels (default 640)")
    v.add_argument("--height", type=_positive_int, default=480, help="pixels (default 480)")
    v.add_argument("--fps", type=_positive_float, default=15.0, help="frame rate (default 15)")
    v.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    v.add_argument(
        "--objects", type=_range, default=(1, 4), help="moving digits, N or LO-HI (default 1-4)"
    )
    v.add_argument(
        "--digit-height", type=_range, default=(40, 120), help="pixels, N or LO-HI (default 40-120)"
    )
    v.add_argument("--angle", type=_angle, default=45.0, help="rotation within +/- degrees (45)")
    v.add_argument("--shear", type=_range_max, default=0.2, help="shear within +/- (0.2)")
    v.add_argument(
        "--aspect", type=_range_max, default=0.15, help="width/height jitter, log ratio (0.15)"
    )
    v.add_argument(
        "--contrast",
        type=_range,
        default=(50, 220),
        help="ink above background, grey levels, N or LO-HI (default 50-220: strong to weak)",
    )
    v.add_argument(
        "--noise", type=_range, default=(2, 8), help="sensor noise sigma, grey levels (2-8)"
    )
    v.add_argument("--blur", type=_range, default=(0, 1.5), help="blur sigma, pixels (0-1.5)")
    v.add_argument("--clutter", type=int, default=6, help="clutter strokes per segment (6)")
    v.add_argument(
        "--codec",
        choices=["auto", "h264", "mp4v"],
        default="auto",
        help="h264 through Debian's ffmpeg, or OpenCV's mp4v (auto: h264 when ffmpeg is there)",
    )
    v.set_defaults(func=cmd_synth_video)

    r = sub.add_parser("run", help="the gateway daemon: cameras -> ST-CNN -> MQTT")
    r.add_argument("--config", required=True, help="daemon YAML (configs/gateway.yaml)")
    r.set_defaults(func=cmd_run)

    sm = sub.add_parser(
        "sign-model",
        help="sign a model (Ed25519) for gateways whose config requires signatures",
        description="Writes MODEL.sig beside the model. --new-key makes a key pair first and "
        "prints the public key for model.trust.public_keys.",
    )
    sm.add_argument("model", nargs="?", help="the .onnx to sign")
    sm.add_argument("--key", help="Ed25519 private key (PEM, PKCS#8)")
    sm.add_argument("--new-key", metavar="FILE", help="make a new private key in FILE (0600)")
    sm.add_argument("--out", help="signature file (default: MODEL.sig)")
    sm.set_defaults(func=cmd_sign_model)

    d = sub.add_parser(
        "demo", help="daemon + private broker + synthetic camera + subscriber, with accuracy"
    )
    d.add_argument(
        "--seconds", type=_positive_float, default=20.0, help="how long to run (default 20)"
    )
    d.add_argument("--out", default="demo-out", help="folder for received crops (default demo-out)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "subscribe",
        help="consume results: a live table or JSON lines, crops to a folder, loss and "
        "duplicate checks, shared subscriptions, persistent sessions",
    )
    from edge_stn.subscriber import add_broker_arguments

    add_broker_arguments(
        s,
        config_help="take broker, protocol, prefix, credentials and TLS from a daemon config",
        username_help="broker user name",
    )
    s.add_argument("--device", action="append", default=[], help="only this device (repeatable)")
    s.add_argument("--camera", action="append", default=[], help="only this camera (repeatable)")
    s.add_argument(
        "--label", action="append", default=[], help="only results with this label (repeatable)"
    )
    s.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    s.add_argument("--crops", metavar="DIR", help="save crops here: <time>_<label>_<id>_<n>.jpg")
    s.add_argument("--share", metavar="GROUP", help="join an MQTT v5 shared subscription group")
    s.add_argument(
        "--session",
        metavar="NAME",
        help="persistent session (client id NAME): the broker keeps results while away",
    )
    s.add_argument(
        "--session-expiry",
        type=_positive_int,
        default=86_400,
        metavar="S",
        help="seconds the broker keeps the session after a disconnect (default 86400)",
    )
    s.add_argument("--count", type=_positive_int, help="stop after this many unique results")
    s.add_argument("--seconds", type=_positive_float, help="stop after this many seconds")
    s.set_defaults(func=cmd_subscribe)

    cm = sub.add_parser(
        "command",
        help="send a remote command to a gateway (reload, thresholds, snapshot, model) and "
        "print its reply",
    )
    from edge_stn.remote import add_command_arguments

    add_command_arguments(cm)
    cm.set_defaults(func=cmd_command)

    bn = sub.add_parser(
        "bench",
        help="benchmarks: the model vs PyTorch, the daemon vs decode-only, latency, scaling",
    )
    bn.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    bn.add_argument("--json", help="the JSON to write (default OUT/bench.json)")
    bn.add_argument("--markdown", help="the Markdown to write (default OUT/benchmarks.md)")
    bn.add_argument("--plot", help="the PNG to write (default OUT/benchmarks.png)")
    bn.add_argument(
        "--quick", action="store_true", help="every section briefly (well under a minute)"
    )
    bn.add_argument(
        "--sections", help="comma-separated subset of model,pipeline,latency,scaling (default all)"
    )
    bn.add_argument("--repeats", type=_positive_int, help="repeats of every figure (default 3)")
    bn.add_argument(
        "--threads",
        type=_int_list,
        help="thread counts of the model section, each for both runtimes (default 1,CORES)",
    )
    bn.add_argument("--video-frames", type=_positive_int, help="frames per video (default 300)")
    bn.add_argument("--latency-seconds", type=_positive_float, help="latency window (default 60)")
    bn.add_argument("--warmup-seconds", type=_positive_float, help="warm-up (default 5)")
    bn.add_argument(
        "--scaling-seconds", type=_positive_float, help="window per camera count (default 20)"
    )
    bn.add_argument("--cameras", type=_int_list, help="camera counts to scale (default 1,2,4,8)")
    bn.add_argument(
        "--checkpoint",
        help="PyTorch checkpoint of the bundled model (default models/demo-stcnn.pt)",
    )
    bn.set_defaults(func=cmd_bench)

    c = sub.add_parser("config", help="daemon config files")
    csub = c.add_subparsers(
        dest="config_command", metavar="{check}", required=True, parser_class=_Parser
    )
    ck = csub.add_parser(
        "check", help="validate a daemon config: says what is wrong, where, and what looks risky"
    )
    ck.add_argument("file", help="daemon YAML (configs/gateway.yaml, configs/demo.yaml)")
    ck.set_defaults(func=cmd_config_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"edge-stn: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EdgeStnError as exc:
        print(f"edge-stn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edge-stn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
