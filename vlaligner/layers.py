"""Small building blocks shared by the neck, the generators and the heads.

Axis legend: b batch, c channels, h w space.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ._validation import check_input

__all__ = ["NormLayer", "conv_norm_act", "UpProjection", "SkipGate", "halving_schedule"]

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

    ``skip_channels`` (a *choice* beyond the paper): one entry per round, the channels of a
    finer map (e.g. the backbone's at that round's stride), or None for a round without one.
    The skip is projected (1x1 conv + norm + ReLU) and added to the upsampled features ``u``
    before the round's 3x3 convolution, gated per pixel and channel by ``u`` itself:
    ``u + sigmoid(W_g u + b_g) * proj(skip)``. The masks then see edges the coarse decoder
    grid cannot hold, where the (language-aware) upsampled features let them through: the
    backbone's map knows every object, not which one the sentence means. Measured at the demo's
    budget, the gate did not stop the trade of grounding for edges that an ungated sum showed
    (docs/training.md, "The target's half-cell shift").

    Shapes: ``(b in_channels h w) -> (b out_channels h*2**u w*2**u)``; the skip of round i is
    ``(b skip_channels[i] h*2**(i+1) w*2**(i+1))``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_upsamples: int = 0,
        out_channels: Optional[int] = None,
        hidden_channels: Optional[Sequence[int]] = None,
        skip_channels: Optional[Sequence[Optional[int]]] = None,
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
        skips = None if skip_channels is None else [None if c is None else int(c) for c in skip_channels]
        if skips is not None and (len(skips) != num_upsamples or any(c is not None and c < 1 for c in skips)):
            raise ValueError(
                f"skip_channels must give one positive width or None per upsampling round "
                f"({num_upsamples}), got {list(skip_channels or [])}"
            )
        layers: list[nn.Module] = []
        skip_projections: list[nn.Module] = []
        channels = in_channels
        for i, next_channels in enumerate(schedule):
            if skips is not None:
                skip_projections.append(
                    nn.Identity() if skips[i] is None else SkipGate(skips[i], channels, norm_layer=norm_layer)
                )
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
        self.skip_channels: Optional[tuple] = None if skips is None else tuple(skips)
        # A submodule only with skips: models without them keep exactly their tensors.
        self.skip_projections = nn.ModuleList(skip_projections) if skips is not None else None

    def forward(
        self, features: torch.Tensor, skips: Optional[Sequence[Optional[torch.Tensor]]] = None
    ) -> torch.Tensor:
        """``(b c h w)`` (and one skip map or None per round) -> ``(b out_channels H W)``."""
        if self.skip_channels is None:
            if skips is not None and any(s is not None for s in skips):
                raise ValueError("skips were given, but this up-projection was built without skip_channels")
            return self.layers(features)
        skips = self._check_skips(features, skips)
        x = features
        for i in range(self.num_upsamples):
            x = self.layers[2 * i](x)
            if skips[i] is not None:
                x = self.skip_projections[i](x, skips[i])
            x = self.layers[2 * i + 1](x)
        for layer in self.layers[2 * self.num_upsamples:]:
            x = layer(x)
        return x

    def _check_skips(
        self, features: torch.Tensor, skips: Optional[Sequence[Optional[torch.Tensor]]]
    ) -> list:
        """Clear errors for skip maps of the wrong number, channels, size or batch."""
        assert self.skip_channels is not None
        if skips is None or isinstance(skips, torch.Tensor) or len(skips) != self.num_upsamples:
            got = "None" if skips is None else (
                "a tensor" if isinstance(skips, torch.Tensor) else f"{len(skips)} entries"
            )
            raise ValueError(
                f"this up-projection takes one skip map per round (skip_channels "
                f"{list(self.skip_channels)}), got {got}"
            )
        b, _, h, w = features.shape
        out = []
        for i, (skip, channels) in enumerate(zip(skips, self.skip_channels)):
            if channels is None:
                if skip is not None:
                    raise ValueError(f"round {i} has no skip (skip_channels[{i}] is None), got a map")
                out.append(None)
                continue
            # the round-i map: the skip's channels at 2**(i+1) times the features' side
            sizes = {0: b, 1: channels, 2: h * 2 ** (i + 1), 3: w * 2 ** (i + 1)}
            out.append(check_input(f"skips[{i}]", skip, "b c h w", sizes=sizes, like=features, like_name="features"))
        return out


class SkipGate(nn.Module):
    """``u + sigmoid(gate(u)) * proj(skip)``: a finer map added where the features let it.

    ``gate`` is a 1x1 convolution (``channels -> channels``, with bias); ``proj`` a 1x1
    convolution, norm and ReLU (``skip_channels -> channels``).

    Shapes: ``u (b channels H W)``, ``skip (b skip_channels H W)`` -> ``(b channels H W)``.
    """

    def __init__(self, skip_channels: int, channels: int, *, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.proj = conv_norm_act(skip_channels, channels, 1, norm_layer=norm_layer)
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return features + torch.sigmoid(self.gate(features)) * self.proj(skip)


def halving_schedule(in_channels: int, num_upsamples: int) -> list[int]:
    """The default channel schedule of :class:`UpProjection`: halve once per round (at least 1)."""
    out, channels = [], in_channels
    for _ in range(num_upsamples):
        channels = max(channels // 2, 1)
        out.append(channels)
    return out
