"""Losses for referring segmentation logits.

Axis legend: b batch, h w logit grid, H W target grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_rank, check_tensor

__all__ = ["mask_bce_loss", "resize_target"]


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
