"""The gateway daemon's config: YAML, validated by pydantic, strict (``extra="forbid"``).

Every field has a default and a description, so a config with only ``device_id``, one camera
(``id``, ``source``) and ``mqtt`` host and port is complete. Torch-free and cheap to import: the
daemon and ``edge-stn config check`` validate a file before anything heavy loads.

Loading, in order (:func:`load_config`):

1. the YAML file is read as a mapping (:func:`edge_stn.training_config.load_yaml_mapping`);
2. ``${VAR}`` and ``${VAR:-default}`` in string *values* are replaced from the environment
   (``$${`` writes a literal ``${``); an unset variable without a default is an error naming the
   key path: secrets (the MQTT password) never need to be written in the file;
3. pydantic validates; relative paths (model, TLS files, TensorRT cache, video files) are
   resolved against the config file's folder, so a config works whatever the working directory.

Every error is a :class:`~edge_stn.errors.ConfigError` reading ``<file>: <key.path>: <problem>``.
:func:`check_config` returns the warnings (things that validate but are likely wrong or weaker
than the operator may think), and :func:`config_hash` fingerprints the validated config, secrets
redacted, for the daemon's ``status`` message.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import socket
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge_stn.errors import ConfigError
from edge_stn.training_config import load_yaml_mapping

# ---------------------------------------------------------------- ids (DESIGN §6)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_IDS = frozenset({"status", "stats", "cam", "cmd"})

BUNDLED_DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo-stcnn.onnx"
"""The bundled demo model (fp32), used when ``model.path`` is omitted and a GPU provider can run
it (it ships in the wheel)."""
BUNDLED_DEMO_MODEL_INT8 = BUNDLED_DEMO_MODEL.with_name("demo-stcnn-int8.onnx")
"""Its INT8 build (``edge-stn quantize``), used instead when ONNX Runtime runs on the CPU."""


def check_id(value: str) -> str:
    """A device or camera id: ``^[A-Za-z0-9_-]{1,64}$`` and not a topic word of the tree."""
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid id: use 1-64 characters among A-Z a-z 0-9 _ - "
            "(it becomes an MQTT topic level)"
        )
    if value in RESERVED_IDS:
        raise ValueError(
            f"{value!r} is reserved (ids may not be {', '.join(sorted(RESERVED_IDS))})"
        )
    return value


Id = Annotated[str, AfterValidator(check_id)]


def _default_device_id() -> str:
    """The host name, reduced to the id alphabet (a config normally names its device)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64].strip("-")
    return name if name and name not in RESERVED_IDS else "edge-stn"


# ---------------------------------------------------------------- paths


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """``~`` expanded; relative paths taken from the config file's folder when loading a file."""
    value = value.expanduser()
    base = (info.context or {}).get("base_dir") if isinstance(info.context, dict) else None
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- model


class BatchProfileConfig(Section):
    min: int = Field(1, ge=1, description="smallest batch the TensorRT engine accepts")
    opt: int = Field(8, ge=1, description="batch size TensorRT tunes the engine for")
    max: int = Field(32, ge=1, description="largest batch; bigger batches are split")

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfileConfig:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class TensorRTOptions(Section):
    engine_cache_dir: ConfigPath = Field(
        Path("~/.cache/edge-stn/tensorrt"),
        validate_default=True,
        description="folder for built TensorRT engines: the first start on a machine builds "
        "them (minutes), later starts load them from here",
    )
    fp16: bool = Field(
        False,
        description="let TensorRT choose FP16 kernels (faster on Jetson; ONNX Runtime cannot "
        "pin the STN's grid to FP32, so check accuracy, or export with --fp16 instead)",
    )
    batch_profile: BatchProfileConfig | None = Field(
        None,
        description="TensorRT optimization profile for the batch dimension; "
        "default: the profile recorded in the model at export (1, 8, 32)",
    )


class CudaOptions(Section):
    device_id: int = Field(0, ge=0, description="CUDA device index")


class CpuOptions(Section):
    pass


class TensorRTProvider(Section):
    name: Literal["tensorrt"] = Field("tensorrt", description="TensorrtExecutionProvider")
    options: TensorRTOptions = Field(default_factory=TensorRTOptions, description="its options")


class CudaProvider(Section):
    name: Literal["cuda"] = Field("cuda", description="CUDAExecutionProvider")
    options: CudaOptions = Field(default_factory=CudaOptions, description="its options")


class CpuProvider(Section):
    name: Literal["cpu"] = Field("cpu", description="CPUExecutionProvider")
    options: CpuOptions = Field(default_factory=CpuOptions, description="none yet")


