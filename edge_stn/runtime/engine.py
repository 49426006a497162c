"""The ST-CNN on ONNX Runtime: providers with fallback, threads, warm-up, the metadata contract.

:class:`Engine` loads an exported model (DESIGN §5), refuses it unless it carries the embedded
``edge_stn`` document (and matches its sidecar and the configured sha256), asks ONNX Runtime for
the configured execution providers in order of preference (those this onnxruntime build lacks
are skipped; the CPU is always the last fallback), logs which it got, and runs one batch of
zeros at load so the first real frame does not pay for lazy initialisation (with TensorRT: the
engine build, or its load from the cache).

``infer`` takes windows as the window extractor makes them, uint8 ``(N, C, H, W)``, and scales
them as the metadata says (``x * pixel_scale``, then ``(x - mean) / std``).

Torch-free. ``onnxruntime`` comes from the ``cpu`` or the ``gpu`` extra (never both).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_stn.config import ORT_PROVIDERS, BatchProfileConfig, ModelConfig, TensorRTProvider
from edge_stn.errors import (
    ConfigError,
    DTypeError,
    MissingExtraError,
    ModelError,
    ModelIntegrityError,
    ShapeError,
)
from edge_stn.runtime.metadata import file_sha256, read_model_metadata
from edge_stn.runtime.signing import check_model_trust

if TYPE_CHECKING:
    from edge_stn.windows import WindowSpec

logger = logging.getLogger(__name__)

CPU = ORT_PROVIDERS["cpu"]
CPU_MAX_BATCH = 32
"""Largest batch given to the CPU provider at once (bigger ones are split)."""

ProviderPlan = list[tuple[str, dict[str, str]]]


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError(
            "onnxruntime",
            "cpu",
            "running the model",
            hint="or 'edge-stn[gpu]' on a machine with CUDA; never both",
        ) from None
    return onnxruntime


@dataclass(frozen=True)
class InputScaling:
    """uint8 windows -> the model's float input, as the metadata's ``input`` says:
    ``x * pixel_scale``, then ``(x - mean) / std`` per channel. The one definition, shared by
    the runtime and by whatever feeds a model offline (INT8 calibration and its verification)."""

    scale: np.float32
    mean: npt.NDArray[np.float32]  # (C or 1, 1, 1)
    std: npt.NDArray[np.float32]

    @classmethod
    def from_metadata(cls, inp: dict[str, Any], *, path: Path | None = None) -> InputScaling:
        c = int(inp["channels"])
        mean = np.asarray(inp["mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(inp["std"], dtype=np.float32).reshape(-1, 1, 1)
        for name, v in (("mean", mean), ("std", std)):
            if v.shape[0] not in (1, c):
                raise ModelError(
                    f"input.{name} has {v.shape[0]} values for {c} channels", path=path
                )
        return cls(np.float32(inp["pixel_scale"]), mean, std)

    def __call__(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        x = images.astype(np.float32) * self.scale
        return np.asarray((x - self.mean) / self.std, dtype=np.float32)


def _flag(value: bool) -> str:
    return "True" if value else "False"


def provider_plan(
    model: ModelConfig,
    available: list[str],
    *,
    input_name: str,
    chw: tuple[int, int, int],
    default_profile: BatchProfileConfig | None = None,
) -> ProviderPlan:
    """ONNX Runtime providers with their options, in the config's order of preference.

    Providers missing from ``available`` are skipped with a log line; the CPU provider always
    ends the list. ``chw`` and ``input_name`` give TensorRT its optimization profile shapes.
    """
    plan: ProviderPlan = []
    for pref in model.providers:
        ort_name = ORT_PROVIDERS[pref.name]
        if ort_name not in available:
            logger.info(
                "execution provider %s (%s) is not available in this onnxruntime build "
                "(available: %s): skipped",
                pref.name,
                ort_name,
                ", ".join(available),
            )
            continue
        opts: dict[str, str] = {}
        if pref.name == "tensorrt":
            trt = pref.options
            profile = trt.batch_profile or default_profile or BatchProfileConfig()
            c, h, w = chw
            opts = {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(trt.engine_cache_dir),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(trt.engine_cache_dir),
                "trt_fp16_enable": _flag(trt.fp16),
                "trt_profile_min_shapes": f"{input_name}:{profile.min}x{c}x{h}x{w}",
                "trt_profile_opt_shapes": f"{input_name}:{profile.opt}x{c}x{h}x{w}",
                "trt_profile_max_shapes": f"{input_name}:{profile.max}x{c}x{h}x{w}",
            }
        elif pref.name == "cuda":
            opts = {"device_id": str(pref.options.device_id)}
        plan.append((ort_name, opts))
    if all(name != CPU for name, _ in plan):
        logger.info("execution provider cpu added as the last fallback")
        plan.append((CPU, {}))
    return plan


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which a container may limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_intra_op_threads() -> int:
    """ONNX Runtime's CPU threads when the config says 0: half the cores, at least one. The
    model is not the only work: video decoding (FFmpeg's own threads), proposals, crops and
    MQTT need the other half, and a model that takes every core stalls them (measured in
    docs/benchmarks.md: on two cores one thread gives the daemon more frames per second)."""
    return max(1, usable_cores() // 2)


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Row-wise softmax of ``(N, K)`` logits, numerically stable."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _profile_from_metadata(doc: dict[str, Any]) -> BatchProfileConfig | None:
    raw = (doc.get("tensorrt") or {}).get("batch_profile")
    if not isinstance(raw, dict):
        return None
    try:
        return BatchProfileConfig.model_validate(raw)
    except ValueError:
        logger.warning("ignoring the model's batch_profile %s: not min <= opt <= max", raw)
        return None


def verify_model_file(model: ModelConfig) -> tuple[str, str]:
    """The checks that refuse a model file before anything parses it: the file exists, its
    sha256 is the one pinned in ``model.sha256``, and ``model.trust`` accepts it (signature or
    allow-list). Returns the sha256 and how the file was trusted; raises
    :class:`ModelIntegrityError` (:class:`ConfigError` for an unreadable public key file)."""
    path = Path(model.model_path)
    if not path.is_file():
        what = (
            "the bundled demo model is not installed (reinstall edge-stn, or set model.path)"
            if model.is_bundled
            else "no such model file"
        )
        raise ModelIntegrityError(what, path=path)
    sha256 = file_sha256(path)
    expected = model.sha256
    if expected is not None and expected.lower() != sha256:
        raise ModelIntegrityError(
            f"sha256 {sha256[:12]}... differs from model.sha256 {expected[:12]}... in "
            "the config: the file was replaced; deploy the expected model or update the config",
            path=path,
        )
    # Authenticity before anything parses the file (signature or allow-list, issue 7).
    return sha256, check_model_trust(path, sha256, model.trust)


class Engine:
    """An exported ST-CNN on ONNX Runtime (see the module docstring).

    Raises :class:`ModelError` for a missing, corrupt or foreign model (no embedded document,
    sha256 different from the sidecar or from ``model.sha256``, no ``logits``/``theta``
    outputs), :class:`MissingExtraError` when onnxruntime is not installed, and
    :class:`ConfigError` when the TensorRT cache folder cannot be made.
    """

    def __init__(self, model: ModelConfig | None = None, *, warmup: bool = True) -> None:
        self.config = model if model is not None else ModelConfig()
        self.path = Path(self.config.model_path)
        ort = import_onnxruntime()
        self.sha256, self.trust = verify_model_file(self.config)
        self.metadata: dict[str, Any] = read_model_metadata(self.path)
        doc = self.metadata
        inp = doc["input"]
        self.input_name: str = inp["name"]
        self.channels: int = int(inp["channels"])
        self.input_size: tuple[int, int] = (int(inp["height"]), int(inp["width"]))
        self.labels: list[str] = list(doc["labels"])
        self.background_label: str | None = doc["background_label"]
        stn = doc["stn"]
        if stn is None:
            raise ModelError(
                "not an ST-CNN (its metadata has no 'stn'): the daemon needs the STN's pose for "
                "canonical crops; export an ST-CNN checkpoint",
                path=self.path,
            )
        self.stn_output_size: tuple[int, int] = (
            int(stn["output_height"]),
            int(stn["output_width"]),
        )
        c = self.channels
        self._scaling = InputScaling.from_metadata(inp, path=self.path)

        self.batch_profile = _profile_from_metadata(doc)
        available = list(ort.get_available_providers())
        plan = provider_plan(
            self.config,
            available,
            input_name=self.input_name,
            chw=(c, *self.input_size),
            default_profile=self.batch_profile,
        )
        for name, opts in plan:
            if name == ORT_PROVIDERS["tensorrt"]:
                self._make_cache_dir(Path(opts["trt_engine_cache_path"]))
        self.intra_op_threads: int = self.config.intra_op_threads or default_intra_op_threads()
        self.session = self._open_session(ort, plan)
        self.providers: list[str] = list(self.session.get_providers())
        wanted = " > ".join(p.name for p in self.config.providers)
        got = ", ".join(self.providers)
        logger.info(
            "model %s (sha256 %s..., trust: %s) runs on %s (preference: %s; %d CPU thread%s)",
            self.path,
            self.sha256[:12],
            self.trust,
            got,
            wanted,
            self.intra_op_threads,
            "" if self.intra_op_threads == 1 else "s",
        )
        first = ORT_PROVIDERS[self.config.providers[0].name]
        if self.providers[:1] != [first]:
            # An explicit preference that could not be met deserves attention; the default
            # list (tensorrt > cuda > cpu) on a CPU-only box does not.
            level = logging.WARNING if "providers" in self.config.model_fields_set else logging.INFO
            logger.log(
                level,
                "preferred execution provider %s is not in use; running on %s",
                self.config.providers[0].name,
                got,
            )
        # With TensorRT the engine is built for the profile: bigger batches are split. On the
        # CPU a crop costs the same above a few per batch, while ONNX Runtime's memory arena
        # grows with the largest batch it has seen: split there too, so memory stays bounded
        # however many cameras feed one batch.
        self.max_batch: int | None = None
        if self.providers and self.providers[0] == ORT_PROVIDERS["tensorrt"]:
            trt = self.config.provider("tensorrt")
            configured = trt.options.batch_profile if isinstance(trt, TensorRTProvider) else None
            self.max_batch = (configured or self.batch_profile or BatchProfileConfig()).max
        elif self.providers[:1] == [CPU]:
            self.max_batch = CPU_MAX_BATCH
        self._check_io()
        self.warmup_s: float | None = None
        if warmup:
            t0 = time.perf_counter()
            try:
                self.infer(np.zeros((1, c, *self.input_size), dtype=np.uint8))
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise ModelError(f"warm-up failed: {_first_line(exc)}", path=self.path) from None
            self.warmup_s = time.perf_counter() - t0
            logger.info("warm-up took %.3f s", self.warmup_s)

    # ------------------------------------------------------------ loading

    def _make_cache_dir(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the TensorRT engine cache {folder}: {exc.strerror or exc}",
                key="model.providers.tensorrt.options.engine_cache_dir",
            ) from None

    def _open_session(self, ort: Any, plan: ProviderPlan) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1  # sequential execution: the inter-op pool would idle
        # Idle intra-op workers must sleep, not spin: on a gateway the cores they would burn
        # decode video and run the pipeline's other threads.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: ORT's warnings about node placement are noise

        def session(plan: ProviderPlan) -> Any:
            return ort.InferenceSession(
                str(self.path),
                sess_options=opts,
                providers=[name for name, _ in plan],
                provider_options=[o for _, o in plan],
            )

        try:
            return session(plan)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            first_error = _first_line(exc)
        # A GPU provider that is listed but cannot start (driver, CUDA or TensorRT libraries
        # missing) must not keep the gateway down: the CPU still runs the model.
        if any(name != CPU for name, _ in plan):
            logger.warning(
                "ONNX Runtime could not start %s (%s); retrying on the CPU",
                ", ".join(name for name, _ in plan if name != CPU),
                first_error,
            )
            try:
                return session([(CPU, {})])
            except Exception as exc:
                first_error = _first_line(exc)
        raise ModelError(f"ONNX Runtime cannot load it: {first_error}", path=self.path)

    def _check_io(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != self.input_name:
            raise ModelError(
                f"expected one input {self.input_name!r} (from its metadata), "
                f"got {[i.name for i in inputs]}",
                path=self.path,
            )
        shape = list(inputs[0].shape)
        want = [self.channels, *self.input_size]
        if len(shape) != 4 or shape[1:] != want:
            raise ModelError(
                f"input {self.input_name!r} has shape {shape}, but its metadata says "
                f"[batch, {', '.join(map(str, want))}]",
                path=self.path,
            )
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in ("logits", "theta") if n not in outputs]
        if missing:
            raise ModelError(
                f"the model lacks the outputs {missing} (has {outputs})", path=self.path
            )

    # ------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.path.stem)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def background_id(self) -> int | None:
        """Class index of the background ('no object') label, or None."""
        bg = self.background_label
        return self.labels.index(bg) if bg is not None else None

    @property
    def window_spec(self) -> WindowSpec | None:
        """How the daemon must cut windows for this model (metadata ``window``), or None for a
        model trained on whole images rather than detection windows."""
        from edge_stn.windows import WindowSpec

        w = self.metadata.get("window")
        if not w:
            return None
        h, wd = self.input_size
        size = int(w.get("size", h))
        if size != h or size != wd:
            raise ModelError(
                f"metadata window size {size} differs from the input size {h}x{wd}",
                path=self.path,
            )
        return WindowSpec(
            size=size,
            context_margin=float(w["context_margin"]),
            min_side=float(w.get("min_side", WindowSpec.min_side)),
        )

    # ------------------------------------------------------------ inference

    def preprocess(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.floating[Any]]:
        """uint8 ``(N, C, H, W)`` -> the model's float input, scaled as the metadata says."""
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
        want = (self.channels, *self.input_size)
        expected = f"(N, {want[0]}, {want[1]}, {want[2]})"
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ShapeError("images", images.shape, expected)
        if images.dtype != np.uint8:
            raise DTypeError("images", images.dtype, "uint8")
        return self._scaling(images).astype(self._input_dtype, copy=False)

    def infer(
        self, images: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Run the model on uint8 windows ``(N, C, H, W)``.

        Returns ``logits`` ``(N, K)`` (apply :func:`softmax` for probabilities) and ``theta``
        ``(N, 2, 3)`` (canonical grid -> window, normalized; :mod:`edge_stn.geometry`).
        """
        x = self.preprocess(images)
        n = x.shape[0]
        if n == 0:
            return (
                np.zeros((0, self.num_classes), dtype=np.float32),
                np.zeros((0, 2, 3), dtype=np.float32),
            )
        step = self.max_batch or n
        logits, thetas = [], []
        for i in range(0, n, step):
            lo, th = self.session.run(["logits", "theta"], {self.input_name: x[i : i + step]})
            logits.append(np.asarray(lo, dtype=np.float32))
            thetas.append(np.asarray(th, dtype=np.float32))
        lg = logits[0] if len(logits) == 1 else np.concatenate(logits)
        tt = thetas[0] if len(thetas) == 1 else np.concatenate(thetas)
        return lg, tt.reshape(n, 2, 3)
