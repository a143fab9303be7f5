"""Referring-segmentation evaluation of a model on a loader: masks, metrics, tables.

Axis legend: b batch, l words, S input size (square), h w logit grid (S / 4), H W original
image size.

Predictions are compared at the original image size (CRIS, VLT) or at the input size
(LAVT); metric sums are all-reduced across processes, so every process returns the metrics
of the whole split.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import METRIC_KEYS, RISMetricAccumulator
from .distributed import dist_ready, unwrap_model

__all__ = ["predict_masks", "evaluate", "format_metrics_table", "DIVERSITY_KEYS", "GRES_KEYS"]

#: The columns of the evaluation table on a generalized data set (ReLA's metrics, then gIoU
#: over single- and multi-target sentences; percent).
GRES_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9", "gIoU-single", "gIoU-multi")

#: The query-diversity columns ``evaluate(query_diversity=True)`` adds (means over samples).
DIVERSITY_KEYS = ("query_mask_iou", "score_spread", "score_entropy", "attention_entropy", "attention_distance")


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def predict_masks(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    device: Union[str, torch.device],
    at_original_size: bool = True,
    threshold: float = 0.5,
    amp_dtype: Optional[torch.dtype] = None,
    outputs: Optional[list] = None,
    query_diversity: bool = False,
) -> list[torch.Tensor]:
    """Binary masks predicted for a collated batch, on CPU.

    The logits ``(b 1 h w)`` are upsampled (bilinear) to the input size ``S x S``; with
    ``at_original_size`` each is then resized to its image's original ``H x W`` (from
    ``batch["orig_size"]``) before thresholding the probability at ``threshold``.

    Args:
        batch: ``image (b 3 S S)``, ``input_ids (b l)``, ``attention_mask (b l)``,
            ``orig_size (b 2)`` (needed with ``at_original_size``).

        outputs: a list the model's raw output is appended to (for query diversity).
        query_diversity: also ask the model for its per-query masks and word attention.

    Returns:
        ``b`` bool tensors, ``(H W)`` each, or ``(S S)`` each without ``at_original_size``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    device = torch.device(device)
    images = batch["image"].to(device, non_blocking=True)
    if images.dim() != 4:
        raise ValueError(f"batch['image'] must have shape (b 3 S S), got {tuple(images.shape)}")
    extra = dict(return_query_masks=True, return_word_attention=True) if query_diversity else {}
    with _autocast(device, amp_dtype):
        out = model(images, batch["input_ids"].to(device), batch["attention_mask"].to(device), **extra)
    if outputs is not None:
        outputs.append(out)
    logits = out.logits if hasattr(out, "logits") else out
    logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    # sigmoid(x) > t  <=>  x > log(t / (1 - t)); avoids a sigmoid over every pixel.
    cut = math.log(threshold / (1.0 - threshold))
    if not at_original_size:
        return list((logits[:, 0] > cut).cpu())
    sizes = batch["orig_size"]
    masks = []
    for i in range(logits.shape[0]):
        h, w = (int(v) for v in sizes[i])
        resized = F.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
        masks.append((resized[0, 0] > cut).cpu())
    return masks


def _targets(batch: Mapping[str, Any], at_original_size: bool) -> list[torch.Tensor]:
    if at_original_size:
        return [torch.as_tensor(m).bool() for m in batch["orig_mask"]]
    return list(batch["mask"] > 0.5)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    device: Union[str, torch.device],
    at_original_size: bool = True,
    threshold: float = 0.5,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    description: str = "eval",
    query_diversity: bool = False,
) -> dict:
    """oIoU, mIoU and Pr@0.5-0.9 (percent) of ``model`` over ``loader``, summed over processes.

    In a distributed run each process should see a disjoint share of the split (e.g. with
    ``ShardedSampler(shuffle=False)``); the metric sums are all-reduced, so every process
    returns the metrics of the whole split. The model's training mode and the global RNG
    states are restored afterwards, so evaluating never changes a training run's course.

    With ``query_diversity`` (models whose forward takes ``return_query_masks`` and
    ``return_word_attention``, i.e. EAVL with the aligner head) the means over samples of
    :mod:`vlaligner.query_diversity`'s measures are added under :data:`DIVERSITY_KEYS`;
    models without per-query outputs just skip them.

    Returns:
        ``{"oIoU": ..., "mIoU": ..., "Pr@0.5": ..., ..., "Pr@0.9": ..., "num_samples": n}``.
    """
    from ..query_diversity import (
        attention_distance, attention_entropy, pairwise_mask_iou, score_entropy, score_spread,
    )


    device = torch.device(device)
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    accumulator = RISMetricAccumulator()
    diversity = {k: [] for k in DIVERSITY_KEYS}
    query_diversity = query_diversity and _has_query_outputs(bare)
    rank = torch.distributed.get_rank() if dist_ready() else 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            for batch in loader:
                outputs: list = []
                preds = predict_masks(
                    bare, batch, device=device, at_original_size=at_original_size,
                    threshold=threshold, amp_dtype=amp_dtype, outputs=outputs,
                    query_diversity=query_diversity,
                )
                accumulator.update(preds, _targets(batch, at_original_size))
                out = outputs[0]
                if query_diversity and getattr(out, "query_masks", None) is not None:
                    word_mask = batch["attention_mask"].bool()
                    diversity["query_mask_iou"].append(pairwise_mask_iou(out.query_masks.float()))
                    diversity["score_spread"].append(score_spread(out.query_scores))
                    diversity["score_entropy"].append(score_entropy(out.query_scores))
                    diversity["attention_entropy"].append(attention_entropy(out.word_attention.cpu(), word_mask).mean(-1))
                    diversity["attention_distance"].append(attention_distance(out.word_attention))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        bare.train(was_training)
    accumulator.all_reduce()
    metrics = dict(accumulator.compute())
    for key, values in diversity.items():
        if values:  # per-process means (the diversity measures are not all-reduced)
            metrics[key] = float(torch.cat(values).float().nanmean())
    metrics["num_samples"] = accumulator.count
    return metrics


def _has_query_outputs(model: nn.Module) -> bool:
    """Whether ``model`` is an EAVL-like model whose head makes per-query masks."""
    head = getattr(model, "head", None)
    return head is not None and hasattr(head, "mask_generator") and hasattr(model, "query_generator")


def format_metrics_table(results: Mapping[str, Mapping[str, float]], keys: Optional[Sequence[str]] = None) -> str:
    """A plain-text table: one row per split, columns ``keys`` (default oIoU, mIoU, Pr@0.5-0.9; percent)."""
    keys = list(METRIC_KEYS if keys is None else keys)
    width = max([5] + [len(s) for s in results])
    widths = [max(7, len(k)) for k in keys]
    header = f"{'split':<{width}} " + " ".join(f"{k:>{w}}" for k, w in zip(keys, widths))
    lines = [header, "-" * len(header)]
    for split, metrics in results.items():
        cells = []
        for k, w in zip(keys, widths):
            value = metrics.get(k)
            cells.append(f"{value:{w}.2f}" if isinstance(value, (int, float)) else f"{'-':>{w}}")
        lines.append(f"{split:<{width}} " + " ".join(cells))
    return "\n".join(lines)
