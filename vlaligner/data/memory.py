"""What ``RefDataset(cache=True)`` would keep in memory, and what the machine has free.

The sample cache is meant for small sets (the demo's train and val splits, 640 synthetic
images at 128 px, take 225 MiB). On a real set it would fill the memory partway through the
first epoch; ``RefDataset`` asks these functions first and refuses with
``SampleCacheTooLarge`` instead.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

__all__ = [
    "SampleCacheTooLarge", "sample_cache_bytes", "available_memory_bytes", "CACHE_MEMORY_FRACTION", "format_bytes",
]

#: The sample cache may take at most this share of the memory free when the data set is made
#: (the model, the optimizer and the loader need the rest).
CACHE_MEMORY_FRACTION = 0.5


class SampleCacheTooLarge(ValueError):
    """``cache=True`` on a set whose preprocessed samples would not fit in memory."""


def sample_cache_bytes(
    num_images: int, img_size: int, mask_sizes: Iterable[Tuple[int, int]], num_sentences: int, max_length: int
) -> int:
    """Bytes the sample cache holds once every sample has been read.

    Args:
        num_images: distinct images of the split; each is kept as ``(3 S S)`` float32.
        img_size: ``S``, the side of the model input.
        mask_sizes: ``(H, W)`` of each ref's image; each ref keeps its ``(H W)`` bool mask and
            its ``(S S)`` bool resized mask.
        num_sentences: distinct sentences; each keeps ``(l)`` int64 ids and attention mask.
        max_length: ``l``, tokens per sentence.

    Returns:
        the total in bytes (tensor payloads only; Python's per-object overhead is not counted).
    """
    image = 3 * img_size * img_size * 4
    resized_mask = img_size * img_size
    masks = sum(int(h) * int(w) + resized_mask for h, w in mask_sizes)
    tokens = num_sentences * max_length * 8 * 2
    return num_images * image + masks + tokens


def available_memory_bytes() -> Optional[int]:
    """Memory the system can give this process now (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes for a message: ``"812 B"``, ``"3.4 MiB"``, ``"41.2 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
