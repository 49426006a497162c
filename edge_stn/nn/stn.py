"""Spatial Transformer building blocks (Jaderberg et al., 2015).

localization net -> theta (2x3) -> grid generator -> bilinear sampler.
The grid is a stored base grid times ``theta^T`` (one MatMul), never ``F.affine_grid``:
it exports at opset 16/17 and TensorRT accepts it, where ``AffineGrid`` it does not.
Conventions: see :mod:`edge_stn.geometry`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from edge_stn.geometry import IDENTITY_THETA, base_grid

PaddingMode = Literal["zeros", "border", "reflection"]


class LocalizationNet(nn.Module):
    """Regresses the 6 parameters of theta from the input image.

    The input is first average-pooled by ``downsample`` (a cheap look at the whole image is
    enough to find the object), then two conv blocks and two fully connected layers. The
    regression layer starts at zero weights and the identity bias, so a fresh transformer is an
    identity warp and training starts from the plain classifier's view.
    """

    def __init__(
        self,
        in_channels: int,
        in_size: tuple[int, int],
        *,
        downsample: int = 2,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
    ) -> None:
        super().__init__()
        self.pool_in = nn.AvgPool2d(downsample) if downsample > 1 else nn.Identity()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        h = in_size[0] // downsample // 4
        w = in_size[1] // downsample // 4
        if h < 1 or w < 1:
            raise ValueError(f"input {in_size} too small for downsample={downsample}")
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * h * w, hidden), nn.ReLU(inplace=True))
        self.regress = nn.Linear(hidden, 6)
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        nn.init.zeros_(self.regress.weight)
        with torch.no_grad():
            self.regress.bias.copy_(torch.tensor(IDENTITY_THETA, dtype=self.regress.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.features(self.pool_in(x)))
        return self.regress(z).view(-1, 2, 3)


class GridGenerator(nn.Module):
    """Sampling grid of an ``(out_h, out_w)`` output: base grid (H*W x 3) @ theta^T."""

    base_grid: torch.Tensor

    def __init__(self, out_size: tuple[int, int]) -> None:
        super().__init__()
        self.out_size = (int(out_size[0]), int(out_size[1]))
        grid = torch.from_numpy(base_grid(*self.out_size))
        self.register_buffer("base_grid", grid, persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        h, w = self.out_size
        base = self.base_grid.to(dtype=theta.dtype)
        # (H*W, 3) @ (N, 3, 2) broadcasts to (N, H*W, 2): a single MatMul node in ONNX.
        grid = torch.matmul(base, theta.transpose(1, 2))
        return grid.reshape(-1, h, w, 2)


class BilinearSampler(nn.Module):
    """Samples the input at the grid points, bilinearly (``F.grid_sample``, align_corners=False)."""

    def __init__(self, padding_mode: PaddingMode = "zeros") -> None:
        super().__init__()
        self.padding_mode: PaddingMode = padding_mode

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(
            x,
            grid.to(x.dtype),
            mode="bilinear",
            padding_mode=self.padding_mode,
            align_corners=False,
        )


class SpatialTransformer(nn.Module):
    """Localization net + grid generator + sampler; returns ``(canonical, theta)``.

    The output size may differ from the input size: the transformer hands the classifier a
    small canonical crop of the object.
    """

    def __init__(
        self,
        in_channels: int,
        in_size: tuple[int, int],
        out_size: tuple[int, int],
        *,
        padding_mode: PaddingMode = "zeros",
        loc_downsample: int = 2,
        loc_channels: tuple[int, int] = (16, 32),
        loc_hidden: int = 64,
    ) -> None:
        super().__init__()
        self.in_size = in_size
        self.out_size = out_size
        self.localization = LocalizationNet(
            in_channels,
            in_size,
            downsample=loc_downsample,
            channels=loc_channels,
            hidden=loc_hidden,
        )
        self.grid = GridGenerator(out_size)
        self.sampler = BilinearSampler(padding_mode)

    @property
    def padding_mode(self) -> PaddingMode:
        return self.sampler.padding_mode

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.localization(x)
        canonical = self.sampler(x, self.grid(theta))
        return canonical, theta

    def warp(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Sample ``x`` with a given theta (no localization)."""
        return self.sampler(x, self.grid(theta))
