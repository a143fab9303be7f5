"""The Multi-Mask Generator of EAVL (paper Eqs. 11-12): one dynamic kernel per query.

Axis legend: b batch, n queries, c channels, d query width, h w space, k kernel size.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ._validation import check_input, check_same_batch
from .functional import coord_features, dynamic_conv2d, split_dynamic_params
from .layers import NormLayer, UpProjection

__all__ = ["MultiMaskGenerator", "append_coordinates"]


def append_coordinates(features: torch.Tensor) -> torch.Tensor:
    """``(b c h w)`` -> ``(b c+2 h w)``: the features, then x and y in [-1, 1] (CoordConv)."""
    b, _, h, w = features.shape
    coords = coord_features(b, h, w, device=features.device, dtype=features.dtype)
    return torch.cat([features, coords], dim=1)


class MultiMaskGenerator(nn.Module):
    """Turn each query into a k x k kernel plus bias and convolve the features with it.

    ``features`` first go through the optional up-projection of Eq. 11 (``num_upsamples``
    rounds of 2x upsampling + 3x3 conv, then a 1x1 conv, as CRIS's Projector); a linear layer
    then maps each query to ``c*k*k + 1`` numbers (kernel, then bias), applied to the
    projected features with ``dynamic_conv2d``. With ``append_coords`` the normalised pixel
    coordinates (x, y in [-1, 1]) are appended to the projected features first, so that a
    kernel can weigh position directly ("the top one"; CondInst appends coordinates to its
    mask features likewise): the kernels then act on ``mask_channels + 2`` channels.

    Args:
        in_channels: channels of the incoming features.
        query_dim: width d of the queries.
        kernel_size: odd k (3 as CRIS; 1 works too).
        num_upsamples: rounds of 2x upsampling in the up-projection (0: none, 2: the paper's
            stride 16 -> 4).
        mask_channels: channels c the kernels act on; defaults to the last width of the
            up-projection (``in_channels`` halved once per upsampling round).
        hidden_channels: the up-projection's width after each round (default: halving).
        skip_channels: channels of a finer map added at each round of the up-projection, or
            None per round (see :class:`~vlaligner.layers.UpProjection`); default: no skips.
        mask_bias_init: initial bias of every query's mask (its logit before any training);
            a negative value is a foreground prior (``log(p / (1 - p))`` for a referred
            object covering a share ``p`` of the pixels) that spares a from-scratch model the
            first phase of learning "background everywhere". 0 keeps the plain initialisation.
        append_coords: append x and y (2 channels) to the projected features before the
            kernels (a *choice* beyond the paper; measured in docs/training.md).
        norm_layer: normalisation used in the up-projection.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        query_dim: int,
        kernel_size: int = 3,
        num_upsamples: int = 0,
        mask_channels: Optional[int] = None,
        hidden_channels: Optional[Sequence[int]] = None,
        skip_channels: Optional[Sequence[Optional[int]]] = None,
        mask_bias_init: float = 0.0,
        append_coords: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.in_channels = in_channels
        self.query_dim = query_dim
        self.kernel_size = kernel_size
        self.projection = UpProjection(
            in_channels=in_channels, num_upsamples=num_upsamples, out_channels=mask_channels,
            hidden_channels=hidden_channels, skip_channels=skip_channels, norm_layer=norm_layer,
        )
        self.mask_channels = self.projection.out_channels
        if not isinstance(append_coords, bool):
            raise TypeError(f"append_coords must be True or False, got {append_coords!r}")
        self.append_coords = append_coords
        self.param_proj = nn.Linear(query_dim, self.kernel_channels * kernel_size**2 + 1)
        self.mask_bias_init = float(mask_bias_init)
        if self.mask_bias_init:
            with torch.no_grad():  # the last output is the bias b_i of Eq. 12
                self.param_proj.bias[-1].fill_(self.mask_bias_init)

    @property
    def kernel_channels(self) -> int:
        """Channels each kernel acts on: ``mask_channels`` (+ 2 with ``append_coords``)."""
        return self.mask_channels + (2 if self.append_coords else 0)

    @property
    def skip_channels(self) -> Optional[tuple]:
        """Channels of the skip map each up-projection round takes (None: built without skips)."""
        return self.projection.skip_channels

    def kernels(
        self,
        features: torch.Tensor,
        queries: torch.Tensor,
        skips: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project the features and make the per-query kernels, without convolving.

        Args:
            features: ``(b in_channels h w)``.
            queries: ``(b n query_dim)``.
            skips: one finer map ``(b skip_channels[i] h*2**(i+1) w*2**(i+1))`` (or None) per
                up-projection round; only for a generator built with ``skip_channels``.

        Returns:
            ``projected (b c H' W')``, ``weight (b n c k k)``, ``bias (b n)``; ``c`` is
            :attr:`kernel_channels` (the coordinates are the last 2 channels of ``projected``).
        """
        check_input("features", features, "b c h w", sizes={1: self.in_channels}, module=self)
        check_input("queries", queries, "b n d", sizes={2: self.query_dim}, module=self)
        check_same_batch(features=features, queries=queries)
        projected = self.projection(features, skips)
        if self.append_coords:
            projected = append_coordinates(projected)
        weight, bias = split_dynamic_params(
            self.param_proj(queries), self.kernel_channels, self.kernel_size
        )
        return projected, weight, bias

    def forward(
        self,
        features: torch.Tensor,
        queries: torch.Tensor,
        skips: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """Make one mask per query.

        Args:
            features: ``(b in_channels h w)``.
            queries: ``(b n query_dim)``.
            skips: as in :meth:`kernels`.

        Returns:
            ``(b n H' W')`` mask logits, ``H' = h * 2**num_upsamples``.
        """
        projected, weight, bias = self.kernels(features, queries, skips)
        return dynamic_conv2d(projected, weight, bias)
