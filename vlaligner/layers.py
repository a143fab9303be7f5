"""Small building blocks shared by the neck, the generators and the heads.

Axis legend: b batch, c channels, h w space.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["NormLayer", "conv_norm_act", "UpProjection"]

NormLayer = Callable[[int], nn.Module]


def conv_norm_act(
    in_channels: int, out_channels: int, kernel_size: int, *, norm_layer: NormLayer = nn.BatchNorm2d
) -> nn.Sequential:
    """Convolution ("same" padding, no bias), normalisation and ReLU, as CRIS's ``conv_layer``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


class UpProjection(nn.Module):
    """The paper's Eq. 11 up-projection: ``num_upsamples`` rounds of 2x upsampling + 3x3 conv.

    Each round halves the channels (as CRIS's Projector does); a final 1x1 convolution gives
    ``out_channels``. With ``num_upsamples=0`` and ``out_channels`` equal to ``in_channels``
    it is the identity.

    Shapes: ``(b in_channels h w) -> (b out_channels h*2**u w*2**u)``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_upsamples: int = 0,
        out_channels: Optional[int] = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_upsamples < 0:
            raise ValueError(f"num_upsamples must be >= 0, got {num_upsamples}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_upsamples):
            next_channels = max(channels // 2, 1)
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_norm_act(channels, next_channels, 3, norm_layer=norm_layer),
            ]
            channels = next_channels
        self.out_channels = channels if out_channels is None else out_channels
        if num_upsamples > 0 or self.out_channels != channels:
            layers.append(nn.Conv2d(channels, self.out_channels, 1))
        self.layers = nn.Sequential(*layers)
        self.num_upsamples = num_upsamples

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
