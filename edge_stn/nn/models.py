"""The ST-CNN and the plain CNN baseline. Both use the same classifier, so the comparison is fair:
the CNN applies it to the whole input, the ST-CNN to the transformer's small canonical crop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from edge_stn.errors import CheckpointError
from edge_stn.nn.stn import PaddingMode, SpatialTransformer

ARCHITECTURES = ("stcnn", "cnn")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in checkpoints as a plain dict."""

    arch: str = "stcnn"
    in_channels: int = 1
    in_size: tuple[int, int] = (60, 60)
    num_classes: int = 10
    widths: tuple[int, int, int] = (32, 64, 128)
    dropout: float = 0.2
    stn_out: tuple[int, int] = (28, 28)
    padding_mode: PaddingMode = "zeros"
    loc_downsample: int = 2
    loc_channels: tuple[int, int] = (16, 32)
    loc_hidden: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"model spec has unknown fields {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            kw[k] = tuple(v) if isinstance(v, list) else v
        spec = cls(**kw)
        if spec.arch not in ARCHITECTURES:
            raise CheckpointError(
                f"unknown architecture {spec.arch!r}, expected one of {ARCHITECTURES}"
            )
        return spec


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    theta: torch.Tensor | None
    canonical: torch.Tensor | None


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class Classifier(nn.Module):
    """A small VGG-style CNN with batch norm and global average pooling.

    Global pooling makes it accept any input size, so the same classifier serves the ST-CNN
    (on the canonical crop) and the baseline (on the whole image).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, int, int] = (32, 64, 128),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w0),
            *_conv_bn(w0, w0),
            nn.MaxPool2d(2),
            *_conv_bn(w0, w1),
            *_conv_bn(w1, w1),
            nn.MaxPool2d(2),
            *_conv_bn(w1, w2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(w2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class STCNN(nn.Module):
    """Spatial Transformer CNN: transformer -> classifier on the canonical crop."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.transformer = SpatialTransformer(
            spec.in_channels,
            spec.in_size,
            spec.stn_out,
            padding_mode=spec.padding_mode,
            loc_downsample=spec.loc_downsample,
            loc_channels=spec.loc_channels,
            loc_hidden=spec.loc_hidden,
        )
        self.classifier = Classifier(spec.in_channels, spec.num_classes, spec.widths, spec.dropout)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        canonical, theta = self.transformer(x)
        return ModelOutput(self.classifier(canonical), theta, canonical)


class PlainCNN(nn.Module):
    """The baseline: the same classifier on the whole input, no transformer."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.classifier = Classifier(spec.in_channels, spec.num_classes, spec.widths, spec.dropout)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.classifier(x), None, None)


def build_model(spec: ModelSpec) -> STCNN | PlainCNN:
    if spec.arch == "stcnn":
        return STCNN(spec)
    if spec.arch == "cnn":
        return PlainCNN(spec)
    raise CheckpointError(f"unknown architecture {spec.arch!r}, expected one of {ARCHITECTURES}")


def count_flops(model: nn.Module, in_channels: int, in_size: tuple[int, int]) -> int:
    """Multiply-accumulates per image (convolutions, linear layers and the bilinear sampler)."""
    total = 0

    def conv_hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += int(out[0].numel()) * k

    def linear_hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += int(out[0].numel()) * m.in_features

    def sampler_hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += int(out[0].numel()) * 4  # four taps per output value

    from edge_stn.nn.stn import BilinearSampler

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, BilinearSampler):
            handles.append(m.register_forward_hook(sampler_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, in_channels, *in_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
