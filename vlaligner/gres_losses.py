"""Loss terms for generalized referring segmentation (gRefCOCO): the no-target decision.

Axis legend: b batch, h w space of the mask.

Two rules, as ReLA trains GRES:

1. the no-target head is trained with a binary cross-entropy on the sample's ``no_target``
   flag (:func:`no_target_loss`);
2. the mask loss of a no-target sample uses an empty target (all background): the mask
   head learns to predict nothing. The gRefCOCO loader already returns empty masks for
   no-target samples; :func:`mask_targets_for_no_target` enforces it for any batch.

Total loss (what the trainer computes): ``mask_loss(logits, mask_targets_for_no_target(mask,
no_target)) + weight * no_target_loss(no_target_logits, no_target)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["no_target_loss", "mask_targets_for_no_target"]


def _flags(no_target: torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    if not isinstance(no_target, torch.Tensor):
        raise TypeError(f"no_target must be a (b) bool tensor, got {type(no_target).__name__}")
    if no_target.dtype != torch.bool:
        raise TypeError(f"no_target must be a bool tensor, got dtype {no_target.dtype}")
    if no_target.shape != (b,):
        raise ValueError(f"no_target must have shape ({b},), got {tuple(no_target.shape)}")
    return no_target.to(device)


def no_target_loss(
    logits: torch.Tensor,
    no_target: torch.Tensor,
    *,
    pos_weight: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy of the no-target logits.

    Args:
        logits: ``(b)`` float no-target logits (``EAVLOutput.no_target_logits``).
        no_target: ``(b)`` bool, True for samples whose sentence refers to nothing.
        pos_weight: weight of the positive (no-target) class, e.g. ``n_target / n_no_target``
            to balance a set with 10 % no-target samples; None = 1.
        reduction: "mean", "sum" or "none" (then ``(b)``).

    Returns:
        the loss (float32 scalar, or ``(b)`` with ``reduction="none"``).

    Raises:
        TypeError / ValueError: non-float logits, non-bool flags, shapes that differ.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"logits must be a (b) float tensor, got {type(logits).__name__}"
            + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else "")
        )
    if logits.ndim != 1:
        raise ValueError(f"logits must have shape (b), got {tuple(logits.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    target = _flags(no_target, logits.shape[0], logits.device).float()
    weight = None
    if pos_weight is not None:
        if not float(pos_weight) > 0:
            raise ValueError(f"pos_weight must be positive, got {pos_weight}")
        weight = torch.tensor(float(pos_weight), device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight, reduction=reduction)


def mask_targets_for_no_target(mask: torch.Tensor, no_target: torch.Tensor) -> torch.Tensor:
    """The mask targets with every no-target sample's target emptied.

    Args:
        mask: ``(b h w)`` or ``(b 1 h w)`` targets (float 0/1 or bool).
        no_target: ``(b)`` bool.

    Returns:
        a tensor like ``mask`` (same dtype and shape), zero where ``no_target`` is True.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (3, 4):
        raise ValueError(
            "mask must be a (b h w) or (b 1 h w) tensor, got "
            + (f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
        )
    flags = _flags(no_target, mask.shape[0], mask.device)
    keep = (~flags).view(-1, *([1] * (mask.ndim - 1)))
    return mask * keep if mask.dtype != torch.bool else mask & keep
