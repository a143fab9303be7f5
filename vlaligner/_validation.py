"""Input checks shared by the aligner modules.

Each check raises a ``ValueError`` or ``TypeError`` that names the expected einops pattern
and the shape (or type) actually received, so that a user's mistake never surfaces as a
broadcasting surprise or a traceback deep inside torch.
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence

import torch

__all__ = [
    "check_probability",
    "check_tensor",
    "check_rank",
    "check_dim",
    "check_floating",
    "check_nonempty",
    "check_like",
    "check_input",
    "check_bool_mask",
    "check_same_batch",
    "reference_parameter",
]


def check_probability(name: str, value: object) -> float:
    """``value`` as a float strictly between 0 and 1, else TypeError / ValueError naming ``name``.

    Real numbers of any kind pass (Python, NumPy and 0-d torch scalars); bools and strings do not.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a probability in (0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 < float(value) < 1.0:  # also refuses nan
        raise ValueError(f"{name} must be a probability in (0, 1), got {value!r}")
    return float(value)


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
        hint = " (a bool mask?)" if value.dtype == torch.bool else " (convert with .float())"
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}{hint}")


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


def check_nonempty(name: str, value: torch.Tensor, pattern: str) -> None:
    """Check that no axis of ``value`` is empty (zero queries, zero words, an empty map...).

    An empty axis would not fail in torch: zero queries give a constant mask, zero words
    all-zero queries. Raises ``ValueError`` naming the empty axis.
    """
    axes = pattern.split()
    empty = [axes[i] if i < len(axes) else str(i) for i, s in enumerate(value.shape) if s == 0]
    if empty:
        raise ValueError(
            f"{name} must have shape ({pattern}) with every axis at least 1, got shape "
            f"{tuple(value.shape)} (empty: {', '.join(a + ' = 0' for a in empty)})"
        )


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument and only reports CUDA
        return torch.is_autocast_enabled()


def reference_parameter(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """The first floating-point parameter (or buffer) of ``module``: its dtype and device."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor
    for tensor in module.buffers():
        if tensor.is_floating_point():
            return tensor
    return None


def check_like(name: str, value: torch.Tensor, reference: Optional[torch.Tensor], owner: str) -> None:
    """Check that ``value`` sits on ``reference``'s device and, outside autocast, has its dtype.

    ``owner`` names what ``reference`` belongs to (e.g. "the module's weights", "features").
    A float64 input into float32 weights, or a CPU tensor into a CUDA model, would otherwise
    fail deep inside torch.
    """
    if reference is None:
        return
    if value.device != reference.device:
        raise ValueError(
            f"{name} must be on the device of {owner} ({reference.device}), got a tensor on "
            f"{value.device}; move it with .to({str(reference.device)!r})"
        )
    if value.dtype != reference.dtype and not _autocast_on(value.device.type):
        raise TypeError(
            f"{name} must have the dtype of {owner} ({reference.dtype}) outside torch.autocast, "
            f"got dtype {value.dtype}; convert it with .to({reference.dtype}) (or run under "
            "torch.autocast for mixed precision)"
        )


def check_input(
    name: str,
    value: object,
    pattern: str,
    *,
    sizes: Optional[Dict[int, int]] = None,
    module: Optional[torch.nn.Module] = None,
    like: Optional[torch.Tensor] = None,
    like_name: str = "",
) -> torch.Tensor:
    """All checks of one floating-point input of a public entry point, in a fixed order.

    Type (a tensor), rank (``pattern``), dtype (floating point), no empty axis, the fixed
    axis sizes ``{axis: size}``, then the device and dtype of ``module``'s weights (or of
    the tensor ``like``, named ``like_name``). Each failure names ``name``, what was
    expected and what was received.
    """
    check_tensor(name, value)
    assert isinstance(value, torch.Tensor)
    check_rank(name, value, pattern)
    check_floating(name, value)
    check_nonempty(name, value, pattern)
    for axis, expected in (sizes or {}).items():
        check_dim(name, value, pattern, axis, expected)
    if module is not None:
        check_like(name, value, reference_parameter(module), f"the {type(module).__name__}'s weights")
    if like is not None:
        check_like(name, value, like, like_name or "the other inputs")
    return value
