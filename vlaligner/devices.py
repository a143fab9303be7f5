"""Choosing the device and the GPU math settings (torch only).

Axes: none (no tensors here).

``resolve_device("auto")`` picks CUDA, then Apple MPS, then the CPU. ``enable_tf32`` lets
float32 matrix multiplications and cuDNN convolutions run on the TensorFloat-32 tensor cores
of NVIDIA GPUs from Ampere (compute capability 8.0) on: about 10 bits of mantissa in the
products, float32 range and accumulation, several times the float32 throughput. The
predictor turns it on for CUDA unless asked not to (``Predictor(..., tf32=False)``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["resolve_device", "mps_available", "tf32_supported", "enable_tf32"]

#: The first CUDA compute capability (major) with TensorFloat-32 tensor cores (Ampere).
TF32_MIN_CAPABILITY = 8


def mps_available() -> bool:
    """Whether Apple's Metal backend (MPS) is usable in this torch build on this machine."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'cpu', 'cuda', 'cuda:N', 'mps', 'auto' / None (CUDA, then MPS, then CPU) or a torch.device.

    Raises:
        TypeError: not a str or torch.device.
        ValueError: an unknown name, or an accelerator that this machine does not have.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but CUDA is not available on this machine "
                f"(torch.cuda.is_available() is False); use device 'cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist"
            )
    elif dev.type == "mps":
        if not mps_available():
            raise ValueError(
                f"device {device!r} was requested but MPS is not available on this machine; "
                f"use device 'cpu' or 'auto'"
            )
    elif dev.type != "cpu":
        raise ValueError(
            f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"
        )
    return dev


def tf32_supported(device: Union[str, torch.device, None] = None) -> bool:
    """Whether the CUDA device (default: the current one) has TensorFloat-32 tensor cores.

    False without CUDA or for a non-CUDA ``device``.
    """
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    index: Optional[int] = None if device is None else torch.device(device).index
    major, _ = torch.cuda.get_device_capability(index)
    return major >= TF32_MIN_CAPABILITY


def enable_tf32(enabled: bool = True, device: Union[str, torch.device, None] = None) -> bool:
    """Allow (or forbid) TF32 for float32 matmuls and cuDNN convolutions.

    The switches are process-wide (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32`` and ``torch.set_float32_matmul_precision``). With
    ``enabled=True`` they are set only when ``device`` (default: the current CUDA device)
    supports TF32, so a CPU-only run or an older GPU is left exactly as it was;
    ``enabled=False`` always restores full float32 ("highest").

    Returns:
        Whether TF32 is now on.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if enabled and not tf32_supported(device):
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return enabled
