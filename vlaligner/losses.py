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


def mask_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits against the mask resized to the logits (EAVL's loss).

    Args:
        logits: ``(b 1 h w)`` predicted logits.
        target: ``(b H W)`` or ``(b 1 H W)`` binary mask (bool or float in {0, 1}); resized to
            ``h x w`` with nearest sampling, as CRIS does.

    Returns:
        The mean loss, a scalar tensor (float32 even for half-precision logits).
    """
    check_rank("logits", logits, "b 1 h w")
    if logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (b 1 h w), got {tuple(logits.shape)}")
    target = resize_target(target, tuple(logits.shape[-2:]))
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"batch sizes must match, got logits: {logits.shape[0]}, target: {target.shape[0]}"
        )
    return F.binary_cross_entropy_with_logits(logits.float(), target.to(logits.device))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """``1 - Dice`` of ``sigmoid(logits)`` and the target, averaged over the batch.

    Not in the paper (BCE only): an option for short runs, where BCE alone first learns to
    predict background everywhere (the referred object covers a few percent of the pixels)
    and Dice, which only counts the object, pulls the foreground in from the first steps.

    Args:
        logits: ``(b 1 h w)`` predicted logits.
        target: ``(b H W)`` or ``(b 1 H W)`` binary mask, resized to ``h x w`` (nearest).
        eps: smoothing added to both sides of the ratio (an empty target and an empty
            prediction then give a loss near 0).

    Returns:
        scalar tensor (float32).
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (b 1 h w), got {tuple(logits.shape)}")
    target = resize_target(target, tuple(logits.shape[-2:])).to(logits.device)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes must match, got logits: {logits.shape[0]}, target: {target.shape[0]}")
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    dice = (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)
    return (1 - dice).mean()
