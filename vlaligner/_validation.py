"""Input checks shared by the aligner modules.

Each check raises a ``ValueError`` or ``TypeError`` that names the expected einops pattern
and the shape (or type) actually received, so that a user's mistake never surfaces as a
broadcasting surprise or a traceback deep inside torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["check_tensor", "check_rank", "check_dim", "check_bool_mask", "check_same_batch"]


def check_tensor(name: str, value: object) -> torch.Tensor:
    """Return ``value`` if it is a tensor, else raise ``TypeError`` naming its type."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_rank(name: str, value: torch.Tensor, pattern: str) -> torch.Tensor:
    """Check that ``value`` has as many dimensions as ``pattern`` has axes.

    ``pattern`` is an einops-style string such as ``"b c h w"``.
    """
    check_tensor(name, value)
    rank = len(pattern.split())
    if value.dim() != rank:
        raise ValueError(
            f"{name} must have shape ({pattern}) with {rank} dimensions, "
            f"got shape {tuple(value.shape)}"
        )
    return value


def check_dim(name: str, value: torch.Tensor, pattern: str, axis: int, expected: int) -> None:
    """Check the size of one axis of ``value`` (already rank-checked against ``pattern``)."""
    if value.shape[axis] != expected:
        axis_name = pattern.split()[axis]
        raise ValueError(
            f"{name} must have shape ({pattern}) with {axis_name} = {expected}, "
            f"got shape {tuple(value.shape)}"
        )


def check_floating(name: str, value: torch.Tensor) -> None:
    """Check that ``value`` holds floating-point numbers."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_bool_mask(name: str, mask: object, shape: Sequence[int], pattern: str) -> torch.Tensor:
    """Check a boolean padding mask of exactly ``shape`` (no broadcasting)."""
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor of shape ({pattern}) with True for real entries, "
            f"got dtype {mask.dtype}"
        )
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape ({pattern}) = {tuple(shape)}, got shape {tuple(mask.shape)}"
        )
    return mask


def check_same_batch(**tensors: Optional[torch.Tensor]) -> None:
    """Check that every given tensor has the same leading (batch) size."""
    sizes = {name: t.shape[0] for name, t in tensors.items() if t is not None}
    # Compared pairwise, not through a set: under torch.export / torch.compile with dynamic
    # shapes the sizes are symbolic ints, which compare (adding a guard) but do not hash.
    first = next(iter(sizes.values()), None)
    if any(size != first for size in sizes.values()):
        listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(f"batch sizes must match, got {listed}")
