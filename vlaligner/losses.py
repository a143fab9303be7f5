"""Losses for referring segmentation logits.

Axis legend: b batch, h w logit grid, H W target grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_rank, check_tensor

__all__ = ["mask_bce_loss", "soft_dice_loss", "resize_target"]


def resize_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a binary target ``(b H W)`` or ``(b 1 H W)`` to ``(b 1 h w)`` with nearest sampling."""
    check_tensor("target", target)
    if target.dim() == 3:
        target = target.unsqueeze(1)
    check_rank("target", target, "b 1 H W")
    if target.shape[1] != 1:
        raise ValueError(f"target must have shape (b H W) or (b 1 H W), got {tuple(target.shape)}")
    target = target.float()
    if tuple(target.shape[-2:]) != tuple(size):
        target = F.interpolate(target, size=size, mode="nearest")
    return target


def mask_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, upsample_logits: bool = False) -> torch.Tensor:
    """Binary cross-entropy with logits against the mask (EAVL's loss).

    Two ways to bring the stride-4 logits and the input-size mask together:

    - ``upsample_logits=False`` (CRIS's, the default): the target is resized to the logits
      with nearest sampling. Nearest downsampling by 4 reads the *top-left* pixel of each
      4 x 4 cell, while the evaluation (bilinear upsampling, ``align_corners=False``) places a
      logit at the cell's *centre*: a mask learned this way lands 1.5 input pixels below and
      right of the object. On small objects this caps the IoU (the synthetic set at 128 px: a
      model that learned this target perfectly scores 70.1 mIoU, Pr@0.9 0.0, by
      ``python benchmarks/mask_ceiling.py --strides 4 --sampling area nearest``;
      docs/training.md, "The target's half-cell shift").
    - ``upsample_logits=True`` (LAVT's): the logits are upsampled bilinearly
      (``align_corners=False``) to the target's size, exactly as the evaluation reads them,
      and the loss is taken there.

    Args:
        logits: ``(b 1 h w)`` predicted logits.
        target: ``(b H W)`` or ``(b 1 H W)`` binary mask (bool or float in {0, 1}).
        upsample_logits: see above.

    Returns:
        The mean loss, a scalar tensor (float32 even for half-precision logits).
    """
    logits, target = _bring_together(logits, target, upsample_logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def _bring_together(
    logits: torch.Tensor, target: torch.Tensor, upsample_logits: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b 1 h w)`` logits and ``(b [1] H W)`` target -> float32 pair of one size (see :func:`mask_bce_loss`)."""
    check_rank("logits", logits, "b 1 h w")
    if logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (b 1 h w), got {tuple(logits.shape)}")
    if upsample_logits:
        check_tensor("target", target)
        target = resize_target(target, tuple(target.shape[-2:]))  # checked, (b 1 H W) float, not resized
        logits = logits.float()
        if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    else:
        target = resize_target(target, tuple(logits.shape[-2:]))
        logits = logits.float()
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"batch sizes must match, got logits: {logits.shape[0]}, target: {target.shape[0]}"
        )
    return logits, target.to(logits.device)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0, upsample_logits: bool = False
) -> torch.Tensor:
    """``1 - Dice`` of ``sigmoid(logits)`` and the target, averaged over the batch.

    Not in the paper (BCE only): an option for short runs, where BCE alone first learns to
    predict background everywhere (the referred object covers a few percent of the pixels)
    and Dice, which only counts the object, pulls the foreground in from the first steps.

    Args:
        logits: ``(b 1 h w)`` predicted logits.
        target: ``(b H W)`` or ``(b 1 H W)`` binary mask, resized to ``h x w`` (nearest).
        eps: smoothing added to both sides of the ratio (an empty target and an empty
            prediction then give a loss near 0).
        upsample_logits: take the loss at the target's size instead, the logits upsampled
            bilinearly (see :func:`mask_bce_loss`).

    Returns:
        scalar tensor (float32).
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (b 1 h w), got {tuple(logits.shape)}")
    logits, target = _bring_together(logits, target, upsample_logits)
    prob = torch.sigmoid(logits).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    dice = (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)
    return (1 - dice).mean()
