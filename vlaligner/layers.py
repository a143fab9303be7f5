"""Small building blocks shared by the neck, the generators and the heads.

Axis legend: b batch, c channels, h w space.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ["NormLayer", "conv_norm_act", "UpProjection", "halving_schedule"]

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

    ``hidden_channels`` is the channel schedule: the output width of each round's 3x3
    convolution (one entry per round). By default each round halves the channels; CRIS's
    Projector is ``in_channels=512, hidden_channels=(512, 256), out_channels=256`` (512 -> 512
    -> 256, then a 1x1 convolution to 256). A final 1x1 convolution gives ``out_channels``.
    With ``num_upsamples=0`` and ``out_channels`` equal to ``in_channels`` it is the identity.

    Shapes: ``(b in_channels h w) -> (b out_channels h*2**u w*2**u)``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_upsamples: int = 0,
        out_channels: Optional[int] = None,
        hidden_channels: Optional[Sequence[int]] = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_upsamples < 0:
            raise ValueError(f"num_upsamples must be >= 0, got {num_upsamples}")
        schedule = halving_schedule(in_channels, num_upsamples) if hidden_channels is None else [
            int(c) for c in hidden_channels
        ]
        if len(schedule) != num_upsamples or any(c < 1 for c in schedule):
            raise ValueError(
                f"hidden_channels must give one positive width per upsampling round "
                f"({num_upsamples}), got {list(hidden_channels or [])}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for next_channels in schedule:
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_norm_act(channels, next_channels, 3, norm_layer=norm_layer),
            ]
            channels = next_channels
        self.hidden_channels = tuple(schedule)
        self.out_channels = channels if out_channels is None else out_channels
        if num_upsamples > 0 or self.out_channels != channels:
            layers.append(nn.Conv2d(channels, self.out_channels, 1))
        self.layers = nn.Sequential(*layers)
        self.num_upsamples = num_upsamples

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def halving_schedule(in_channels: int, num_upsamples: int) -> list[int]:
    """The default channel schedule of :class:`UpProjection`: halve once per round (at least 1)."""
    out, channels = [], in_channels
    for _ in range(num_upsamples):
        channels = max(channels // 2, 1)
        out.append(channels)
    return out
