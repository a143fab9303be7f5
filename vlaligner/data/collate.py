"""Batch the sample dicts of :class:`vlaligner.data.RefDataset` for a DataLoader.

Axis legend: b batch, c channels, h w space (input size), H W space (original size),
l words.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils.data

__all__ = ["collate_ref_batch", "LIST_KEYS", "PAD_KEYS"]

# Original-size masks differ in size from image to image; strings cannot be stacked.
LIST_KEYS = frozenset({"orig_mask", "sentence", "file_name"})
# Token sequences from a tokenizer that does not pad to max_length are right-padded with 0
# (0 = padding in attention_mask; the id under a 0 in the attention mask is never read).
PAD_KEYS = frozenset({"input_ids", "attention_mask"})


def _stack(values: list) -> torch.Tensor:
    """``torch.stack``, written straight into shared memory inside a DataLoader worker.

    Without this the batch is copied once more when it is sent to the main process (what
    torch's default_collate avoids the same way); at 480 x 480 that is 22 MB per batch of 8.
    """
    if torch.utils.data.get_worker_info() is not None and values[0].device.type == "cpu":
        numel = sum(v.numel() for v in values)
        storage = values[0].untyped_storage()._new_shared(numel * values[0].element_size())
        out = values[0].new_empty(0).set_(storage).view(-1)[:numel].view(len(values), *values[0].shape)
        return torch.stack(values, out=out)
    return torch.stack(values)


def collate_ref_batch(samples: Sequence[dict]) -> dict[str, Any]:
    """Stack a list of sample dicts into one batch dict.

    - tensors of equal shape are stacked: ``image (b 3 h w)``, ``mask (b h w)``,
      ``input_ids (b l)``, ``attention_mask (b l)``, ``orig_size (b 2)``;
    - ``input_ids`` / ``attention_mask`` of different lengths are right-padded with 0;
    - ``orig_mask`` (``(H W)`` each), ``sentence`` and ``file_name`` stay lists, as does any
      other tensor whose shape differs between samples or any non-numeric value;
    - ints (``ref_id``, ``ann_id``, ``sent_id``, ``image_id``, ``num_targets``) become ``(b)``
      LongTensors, floats ``(b)`` float32 tensors, bools (``no_target``) ``(b)`` bool tensors;
    - lists (gRefCOCO's ``ann_ids``, one list of ids per sample) stay a list of lists.

    Raises:
        ValueError: empty batch, or samples with different keys.
        TypeError: a sample is not a dict.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty batch")
    for s in samples:
        if not isinstance(s, dict):
            raise TypeError(f"every sample must be a dict, got {type(s).__name__}")
    keys = list(samples[0].keys())
    for i, s in enumerate(samples[1:], start=1):
        if set(s.keys()) != set(keys):
            raise ValueError(
                f"sample {i} has keys {sorted(s.keys())}, but sample 0 has {sorted(keys)}"
            )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if key in LIST_KEYS:
            batch[key] = values
        elif all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                batch[key] = _stack(values)
            elif key in PAD_KEYS and all(v.ndim == 1 for v in values):
                length = max(v.shape[0] for v in values)
                out = values[0].new_zeros((len(values), length))
                for i, v in enumerate(values):
                    out[i, : v.shape[0]] = v
                batch[key] = out
            else:
                batch[key] = values
        elif all(isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif all(isinstance(v, float) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch
