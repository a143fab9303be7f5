"""The Vision-Language Aligner of EAVL (paper Eqs. 11-14) and the fixed-kernel baseline.

Axis legend: b batch, n queries, c channels, d query width, h w space (of the incoming
features), H W space of the masks (h * 2**num_upsamples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ._validation import check_input, check_same_batch, check_tensor
from .functional import dynamic_conv2d, fuse_dynamic_kernels, mixture_of_masks_logits
from .layers import NormLayer, UpProjection
from .mask_generator import MultiMaskGenerator, append_coordinates
from .query_estimator import MultiQueryEstimator

__all__ = ["AlignerOutput", "VisionLanguageAligner", "FixedKernelHead", "AGGREGATIONS"]

#: The two readings of Eq. 14 (see :class:`VisionLanguageAligner`).
AGGREGATIONS = ("logits", "probabilities")


@dataclass
class AlignerOutput:
    """What the aligner (or the fixed-kernel baseline) returns, the same in train and eval.

    Attributes:
        logits: ``(b 1 H W)`` final mask logits, ``sum_i scores_i * query_masks_i``.
        query_scores: ``(b n)`` weight of each query's mask, summing to 1 over n; None for
            the fixed-kernel head.
        query_masks: ``(b n H W)`` per-query mask logits, only when asked for
            (``return_query_masks=True``), else None.
    """

    logits: torch.Tensor
    query_scores: Optional[torch.Tensor] = None
    query_masks: Optional[torch.Tensor] = None


class VisionLanguageAligner(nn.Module):
    """Multi-Mask Generator + Multi-Query Estimator + score-weighted aggregation.

    Two readings of the paper's Eq. 14 ("the weighted sum of the masks"), ``aggregation``:

    - ``"logits"`` (default, the spec's): ``Y = sum_i s_i m_i`` on logits, computed with the
      fused kernel ``sum_i s_i K_i`` (one convolution whatever n, in training and inference),
      which equals the weighted sum of the n masks by linearity. Because the kernel generator
      is linear too, ``Y`` then depends on the queries only through their score-weighted mean
      ``sum_i s_i q_i``: nothing in the loss tells the queries apart, so they are free to
      collapse into one (docs/training.md, "Query collapse").
    - ``"probabilities"``: ``sigmoid(Y) = sum_i s_i sigmoid(m_i)``: each query's mask is a whole
      prediction and the scores mix them, so every query is trained through its own mask (n
      convolutions, :func:`~vlaligner.functional.mixture_of_masks_logits`).

    The n masks are returned only when ``return_query_masks=True``.

    Args:
        in_channels: channels of the incoming features (e.g. the decoder output).
        query_dim: width d of the queries.
        kernel_size: odd k of the query kernels.
        num_heads: attention heads of the estimator.
        use_estimator: False gives every query the weight 1/n (the paper's ablation).
        aggregation: ``"logits"`` or ``"probabilities"`` (see above).
        num_upsamples: rounds of 2x upsampling before the kernels (2 in EAVL: stride 16 -> 4).
        mask_channels: channels the kernels act on (default: halved per upsampling round).
        hidden_channels: the up-projection's width after each round (default: halving;
            CRIS's Projector: ``(512, 256)`` with ``mask_channels=256``).
        skip_channels: channels of a finer map added at each up-projection round, or None per
            round (a *choice* beyond the paper; :class:`~vlaligner.layers.UpProjection`).
        mask_bias_init: initial bias of each query's mask (a foreground prior, see
            :class:`MultiMaskGenerator`).
        append_coords: append x and y to the projected features before the kernels (see
            :class:`MultiMaskGenerator`; a choice beyond the paper).
        norm_layer: normalisation used in the up-projection.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        query_dim: int,
        kernel_size: int = 3,
        num_heads: int = 8,
        use_estimator: bool = True,
        num_upsamples: int = 0,
        mask_channels: Optional[int] = None,
        hidden_channels: Optional[Sequence[int]] = None,
        skip_channels: Optional[Sequence[Optional[int]]] = None,
        mask_bias_init: float = 0.0,
        aggregation: str = "logits",
        append_coords: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.mask_generator = MultiMaskGenerator(
            in_channels=in_channels, query_dim=query_dim, kernel_size=kernel_size,
            num_upsamples=num_upsamples, mask_channels=mask_channels,
            hidden_channels=hidden_channels, skip_channels=skip_channels,
            mask_bias_init=mask_bias_init, append_coords=append_coords, norm_layer=norm_layer,
        )
        self.estimator = (
            MultiQueryEstimator(query_dim=query_dim, num_heads=num_heads) if use_estimator else None
        )

    @property
    def use_estimator(self) -> bool:
        return self.estimator is not None

    @property
    def skip_channels(self) -> Optional[tuple]:
        """Channels of the skip map each up-projection round takes (None: built without skips)."""
        return self.mask_generator.skip_channels

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """``(b n d)`` queries -> ``(b n)`` weights: the estimator's, or 1/n without it."""
        if self.estimator is not None:
            return self.estimator(queries)
        b, n = queries.shape[:2]
        return queries.new_full((b, n), 1.0 / n)

    def forward(
        self,
        features: torch.Tensor,
        queries: torch.Tensor,
        return_query_masks: bool = False,
        skips: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> AlignerOutput:
        """Align: per-query kernels, scores, and the fused mask.

        Args:
            features: ``(b in_channels h w)``.
            queries: ``(b n query_dim)``.
            return_query_masks: also compute the n per-query masks (for display, Fig. 4).
            skips: one finer map ``(b skip_channels[i] h*2**(i+1) w*2**(i+1))`` or None per
                up-projection round; only for an aligner built with ``skip_channels``.

        Returns:
            ``AlignerOutput`` with ``logits (b 1 H W)``, ``query_scores (b n)`` and
            ``query_masks (b n H W)`` or None.
        """
        projected, weight, bias = self.mask_generator.kernels(features, queries, skips)
        scores = self.scores(queries)
        if self.aggregation == "probabilities":
            query_masks = dynamic_conv2d(projected, weight, bias)
            logits = mixture_of_masks_logits(query_masks, scores)
            return AlignerOutput(
                logits=logits, query_scores=scores, query_masks=query_masks if return_query_masks else None
            )
        fused_weight, fused_bias = fuse_dynamic_kernels(weight, bias, scores)
        logits = dynamic_conv2d(projected, fused_weight, fused_bias)
        query_masks = dynamic_conv2d(projected, weight, bias) if return_query_masks else None
        return AlignerOutput(logits=logits, query_scores=scores, query_masks=query_masks)


class FixedKernelHead(nn.Module):
    """The paper's table-III baseline: the same up-projection, then one fixed learned kernel.

    It ignores the queries (they may still feed the decoder upstream). Returns an
    ``AlignerOutput`` with ``query_scores`` and ``query_masks`` None, so that the two heads are
    interchangeable.

    Args:
        in_channels: channels of the incoming features.
        kernel_size: odd size of the fixed kernel.
        num_upsamples: rounds of 2x upsampling before the kernel.
        mask_channels: channels the kernel acts on (default: halved per upsampling round).
        hidden_channels: the up-projection's width after each round (default: halving).
        skip_channels: as in :class:`VisionLanguageAligner`.
        mask_bias_init: initial bias of the fixed kernel (the same foreground prior).
        append_coords: append x and y to the projected features before the kernel, as the
            aligner may (so that the two heads see the same features).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        kernel_size: int = 1,
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
        if not isinstance(append_coords, bool):
            raise TypeError(f"append_coords must be True or False, got {append_coords!r}")
        self.append_coords = append_coords
        self.projection = UpProjection(
            in_channels=in_channels, num_upsamples=num_upsamples, out_channels=mask_channels,
            hidden_channels=hidden_channels, skip_channels=skip_channels, norm_layer=norm_layer,
        )
        self.classifier = nn.Conv2d(
            self.projection.out_channels + (2 if self.append_coords else 0), 1, kernel_size,
            padding=kernel_size // 2,
        )
        if mask_bias_init:
            with torch.no_grad():
                self.classifier.bias.fill_(float(mask_bias_init))

    @property
    def skip_channels(self) -> Optional[tuple]:
        """Channels of the skip map each up-projection round takes (None: built without skips)."""
        return self.projection.skip_channels

    def forward(
        self,
        features: torch.Tensor,
        queries: Optional[torch.Tensor] = None,
        return_query_masks: bool = False,
        skips: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> AlignerOutput:
        """``(b in_channels h w)`` -> ``AlignerOutput(logits (b 1 H W))``; queries are ignored.

        ``skips``: as in :meth:`VisionLanguageAligner.forward`.
        """
        check_input("features", features, "b c h w", sizes={1: self.in_channels}, module=self)
        if queries is not None:
            check_tensor("queries", queries)
            check_same_batch(features=features, queries=queries)
        projected = self.projection(features, skips)
        if self.append_coords:
            projected = append_coordinates(projected)
        return AlignerOutput(logits=self.classifier(projected))