ProviderName = Literal["tensorrt", "cuda", "cpu"]
PROVIDER_NAMES: tuple[ProviderName, ...] = ("tensorrt", "cuda", "cpu")
ORT_PROVIDERS: dict[ProviderName, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def _ort_providers() -> list[str]:
    """The execution providers of the installed onnxruntime (none when it is missing)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def bundled_demo_model(
    providers: Sequence[ProviderName], available: Sequence[str] | None = None
) -> Path:
    """The bundled demo model for these configured providers: its INT8 build when ONNX Runtime
    will run on the CPU (no configured GPU provider is in this onnxruntime build, ``available``,
    by default asked from onnxruntime), the fp32 model when a GPU provider is there (TensorRT
    builds its own precisions from it; CUDA would only dequantize an INT8 one)."""
    have = _ort_providers() if available is None else available
    gpu = any(ORT_PROVIDERS[p] in have for p in providers if p != "cpu")
    return BUNDLED_DEMO_MODEL if gpu else BUNDLED_DEMO_MODEL_INT8


def _provider_shorthand(value: Any) -> Any:
    """``- cuda`` means ``- name: cuda``."""
    return {"name": value} if isinstance(value, str) else value


def _provider_tag(value: Any) -> str | None:
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return name if name in PROVIDER_NAMES else None


Provider = Annotated[
    Annotated[TensorRTProvider, Tag("tensorrt")]
    | Annotated[CudaProvider, Tag("cuda")]
    | Annotated[CpuProvider, Tag("cpu")],
    Discriminator(
        _provider_tag,
        custom_error_type="provider",
        custom_error_message="expected a provider name: tensorrt, cuda or cpu",
    ),
    BeforeValidator(_provider_shorthand),
]


def _default_providers() -> list[TensorRTProvider | CudaProvider | CpuProvider]:
    return [TensorRTProvider(), CudaProvider(), CpuProvider()]


# ---------------------------------------------------------------- model trust (issue 7)

_B64_KEY = re.compile(r"^[A-Za-z0-9+/]{43}=$")


def _public_key(value: str) -> str:
    """An Ed25519 public key: 44 characters of base64 (32 bytes), as ``edge-stn sign-model
    --new-key`` prints it, or a PEM ``PUBLIC KEY`` block."""
    text = value.strip()
    if text.startswith("-----BEGIN PUBLIC KEY-----") or _B64_KEY.fullmatch(text):
        return text
    raise ValueError(
        "expected an Ed25519 public key: 44 characters of base64 (as `edge-stn sign-model "
        "--new-key` prints it) or a PEM PUBLIC KEY block"
    )


TrustMode = Literal["none", "signature", "allowlist", "either"]


class ModelTrustConfig(Section):
    """Which model files the daemon agrees to run (checked before ONNX Runtime parses them)."""

    require: TrustMode = Field(
        "none",
        description="'signature': the model needs a valid Ed25519 signature <model>.sig by one "
        "of the public keys; 'allowlist': its sha256 must be in allowed_sha256; 'either': one "
        "of the two; 'none': any file (the sha256 pin and the sidecar still apply)",
    )
    public_keys: list[Annotated[str, AfterValidator(_public_key)]] = Field(
        default_factory=list,
        description="Ed25519 public keys (base64 of the 32 raw bytes, or PEM) whose signatures "
        "are accepted; several for key rotation",
    )
    public_key_files: list[ConfigPath] = Field(
        default_factory=list,
        description="files holding one Ed25519 public key each (PEM or one base64 line)",
    )
    allowed_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]] = Field(
        default_factory=list, description="sha256 of model files accepted without a signature"
    )

    @model_validator(mode="after")
    def _usable(self) -> ModelTrustConfig:
        keys = bool(self.public_keys or self.public_key_files)
        if self.require == "signature" and not keys:
            raise ValueError("require 'signature' needs public_keys or public_key_files")
        if self.require == "allowlist" and not self.allowed_sha256:
            raise ValueError("require 'allowlist' needs allowed_sha256")
        if self.require == "either" and not (keys or self.allowed_sha256):
            raise ValueError("require 'either' needs public keys or allowed_sha256")
        return self


class ModelConfig(Section):
    path: ConfigPath | None = Field(
        None,
        description="the exported .onnx (keep its sidecar .json beside it); "
        "default: the bundled demo model, its INT8 build when ONNX Runtime runs on the CPU "
        "(none of the configured GPU providers is in this onnxruntime build), fp32 otherwise",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="expected sha256 of the model file; the daemon refuses any other file",
    )
    providers: list[Provider] = Field(
        default_factory=_default_providers,
        min_length=1,
        description="ONNX Runtime execution providers in order of preference; those this "
        "onnxruntime build lacks are skipped, and the CPU is always the last fallback",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads on the CPU (0: half the cores, at least "
        "one; the other half decode video and run the pipeline)",
    )
    trust: ModelTrustConfig = Field(
        default_factory=ModelTrustConfig,
        description="signature or sha256 allow-list a model file needs before it is loaded",
    )
    fallback_dir: ConfigPath | None = Field(
        None,
        description="folder where the daemon keeps a copy of the last model that loaded and "
        "warmed up; if a new model fails to load or warm up, that one runs instead "
        "(absent: no fallback)",
    )

    @field_validator("providers")
    @classmethod
    def _unique_providers(cls, value: list[Any]) -> list[Any]:
        names = [p.name for p in value]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"provider {dups[0]!r} is listed twice")
        return value

    @property
    def model_path(self) -> Path:
        """The model file to load: ``path`` or the bundled demo model for the configured
        providers (:func:`bundled_demo_model`; the file may be absent)."""
        if self.path is not None:
            return self.path
        return bundled_demo_model([p.name for p in self.providers])

    @property
    def bundled_build(self) -> str | None:
        """``"int8, CPU"`` or ``"fp32, GPU provider"`` for the bundled demo model, else None."""
        if self.path is not None:
            return None
        if self.model_path == BUNDLED_DEMO_MODEL_INT8:
            return "int8, CPU"
        return "fp32, GPU provider"

    @property
    def is_bundled(self) -> bool:
        return self.path is None

    def provider(self, name: ProviderName) -> TensorRTProvider | CudaProvider | CpuProvider | None:
        return next((p for p in self.providers if p.name == name), None)


# ---------------------------------------------------------------- cameras


class Box(Section):
    """A rectangle in frame pixels (edge coordinates: pixel ``i`` spans ``[i, i+1)``)."""

    x0: int = Field(0, ge=0, description="left edge")
    y0: int = Field(0, ge=0, description="top edge")
    x1: int = Field(1, ge=1, description="right edge (exclusive)")
    y1: int = Field(1, ge=1, description="bottom edge (exclusive)")

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) != 4:
                raise ValueError(f"expected [x0, y0, x1, y1], got {len(value)} numbers")
            return dict(zip(("x0", "y0", "x1", "y1"), value, strict=True))
        return value

    @model_validator(mode="after")
    def _positive_size(self) -> Box:
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(
                f"empty box [{self.x0}, {self.y0}, {self.x1}, {self.y1}]: need x1 > x0 and y1 > y0"
            )
        return self

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


class ProposalConfig(Section):
    method: Literal["components", "contours", "rois", "full_frame"] = Field(
        "components",
        description="how object candidates are found: connected components or contours of the "
        "thresholded reduced copy, fixed 'rois', or the whole frame as one window",
    )
    reduce_to: int = Field(
        320,
        ge=32,
        le=4096,
        description="width (pixels) of the reduced grayscale copy proposals are searched on",
    )
    threshold: int | Literal["local", "otsu"] = Field(
        "local",
        description="'local': ink is what stands above the local background (a morphological "
        "opening of the reduced copy) by more than the noise allows, so faint and strong objects "
        "are found in one frame; 'otsu': one level per frame (Otsu); or a fixed level 0-255",
    )
    background_kernel: int = Field(
        21,
        ge=3,
        le=255,
        description="'local' threshold: side (reduced-copy pixels) of the opening that estimates "
        "the background; wider than the widest stroke of the largest object",
    )
    min_contrast: float = Field(
        16.0,
        ge=1.0,
        le=255.0,
        description="'local' threshold: smallest ink level above the local background, grey levels",
    )
    min_area: int = Field(64, ge=1, description="smallest candidate box area, in full-frame pixels")
    max_area: int | None = Field(
        None, ge=1, description="largest candidate box area, in full-frame pixels (none: no limit)"
    )
    rois: list[Box] = Field(
        default_factory=list,
        description="fixed boxes [x0, y0, x1, y1] in frame pixels, for method 'rois'",
    )

    @field_validator("threshold", mode="before")
    @classmethod
    def _otsu_or_level(cls, value: Any) -> Any:
        if (
            isinstance(value, str)
            and value not in ("local", "otsu")
            and not value.strip().isdigit()
        ):
            raise ValueError(f"threshold must be 0-255, 'local' or 'otsu', got {value!r}")
        return value

    @field_validator("threshold")
    @classmethod
    def _level(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 255:
            raise ValueError(f"threshold must be 0-255, 'local' or 'otsu', got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ProposalConfig:
        if self.max_area is not None and self.max_area < self.min_area:
            raise ValueError(f"max_area {self.max_area} is below min_area {self.min_area}")
        if self.method == "rois" and not self.rois:
            raise ValueError("method 'rois' needs at least one box in 'rois'")
        return self


class SyntheticConfig(Section):
    """The synthetic camera's scene (source ``synthetic`` only)."""

    width: int = Field(640, ge=16, le=7680, description="frame width, pixels")
    height: int = Field(480, ge=16, le=4320, description="frame height, pixels")
    objects: int | None = Field(
        None, ge=0, le=64, description="moving digits per frame (default: 1-4, new each segment)"
    )
    seed: int = Field(0, ge=0, description="scene seed: the same seed shows the same scene")


SourceKind = Literal["file", "usb", "rtsp", "http", "synthetic"]
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEMES: dict[str, SourceKind] = {"rtsp": "rtsp", "rtsps": "rtsp", "http": "http", "https": "http"}


SECRET_MASK = "**********"


def redact_url(source: str | int) -> str | int:
    """A source with the password of its ``user:password@`` part masked."""
    if isinstance(source, int) or not _URL.match(source):
        return source
    parts = urlsplit(source)
    if parts.password is None:
        return source
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{SECRET_MASK}@{host}"))


def source_kind(source: str | int) -> SourceKind:
    """What a camera ``source`` names: a USB index, an RTSP or HTTP URL, 'synthetic', a file."""
    if isinstance(source, int):
        return "usb"
    if source == "synthetic":
        return "synthetic"
    m = _URL.match(source)
    if m:
        return _SCHEMES[m.group(1).lower()]
    return "file"


class CameraConfig(Section):
    id: Id = Field("cam0", description="camera id, a level of its MQTT topics")
    source: str | int = Field(
        "synthetic",
        description="a video file path, a USB camera index (0, 1, ...), an rtsp:// or http(s):// "
        "URL, or 'synthetic' (moving digits with ground truth)",
    )
    fps: float | None = Field(
        None,
        gt=0,
        description="frames per second to process; absent: as fast as possible for files, "
        "the native rate for live sources",
    )
    on_end: Literal["stop", "loop"] = Field(
        "stop", description="files only: at the end, stop this camera or start over"
    )
    open_timeout_s: float = Field(
        10.0, gt=0, description="give up opening the source after this long (then retry)"
    )
    read_timeout_s: float = Field(
        5.0, gt=0, description="a read that takes longer counts as a stall (then reconnect)"
    )
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="RTSP only: tcp (robust, default) or udp (lower latency, may lose data)"
    )
    proposals: ProposalConfig = Field(
        default_factory=ProposalConfig, description="how object candidates are found"
    )
    roi: Box | None = Field(
        None,
        description="region of interest [x0, y0, x1, y1] in frame pixels; candidates outside "
        "it are ignored (absent: the whole frame)",
    )
    synthetic: SyntheticConfig | None = Field(
        None,
        description="source 'synthetic' only: frame size, digits per frame and seed "
        "(absent: 640x480, 1-4 digits per segment, seed 0)",
    )

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(
                f"expected a file path, a USB index, a URL or 'synthetic', got {value!r}"
            )
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError("empty source")
            if value.isdigit():  # "${CAMERA_INDEX}" arrives as a string
                return int(value)
        return value

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str | int, info: ValidationInfo) -> str | int:
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"a USB camera index is >= 0, got {value}")
            return value
        m = _URL.match(value)
        if m:
            if m.group(1).lower() not in _SCHEMES:
                raise ValueError(
                    f"unsupported URL scheme {m.group(1)!r}: use rtsp, rtsps, http or https"
                )
            return value
        if value == "synthetic":
            return value
        return str(_resolve_path(Path(value), info))

    def __repr_args__(self) -> Any:
        # A camera URL may carry a password (rtsp://user:${CAM_PASSWORD}@...): never show it.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "source" else value

    @model_validator(mode="after")
    def _synthetic_only(self) -> CameraConfig:
        if self.synthetic is not None and self.kind != "synthetic":
            raise ValueError("'synthetic' settings need source 'synthetic'")
        return self

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.source)

    @property
    def is_live(self) -> bool:
        """Live sources keep only their newest frame; files deliver every frame."""
        return self.kind != "file"


