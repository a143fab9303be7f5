"""Evaluate a generalized (gRefCOCO) model on a data loader: gIoU, cIoU, Pr@X, N-acc, T-acc.

Axis legend: b batch, S the square input side, H W the original image size.

The masks are made as the classic evaluation makes them (logits upsampled bilinearly to the
input size, then to each image's original size, then thresholded), and passed to
:class:`vlaligner.gres_metrics.GRESMetricAccumulator` *with* the no-target flag, as ReLA's
evaluator expects (the mask is not blanked when "no target" is predicted).

Beside ReLA's metrics, :func:`gres_evaluate` splits gIoU by the number of objects a sentence
refers to (``gIoU-single``: exactly one, ``gIoU-multi``: two or more; the no-target share is
N-acc), so that the cost of the generalized task on classic single-target sentences shows,
and, with ``choose_no_target_threshold=True``, chooses this split's balanced no-target
threshold (:mod:`vlaligner.no_target_threshold`) and scores it.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from ._validation import check_probability
from .gres_metrics import GRESMetricAccumulator
from .metrics import intersection_union, sum_over_processes
from .no_target_threshold import balanced_no_target_threshold, gres_scores_at_thresholds

__all__ = ["gres_predict", "gres_evaluate", "BALANCED_KEYS"]

#: Keys :func:`gres_evaluate` adds with ``choose_no_target_threshold=True``: the threshold
#: (a probability, not a percentage) and gIoU / N-acc / T-acc (percent) at it.
BALANCED_KEYS: tuple[str, ...] = ("balanced_threshold", "gIoU@balanced", "N-acc@balanced", "T-acc@balanced")


def _masks_and_no_target_probability(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    device: torch.device,
    threshold: float,
    at_original_size: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``b`` bool masks on CPU and the ``(b)`` float32 no-target probabilities on CPU."""
    images = batch["image"].to(device)
    with torch.no_grad():
        out = model(images, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    if getattr(out, "no_target_logits", None) is None:
        raise ValueError(
            "the model has no no-target head (out.no_target_logits is None): build it with "
            "EAVL(..., no_target_head=NoTargetHead(...)) to evaluate on gRefCOCO"
        )
    probability = torch.sigmoid(out.no_target_logits.float()).cpu()
    logits = F.interpolate(out.logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    cut = math.log(threshold / (1.0 - threshold))  # sigmoid(x) > t  <=>  x > logit(t)
    if not at_original_size:
        return list((logits[:, 0] > cut).cpu()), probability
    masks = []
    for i in range(logits.shape[0]):
        h, w = (int(v) for v in batch["orig_size"][i])
        resized = F.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
        masks.append((resized[0, 0] > cut).cpu())
    return masks, probability


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
        no_target_threshold: no-target probability threshold (``p > no_target_threshold``
            answers "no target").

    Returns:
        ``b`` bool masks on CPU (``(H W)`` each, or ``(S S)``), and ``(b)`` bool no-target
        answers on CPU.

    Raises:
        ValueError: a model without a no-target head, or thresholds outside (0, 1).
    """
    check_probability("threshold", threshold)
    check_probability("no_target_threshold", no_target_threshold)
    masks, probability = _masks_and_no_target_probability(
        model, batch, torch.device(device), float(threshold), at_original_size
    )
    return masks, probability.double() > float(no_target_threshold)


def _gather_samples(values: torch.Tensor) -> torch.Tensor:
    """``values`` (s k) of every process, concatenated (this process's alone without distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return torch.cat(gathered)


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
    choose_no_target_threshold: bool = False,
) -> dict[str, float]:
    """gIoU, cIoU, Pr@0.7-0.9, N-acc and T-acc (percent) of ``model`` over ``loader``.

    ``loader`` yields :func:`vlaligner.data.collate_ref_batch` batches of a gRefCOCO
    ``RefDataset`` (``orig_mask`` / ``mask``, ``no_target`` and ``num_targets``). The model is
    put in eval mode and left there. With ``torch.distributed`` initialised, the sums are
    all-reduced. Returns the metrics at ``no_target_threshold`` plus ``"gIoU-single"`` and
    ``"gIoU-multi"`` (gIoU over the sentences that refer to exactly one object, and to two or
    more; nan when there are none or the batches carry no ``num_targets``) and
    ``"num_samples"``.

    With ``choose_no_target_threshold``, also :data:`BALANCED_KEYS`: the threshold that
    maximises ``(N-acc + T-acc) / 2`` on this split
    (:func:`vlaligner.no_target_threshold.balanced_no_target_threshold`) and gIoU, N-acc,
    T-acc at it; nan for all four when the split lacks no-target or targeted samples. Choose
    it on val, report the other splits with it.
    """
    check_probability("threshold", threshold)
    check_probability("no_target_threshold", no_target_threshold)
    device = torch.device(device)
    model.eval()
    acc = accumulator if accumulator is not None else GRESMetricAccumulator()
    # [IoU sum, count] of single-target sentences, then of multi-target ones
    by_count = torch.zeros(4, dtype=torch.float64)
    samples = []  # (probability, no_target, mask IoU) per sample, for the threshold choice
    for batch in loader:
        masks, probability = _masks_and_no_target_probability(model, batch, device, float(threshold), at_original_size)
        pred_nt = probability.double() > float(no_target_threshold)
        if at_original_size:
            targets = [m.bool() for m in batch["orig_mask"]]
        else:
            targets = [m > 0.5 for m in batch["mask"]]
        flags = batch["no_target"].cpu()
        iou = acc.update(masks, targets, pred_nt, flags)
        if choose_no_target_threshold:
            inter, union = intersection_union(masks, targets)
            raw_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))  # ReLA: U = 0 -> 0
            samples.append(torch.stack([probability.double(), flags.double(), raw_iou], dim=1))
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
    if choose_no_target_threshold:
        result.update(_balanced_scores(_gather_samples(torch.cat(samples) if samples else torch.zeros(0, 3))))
    return result


def _balanced_scores(samples: torch.Tensor) -> dict[str, float]:
    """:data:`BALANCED_KEYS` from ``(s 3)`` rows of (probability, no_target, mask IoU)."""
    flags = samples[:, 1] > 0.5
    if samples.shape[0] == 0 or flags.all() or not flags.any():
        return {key: math.nan for key in BALANCED_KEYS}
    chosen = balanced_no_target_threshold(samples[:, 0], flags)
    scores = gres_scores_at_thresholds(samples[:, 0], flags, samples[:, 2], [chosen.threshold])
    return {
        "balanced_threshold": chosen.threshold,
        "gIoU@balanced": float(scores["gIoU"][0]),
        "N-acc@balanced": chosen.n_acc,
        "T-acc@balanced": chosen.t_acc,
    }
