"""Evaluate a generalized (gRefCOCO) model on a data loader: gIoU, cIoU, Pr@X, N-acc, T-acc.

Axis legend: b batch, S the square input side, H W the original image size.

The masks are made as the classic evaluation makes them (logits upsampled bilinearly to the
input size, then to each image's original size, then thresholded), and passed to
:class:`vlaligner.gres_metrics.GRESMetricAccumulator` *with* the no-target flag, as ReLA's
evaluator expects (the mask is not blanked when "no target" is predicted).

Beside ReLA's metrics, :func:`gres_evaluate` splits gIoU by the number of objects a sentence
refers to (``gIoU-single``: exactly one, ``gIoU-multi``: two or more; the no-target share is
N-acc), so that the cost of the generalized task on classic single-target sentences shows.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .gres_metrics import GRESMetricAccumulator
from .metrics import sum_over_processes

__all__ = ["gres_predict", "gres_evaluate"]


def gres_predict(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    *,
    device: Union[str, torch.device] = "cpu",
    threshold: float = 0.5,
    no_target_threshold: float = 0.5,
    at_original_size: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Masks and no-target answers for a collated batch.

    Args:
        model: an EAVL with a no-target head (``out.no_target_logits`` not None).
        batch: ``image (b 3 S S)``, ``input_ids (b l)``, ``attention_mask (b l)`` and, with
            ``at_original_size``, ``orig_size (b 2)``.
        threshold: mask probability threshold.
        no_target_threshold: no-target probability threshold.

    Returns:
        ``b`` bool masks on CPU (``(H W)`` each, or ``(S S)``), and ``(b)`` bool no-target
        answers on CPU.

    Raises:
        ValueError: a model without a no-target head, or thresholds outside (0, 1).
    """
    for name, value in (("threshold", threshold), ("no_target_threshold", no_target_threshold)):
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"{name} must be a probability in (0, 1), got {value}")
    device = torch.device(device)
    images = batch["image"].to(device)
    with torch.no_grad():
        out = model(images, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    if getattr(out, "no_target_logits", None) is None:
        raise ValueError(
            "the model has no no-target head (out.no_target_logits is None): build it with "
            "EAVL(..., no_target_head=NoTargetHead(...)) to evaluate on gRefCOCO"
        )
    pred_nt = (out.no_target_logits.float() > math.log(no_target_threshold / (1 - no_target_threshold))).cpu()
    logits = F.interpolate(out.logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    cut = math.log(threshold / (1.0 - threshold))  # sigmoid(x) > t  <=>  x > logit(t)
    if not at_original_size:
        return list((logits[:, 0] > cut).cpu()), pred_nt
    masks = []
    for i in range(logits.shape[0]):
        h, w = (int(v) for v in batch["orig_size"][i])
        resized = F.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
        masks.append((resized[0, 0] > cut).cpu())
    return masks, pred_nt


@torch.no_grad()
def gres_evaluate(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    device: Union[str, torch.device] = "cpu",
    threshold: float = 0.5,
    no_target_threshold: float = 0.5,
    at_original_size: bool = True,
    accumulator: Optional[GRESMetricAccumulator] = None,
) -> dict[str, float]:
    """gIoU, cIoU, Pr@0.7-0.9, N-acc and T-acc (percent) of ``model`` over ``loader``.

    ``loader`` yields :func:`vlaligner.data.collate_ref_batch` batches of a gRefCOCO
    ``RefDataset`` (``orig_mask`` / ``mask``, ``no_target`` and ``num_targets``). The model is
    put in eval mode and left there. With ``torch.distributed`` initialised, the sums are
    all-reduced. Returns the metrics plus ``"gIoU-single"`` and ``"gIoU-multi"`` (gIoU over
    the sentences that refer to exactly one object, and to two or more; nan when there are
    none or the batches carry no ``num_targets``) and ``"num_samples"``.
    """
    model.eval()
    acc = accumulator if accumulator is not None else GRESMetricAccumulator()
    # [IoU sum, count] of single-target sentences, then of multi-target ones
    by_count = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        masks, pred_nt = gres_predict(
            model, batch, device=device, threshold=threshold,
            no_target_threshold=no_target_threshold, at_original_size=at_original_size,
        )
        if at_original_size:
            targets = [m.bool() for m in batch["orig_mask"]]
        else:
            targets = [m > 0.5 for m in batch["mask"]]
        iou = acc.update(masks, targets, pred_nt, batch["no_target"].cpu())
        if "num_targets" in batch:
            counts = torch.as_tensor(batch["num_targets"]).cpu()
            single, multi = counts == 1, counts >= 2
            by_count += torch.stack([iou[single].sum(), single.sum(), iou[multi].sum(), multi.sum()]).double()
    acc.all_reduce()
    summed = sum_over_processes(by_count)
    if summed is not None:
        by_count = summed
    result = acc.compute()
    for key, (total, n) in (("gIoU-single", by_count[:2]), ("gIoU-multi", by_count[2:])):
        result[key] = 100.0 * float(total) / float(n) if n > 0 else math.nan
    result["num_samples"] = float(acc.count)
    return result