# ---------------------------------------------------------------- detection, crops


class DetectionConfig(Section):
    score_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="smallest class probability that counts as a detection"
    )
    nms_iou: float = Field(
        0.45,
        gt=0.0,
        le=1.0,
        description="non-maximum suppression: of two boxes overlapping more (IoU), keep the "
        "better-scoring one",
    )
    max_per_frame: int = Field(
        32, ge=1, le=1024, description="at most this many detections per frame (best first)"
    )
    prepare_threads: int | None = Field(
        None,
        ge=1,
        le=16,
        description="lanes that find proposals and cut windows: the detector thread and "
        "helpers that cut the next frames while the model runs (OpenCV and ONNX Runtime release "
        "the GIL, so they overlap); absent: 2 where the machine has 2 cores or more, else 1",
    )


class CropConfig(Section):
    enabled: bool = Field(True, description="publish a canonical JPEG crop per detection")
    size: int = Field(64, ge=8, le=1024, description="side of the square canonical crop, pixels")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality, 1-100")
    max_payload_bytes: int = Field(
        65536,
        ge=1024,
        description="crops whose JPEG is larger are not published (crop_status 'policy')",
    )
    policy: Literal["every", "best_per_track"] = Field(
        "every",
        description="'every': a crop per detection per frame; 'best_per_track': one crop per "
        "confirmed track, its best frame (highest score), announced on cam/<camera>/track when "
        "the track ends or after hold_s (needs tracking.enabled)",
    )
    hold_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="best_per_track: a track still open after this long gets its crop now",
    )
    max_open_tracks: int = Field(
        256,
        ge=1,
        le=100_000,
        description="best_per_track: tracks holding a crop (about one JPEG each); beyond it "
        "the oldest is sent at once",
    )


class TrackingConfig(Section):
    enabled: bool = Field(True, description="give each detection the track id of its object")
    iou: float = Field(
        0.3, gt=0, le=1, description="smallest IoU of a predicted track box and a detection"
    )
    max_age: int = Field(
        15, ge=0, le=10_000, description="processed frames a track survives without a detection"
    )
    max_age_s: float = Field(
        2.0, gt=0, le=3600, description="seconds a track survives without a detection"
    )
    min_hits: int = Field(
        3, ge=1, le=1000, description="detections before a track is confirmed (announced)"
    )


# ---------------------------------------------------------------- MQTT

_PROTOCOLS = {"5": "v5", "v5": "v5", "5.0": "v5", "3.1.1": "v311", "311": "v311", "v311": "v311"}


def _protocol(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in _PROTOCOLS:
            raise ValueError(
                f"unknown MQTT version {value!r}: use 'v5' (or 5) or 'v311' (or '3.1.1')"
            )
        return _PROTOCOLS[key]
    return value


def _topic_prefix(value: str) -> str:
    if not value:
        raise ValueError("empty topic prefix")
    bad = sorted(set(value) & {"+", "#", "\0"})
    if bad:
        raise ValueError(f"topic prefix {value!r} contains {bad[0]!r} (an MQTT wildcard)")
    if value.startswith("$"):
        raise ValueError(f"topic prefix {value!r} starts with '$' (reserved by brokers)")
    if any(level == "" for level in value.split("/")):
        raise ValueError(f"topic prefix {value!r} has an empty level (leading, trailing or '//')")
    return value


class TlsConfig(Section):
    ca_file: ConfigPath | None = Field(
        None,
        description="CA certificate(s) (PEM) that signed the broker's certificate; "
        "absent: the system's CA store",
    )
    cert_file: ConfigPath | None = Field(
        None, description="client certificate (PEM), for brokers that require one"
    )
    key_file: ConfigPath | None = Field(None, description="the client certificate's private key")
    insecure: bool = Field(
        False,
        description="skip the check of the broker's host name against its certificate "
        "(testing only: anyone in the path can impersonate the broker)",
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        return self


class MqttConfig(Section):
    host: str = Field("localhost", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (1883 plain, 8883 TLS)")
    protocol: Annotated[Literal["v5", "v311"], BeforeValidator(_protocol)] = Field(
        "v5",
        description="MQTT version: 'v5' (also 5) or 'v311' (also '3.1.1'); with 3.1.1 the broker "
        "cannot report a refused publish and crops carry no user properties",
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="MQTT client id; default: edge-stn-<device_id>",
    )
    topic_prefix: Annotated[str, AfterValidator(_topic_prefix)] = Field(
        "edge-stn", description="first level(s) of every topic: <prefix>/<device>/..."
    )
    keepalive: int = Field(
        30,
        ge=5,
        le=65535,
        description="seconds between pings when idle; the broker declares "
        "the daemon gone (and publishes 'offline') after 1.5 times this",
    )
    username: str | None = Field(None, description="broker user name")
    password: SecretStr | None = Field(
        None, description="broker password: write ${VARIABLE} and set it in the environment"
    )
    tls: TlsConfig | None = Field(None, description="TLS to the broker (absent: plain TCP)")
    max_payload_bytes: int = Field(
        131072,
        ge=1024,
        le=268435455,
        description="largest payload sent; a bigger result or crop is dead-lettered (code 0x95) "
        "instead of queued, as is one over the broker's Maximum Packet Size (MQTT v5)",
    )

    @model_validator(mode="after")
    def _password_needs_user(self) -> MqttConfig:
        if self.password is not None and self.username is None and self.protocol == "v311":
            raise ValueError("MQTT 3.1.1 sends a password only with a username: set username")
        return self

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.port}"


# ---------------------------------------------------------------- the outbox

_BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2}
_BYTE_UNITS.update({"mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3})
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def _byte_size(value: Any) -> Any:
    """``268435456``, ``"256MiB"``, ``"1 GB"`` -> bytes."""
    if isinstance(value, str):
        m = _BYTES.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _BYTE_UNITS:
            raise ValueError(f"expected a size such as 268435456, '256MiB' or '1GB', got {value!r}")
        return int(float(m.group(1)) * _BYTE_UNITS[unit])
    return value


def default_state_dir() -> Path:
    """Where the daemon keeps its state (the outbox): ``$EDGE_STN_STATE_DIR``, else systemd's
    ``$STATE_DIRECTORY`` (``StateDirectory=``), else ``$XDG_STATE_HOME/edge-stn``
    (``~/.local/state/edge-stn``)."""
    for var in ("EDGE_STN_STATE_DIR", "STATE_DIRECTORY"):
        value = os.environ.get(var)
        if value:
            return Path(value.split(":")[0]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "edge-stn"


class OutboxConfig(Section):
    enabled: bool = Field(
        True,
        description="keep results on disk until the broker acknowledges them; false: in memory "
        "only, within max_bytes of RAM (a restart or crash loses what the broker has not "
        "acknowledged)",
    )
    path: ConfigPath | None = Field(
        None,
        description="the SQLite file (with -wal and -shm beside it); default: "
        "<state dir>/outbox-<device_id>.sqlite, the state dir being $EDGE_STN_STATE_DIR, "
        "systemd's $STATE_DIRECTORY or ~/.local/state/edge-stn. One daemon per file",
    )
    max_bytes: Annotated[int, BeforeValidator(_byte_size)] = Field(
        256 * 1024**2,
        ge=512 * 1024,
        description="disk budget of the database and its -wal, e.g. 268435456 or '256MiB'; "
        "when full, crops are shed first, then the oldest results (counted in stats)",
    )
    max_age_s: float | None = Field(
        86400.0,
        gt=0,
        description="results and crops waiting longer are shed (counted); null: no age limit",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="'full': every batch of results is on disk (fsync) before it is sent; "
        "'normal': faster, but a power cut may lose the last commits (not a crash)",
    )
    max_disconnects: int = Field(
        5,
        ge=1,
        le=1000,
        description="a message in flight each time the connection drops, this many times in a "
        "row, is dead-lettered instead of resent forever",
    )

    def resolved_path(self, device_id: str) -> Path | None:
        """The outbox file of a device, or None when the outbox is kept in memory."""
        if not self.enabled:
            return None
        if self.path is not None:
            return self.path
        return default_state_dir() / f"outbox-{device_id}.sqlite"


class HardExamplesConfig(Section):
    dir: ConfigPath = Field(
        Path("hard-examples"),
        validate_default=True,
        description="(relative: to the config file) image folder (<dir>/<label>/<id>.png, as `edge-stn train` reads) for the "
        "windows of low-confidence detections; crops beside them in <dir>/.crops",
    )
    score_below: float = Field(
        0.8, gt=0, le=1, description="a detection scoring below this is a hard example"
    )
    max_bytes: Annotated[int, BeforeValidator(_byte_size)] = Field(
        100 * 1024**2,
        ge=64 * 1024,
        description="stop saving when the folder holds this much (counted, logged once)",
    )
    max_files: int | None = Field(
        None, ge=1, description="stop saving after this many examples (null: no count limit)"
    )
    labels: list[str] | None = Field(
        None, description="only detections with these labels (null: every label)"
    )


# ---------------------------------------------------------------- operations (issue 7)


class MetricsConfig(Section):
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="address the HTTP endpoint listens on (0.0.0.0: every interface, for a "
        "Prometheus elsewhere or a container)",
    )
    port: int = Field(
        9108, ge=0, le=65535, description="port of /metrics and /healthz (0: any free port)"
    )


class HealthConfig(Section):
    camera_stale_s: float = Field(
        10.0,
        gt=0,
        description="unhealthy when a running camera has produced no frame for this long (N)",
    )
    broker_grace_s: float = Field(
        60.0,
        gt=0,
        description="unhealthy when the broker has been unreachable for this long (M)",
    )
    outbox_max_percent: float = Field(
        90.0,
        gt=0,
        le=100,
        description="unhealthy when the outbox (messages awaiting the broker) is fuller (X)",
    )
    min_free_mb: float = Field(
        100.0,
        ge=0,
        description="report a disk as full when less than this is free where the daemon writes",
    )


CommandName = Literal["reload", "thresholds", "snapshot", "model"]
COMMAND_NAMES: tuple[CommandName, ...] = ("reload", "thresholds", "snapshot", "model")


class CommandsConfig(Section):
    """Remote commands on ``<prefix>/<device>/cmd/<name>`` (docs/mqtt.md); the broker's ACL is
    the first gate, these settings the second."""

    enabled: bool = Field(
        False,
        description="subscribe to <prefix>/<device>/cmd/+ and carry out the commands in 'allow' "
        "(read at start: turning it on needs a restart)",
    )
    allow: list[CommandName] = Field(
        default_factory=lambda: list(COMMAND_NAMES),
        description="the commands carried out: reload, thresholds, snapshot, model; "
        "others are rejected with a reply",
    )
    token: SecretStr | None = Field(
        None,
        description="shared secret every command must carry in its 'token' field (write "
        "${VARIABLE}; at least 16 characters); absent or empty: the broker's ACL is the only "
        "gate",
    )
    model_dir: ConfigPath | None = Field(
        None,
        description="where models sent by the 'model' command are written; default: "
        "<state dir>/received-models (not model.fallback_dir: old models here are removed)",
    )
    max_model_bytes: Annotated[int, BeforeValidator(_byte_size)] = Field(
        64 * 1024**2,
        ge=1024,
        description="largest model the 'model' command accepts, e.g. '64MiB'",
    )
    transfer_timeout_s: float = Field(
        120.0,
        gt=0,
        le=86400,
        description="a model sent in chunks whose next chunk does not come within this is "
        "discarded",
    )
    fetch_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="a model fetched from a URL must arrive within this",
    )

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("a token needs at least 16 characters")
        return value

    def resolved_model_dir(self) -> Path:
        return (
            self.model_dir
            if self.model_dir is not None
            else default_state_dir() / "received-models"
        )


# ---------------------------------------------------------------- the daemon


class DaemonConfig(Section):
    device_id: Id = Field(
        default_factory=_default_device_id,
        description="this gateway's id, a level of its MQTT topics (default: the host name)",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the ST-CNN to run")
    cameras: list[CameraConfig] = Field(
        default_factory=list, description="the frame sources (at least one)"
    )
    detection: DetectionConfig = Field(
        default_factory=DetectionConfig, description="what counts as a detection"
    )
    crops: CropConfig = Field(default_factory=CropConfig, description="canonical crops")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="track ids across frames"
    )
    hard_examples: HardExamplesConfig | None = Field(
        None, description="save low-confidence windows for labelling and training (absent: off)"
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="the broker")
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig,
        description="the durable queue between the detector and the broker",
    )
    stats_interval_s: float = Field(
        10.0, ge=1.0, le=3600.0, description="seconds between two stats messages"
    )
    metrics: MetricsConfig | None = Field(
        None,
        description="HTTP endpoint with Prometheus /metrics and /healthz (absent: off)",
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig, description="what /healthz and stats call healthy"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line"
    )
    commands: CommandsConfig = Field(
        default_factory=CommandsConfig,
        description="remote commands over MQTT: reload, thresholds, snapshot, model (off by default)",
    )

    @model_validator(mode="after")
    def _own_model_dir(self) -> DaemonConfig:
        fallback = self.model.fallback_dir
        if fallback is not None and self.commands.resolved_model_dir() == fallback:
            raise ValueError(
                "commands.model_dir is model.fallback_dir: give the models the 'model' command "
                "receives a folder of their own (it removes the older ones)"
            )
        return self

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, value: list[CameraConfig]) -> list[CameraConfig]:
        if not value:
            raise ValueError("at least one camera is needed")
        seen: dict[str, int] = {}
        for i, cam in enumerate(value):
            if cam.id in seen:
                raise ValueError(
                    f"camera id {cam.id!r} is used twice (cameras {seen[cam.id]} and {i})"
                )
            seen[cam.id] = i
        return value

    @model_validator(mode="after")
    def _policy_needs_tracks(self) -> DaemonConfig:
        if self.crops.policy == "best_per_track" and not self.tracking.enabled:
            raise ValueError("crops.policy 'best_per_track' needs tracking.enabled: true")
        return self

    @property
    def client_id(self) -> str:
        """The MQTT client id: ``mqtt.client_id`` or ``edge-stn-<device_id>``."""
        return self.mqtt.client_id or f"edge-stn-{self.device_id}"

    def camera(self, camera_id: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        raise KeyError(camera_id)


# ---------------------------------------------------------------- ${ENV}

_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)


def _key_path(parts: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def substitute_env(
    doc: Any,
    environ: Mapping[str, str] | None = None,
    *,
    path: Path | None = None,
    _where: tuple[str | int, ...] = (),
) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string value (not in keys).

    ``${VAR:-default}`` takes the default when VAR is unset or empty; ``$${`` is a literal ``${``.
    Raises :class:`ConfigError` naming the key path when a variable is unset and has no default.
    """
    env = os.environ if environ is None else environ
    if isinstance(doc, dict):
        return {k: substitute_env(v, env, path=path, _where=(*_where, k)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [substitute_env(v, env, path=path, _where=(*_where, i)) for i, v in enumerate(doc)]
    if not isinstance(doc, str) or "$" not in doc:
        return doc

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        ref = _NAME.match(m.group(1))
        if ref is None:
            raise ConfigError(
                f"bad reference ${{{m.group(1)}}}: write ${{NAME}} or ${{NAME:-default}}",
                path=path,
                key=_key_path(_where),
            )
        name, default = ref.group(1), ref.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(
                    f"environment variable {name} is not set "
                    f"(export it, or write ${{{name}:-default}})",
                    path=path,
                    key=_key_path(_where),
                )
            return default
        return value

    return _REF.sub(repl, doc)


# ---------------------------------------------------------------- loading and checks


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _section_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The config section a validation error's location points into (None if unknown)."""
    candidates: list[type[BaseModel]] = [DaemonConfig]
    for part in loc:
        if isinstance(part, int):
            continue
        if len(candidates) > 1:  # a tagged union (providers): the tag names the member
            tagged = [c for c in candidates if c.model_fields["name"].default == part]
            if tagged:
                candidates = tagged
                continue
        field = candidates[0].model_fields.get(part) if len(candidates) == 1 else None
        if field is None:
            return None
        candidates = _models_in(field.annotation)
        if not candidates:
            return None
    return candidates[0] if len(candidates) == 1 else None


def _clean_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The key path as the operator wrote it: without pydantic's union member tags
    (``model.providers.0.cuda.options`` -> ``model.providers.0.options``,
    ``cameras.0.source.str`` -> ``cameras.0.source``)."""
    out: list[str | int] = []
    candidates: list[type[BaseModel]] = [DaemonConfig]
    leaf = False
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        if leaf:  # a member tag of a union-typed value
            continue
        if len(candidates) > 1:
            tagged = [c for c in candidates if c.model_fields["name"].default == part]
            if tagged:
                candidates = tagged
                continue
        field = candidates[0].model_fields.get(part) if len(candidates) == 1 else None
        out.append(part)
        candidates = _models_in(field.annotation) if field is not None else []
        leaf = not candidates
    return tuple(out)


def validation_message(exc: ValidationError) -> str:
    """``key.path: problem`` of the first error (like
    :func:`edge_stn.training_config.format_validation_error`), with the key path as the operator
    wrote it (no union tags), without pydantic's "Value error, " prefix, and, for an unknown
    key, the keys that section accepts."""
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    path = _clean_loc(loc)
    msg = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if first["type"] == "extra_forbidden" and loc:
        section = _section_at(loc[:-1])
        if section is not None:
            allowed = sorted(section.model_fields)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            msg = f"unknown key ({hint}allowed: {', '.join(allowed)})"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{_key_path(path)}: {msg}{more}"


def parse_config(
    doc: Mapping[str, Any],
    *,
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> DaemonConfig:
    """Validate a config mapping (as read from YAML); relative paths from ``path``'s folder."""
    doc = substitute_env(dict(doc), environ, path=path)
    base = path.resolve().parent if path is not None else None
    try:
        return DaemonConfig.model_validate(doc, context={"base_dir": base} if base else None)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc), path=path) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Read, substitute and validate a daemon config file.

    Raises :class:`ConfigError` ``"<file>: <key.path>: <problem>"``.
    """
    path = Path(path)
    return parse_config(load_yaml_mapping(path), path=path, environ=environ)


def redacted_dict(cfg: DaemonConfig) -> dict[str, Any]:
    """The validated config as JSON-ready data, secrets replaced by ``"**********"``."""
    # mode="json" serializes SecretStr as its mask, never the value; camera URLs may hold
    # passwords too.
    doc = cfg.model_dump(mode="json")
    for cam in doc["cameras"]:
        cam["source"] = redact_url(cam["source"])
    return doc


def config_hash(cfg: DaemonConfig) -> str:
    """sha256 of the canonical JSON of the validated config, secrets redacted."""
    canonical = json.dumps(
        redacted_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _model_problem(path: Path, sha256: str | None, trust: ModelTrustConfig) -> str | None:
    """Why the daemon would refuse the model file (sha256, signature or allow-list, metadata
    contract), or None."""
    from edge_stn.errors import EdgeStnError, MissingExtraError
    from edge_stn.runtime.metadata import file_sha256, read_model_metadata
    from edge_stn.runtime.signing import check_model_trust

    actual = file_sha256(path)
    if sha256 is not None and actual != sha256.lower():
        return "the daemon will refuse it: its sha256 differs from model.sha256"
    try:
        check_model_trust(path, actual, trust)
        read_model_metadata(path)
    except MissingExtraError as exc:
        return f"not checked: {exc.detail}"
    except EdgeStnError as exc:
        where = f"{exc.key}: " if exc.key else ""
        return f"the daemon will refuse it: {where}{exc.detail}"
    return None


def check_config(cfg: DaemonConfig) -> list[str]:
    """Warnings about a valid config: ``"<key.path>: <what may go wrong>"``, most important first.

    Missing files are warnings, not errors, so a config can be checked on another machine
    before deployment; the daemon itself refuses to start without its model.
    """
    out: list[str] = []
    mq = cfg.mqtt
    model_path = cfg.model.model_path
    if not model_path.is_file():
        what = "the bundled demo model is not installed" if cfg.model.is_bundled else "no such file"
        out.append(f"model.path: {what} ({model_path}): the daemon will not start")
    else:
        problem = _model_problem(model_path, cfg.model.sha256, cfg.model.trust)
        if problem:
            out.append(f"model.path: {problem}")
    if mq.protocol == "v311":
        out.append(
            "mqtt.protocol: MQTT 3.1.1 cannot tell the daemon that the broker refused a publish "
            "(ACL, size limit): such results are lost unseen (never dead-lettered or counted), "
            "and crops carry no user properties"
        )
    ob = cfg.outbox
    if not ob.enabled:
        out.append(
            "outbox.enabled: false: results the broker has not acknowledged are kept in memory "
            "only, and a restart or crash loses them"
        )
    else:
        out += _outbox_warnings(ob, cfg.device_id)
    if mq.tls is not None and mq.tls.insecure:
        out.append(
            "mqtt.tls.insecure: the broker's certificate host name is not checked: "
            "anyone in the path can impersonate the broker"
        )
    if mq.password is not None and mq.tls is None:
        out.append("mqtt.password: sent in clear text: configure mqtt.tls")
    if mq.tls is None and mq.port == 8883:
        out.append("mqtt.port: 8883 is the MQTT-over-TLS port but mqtt.tls is not set")
    cmds = cfg.commands
    if cmds.enabled and cmds.token is None:
        out.append(
            "commands.token: not set: whoever may write <prefix>/<device>/cmd/# on the broker "
            "can command this gateway (the broker's ACL is the only gate)"
        )
    if cmds.enabled and cmds.token is not None and mq.tls is None:
        out.append("commands.token: sent in clear text by operators: configure mqtt.tls")
    if cmds.enabled and "model" in cmds.allow and cfg.model.trust.require == "none":
        out.append(
            "commands.allow: 'model' is refused while model.trust.require is 'none' (a model "
            "is replaced remotely only when it must be signed or allow-listed)"
        )
    if mq.tls is not None and mq.port == 1883:
        out.append("mqtt.port: 1883 is the plain MQTT port but mqtt.tls is set")
    if mq.tls is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            f = getattr(mq.tls, name)
            if f is not None and not Path(f).is_file():
                out.append(f"mqtt.tls.{name}: no such file ({f})")
    sources: dict[str | int, str] = {}
    for i, cam in enumerate(cfg.cameras):
        where = f"cameras.{i}"
        if cam.kind == "file" and not Path(str(cam.source)).is_file():
            out.append(f"{where}.source: no such file ({cam.source})")
        if cam.is_live and "on_end" in cam.model_fields_set:
            out.append(f"{where}.on_end: ignored: {cam.kind} is a live source, not a file")
        if cam.kind != "rtsp" and "rtsp_transport" in cam.model_fields_set:
            out.append(f"{where}.rtsp_transport: ignored: the source is not rtsp://")
        if cam.proposals.method != "rois" and cam.proposals.rois:
            out.append(f"{where}.proposals.rois: ignored: method is {cam.proposals.method!r}")
        if cam.source in sources and cam.source != "synthetic":
            out.append(f"{where}.source: the same source as camera {sources[cam.source]!r}")
        sources.setdefault(cam.source, cam.id)
    return out


def _outbox_warnings(ob: OutboxConfig, device_id: str) -> list[str]:
    out = []
    path = ob.resolved_path(device_id)
    assert path is not None
    if ob.synchronous == "normal":
        out.append(
            "outbox.synchronous: normal: a power cut may lose the last commits of results "
            "(a crash of the process does not)"
        )
    if path.is_dir():
        out.append(f"outbox.path: {path} is a folder: name a file")
        return out
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if folder is None or not os.access(folder, os.W_OK | os.X_OK):
        out.append(
            f"outbox.path: cannot write in {folder or path.parent}: the daemon will not start"
        )
        return out
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return out
    used = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    if free + used < ob.max_bytes:
        out.append(
            f"outbox.max_bytes: {ob.max_bytes} bytes, but {folder} has only {free} bytes free"
        )
    return out


def describe(cfg: DaemonConfig) -> str:
    """One line: cameras, model, broker (what ``edge-stn config check`` prints after ``ok:``)."""
    n = len(cfg.cameras)
    model = (
        f"bundled demo model ({cfg.model.model_path.name})"
        if cfg.model.is_bundled
        else str(cfg.model.model_path)
    )
    providers = " > ".join(p.name for p in cfg.model.providers)
    tls = ", TLS" if cfg.mqtt.tls is not None else ""
    return (
        f"{n} camera{'s' if n != 1 else ''}, model {model} ({providers}), "
        f"broker {cfg.mqtt.broker} (MQTT {cfg.mqtt.protocol}{tls}), device {cfg.device_id}"
    )
