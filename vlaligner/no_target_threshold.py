"""Choosing the no-target threshold on a validation split (generalized referring segmentation).

Axis legend: s samples, g candidate thresholds.

A model with a no-target head answers "nothing is referred to" when
``sigmoid(no_target_logit) > P``. P = 0.5 is right only when the probabilities are
calibrated, and a head trained on a set with about 10 % no-target sentences that it fits
almost perfectly is not: on held-out sentences it is over-confident that a target exists,
so N-acc falls while T-acc rises (docs/generalized.md, "The no-target threshold").

:func:`balanced_no_target_threshold` chooses P on a validation split as the threshold that
maximises the **balanced accuracy** ``(N-acc + T-acc) / 2`` (the two classes weigh the same
whatever their shares; Youden's J up to a constant). Ties go to the highest P (the fewest
"no target" answers). The training scripts record it in each checkpoint of a generalized run
(``config.json``, key ``no_target_threshold``) and the predictor and ``evaluate.py`` use it
unless told otherwise. Choose it on val, then report the test splits with it.

:func:`gres_scores_at_thresholds` gives gIoU, N-acc and T-acc at many thresholds in one
batched op from per-sample values, exactly as :class:`vlaligner.gres_metrics.GRESMetricAccumulator`
scores one threshold (tested against it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "DEFAULT_THRESHOLD_GRID",
    "NoTargetThreshold",
    "balanced_no_target_threshold",
    "gres_scores_at_thresholds",
]

#: Candidate thresholds: 0.01, 0.02, ..., 0.99.
DEFAULT_THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 100))

Values = Union[torch.Tensor, Sequence[float], Sequence[bool]]


@dataclass(frozen=True)
class NoTargetThreshold:
    """A chosen no-target threshold and the accuracies (percent) it gives on the split it was chosen on."""

    threshold: float
    n_acc: float
    t_acc: float

    @property
    def balanced_accuracy(self) -> float:
        """``(N-acc + T-acc) / 2`` in percent."""
        return 0.5 * (self.n_acc + self.t_acc)


def _vector(name: str, values: Values, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) and dtype != torch.bool:
        try:  # Python floats stay float64 (a float32 0.3 is above the threshold 0.3)
            values = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be numbers, one per sample: {error}") from error
    tensor = torch.as_tensor(values)
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be one value per sample, shape (s), got shape {tuple(tensor.shape)}")
    if dtype == torch.bool:
        if tensor.dtype != torch.bool:
            raise TypeError(f"{name} must be bool (True = no target), got dtype {tensor.dtype}")
        return tensor.cpu()
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be numbers, got dtype {tensor.dtype}")
    tensor = tensor.detach().cpu().to(torch.float64)
    if not torch.isfinite(tensor).all() or (tensor < 0).any() or (tensor > 1).any():
        raise ValueError(f"{name} must be in [0, 1], got values from {float(tensor.min())} to {float(tensor.max())}")
    return tensor


def _grid(thresholds: Optional[Sequence[float]]) -> torch.Tensor:
    grid = torch.as_tensor(DEFAULT_THRESHOLD_GRID if thresholds is None else tuple(thresholds), dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() == 0 or not ((grid > 0) & (grid < 1)).all():
        raise ValueError(f"thresholds must be a non-empty sequence of numbers in (0, 1), got {thresholds!r}")
    return grid


def gres_scores_at_thresholds(
    no_target_probability: Values,
    no_target: Values,
    mask_iou: Values,
    thresholds: Optional[Sequence[float]] = None,
) -> dict[str, torch.Tensor]:
    """gIoU, N-acc and T-acc (percent) at each threshold, from per-sample values.

    Args:
        no_target_probability: ``(s)`` the model's no-target probabilities.
        no_target: ``(s)`` bool, True for the samples that refer to nothing.
        mask_iou: ``(s)`` IoU of each sample's thresholded mask with its target (any value
            for no-target samples; unused there).
        thresholds: ``(g)`` candidate thresholds in (0, 1) (default: 0.01 ... 0.99).

    Returns:
        ``{"threshold": (g), "gIoU": (g), "N-acc": (g), "T-acc": (g)}`` float64 tensors; an
        accuracy over an empty class is nan.
    """
    prob = _vector("no_target_probability", no_target_probability, torch.float64)
    flags = _vector("no_target", no_target, torch.bool)
    iou = _vector("mask_iou", mask_iou, torch.float64)
    if not prob.shape == flags.shape == iou.shape:
        raise ValueError(
            f"one value per sample in each: no_target_probability {tuple(prob.shape)}, no_target "
            f"{tuple(flags.shape)}, mask_iou {tuple(iou.shape)}"
        )
    if prob.numel() == 0:
        raise ValueError("no samples: the split is empty")
    grid = _grid(thresholds)
    says_none = prob[None, :] > grid[:, None]  # (g s)
    # gIoU term: a no-target sample counts 1 when answered "none"; a targeted one its mask IoU unless answered "none"
    term = torch.where(flags[None, :], says_none.double(), torch.where(says_none, 0.0, iou[None, :]))
    n_nt, n_t = int(flags.sum()), int((~flags).sum())
    n_acc = (says_none & flags).sum(dim=1).double() / n_nt * 100 if n_nt else torch.full_like(grid, float("nan"))
    t_acc = (~says_none & ~flags).sum(dim=1).double() / n_t * 100 if n_t else torch.full_like(grid, float("nan"))
    return {"threshold": grid, "gIoU": term.mean(dim=1) * 100, "N-acc": n_acc, "T-acc": t_acc}


def balanced_no_target_threshold(
    no_target_probability: Values,
    no_target: Values,
    thresholds: Optional[Sequence[float]] = None,
) -> NoTargetThreshold:
    """The threshold of ``thresholds`` that maximises ``(N-acc + T-acc) / 2``; ties: the highest.

    Args:
        no_target_probability: ``(s)`` no-target probabilities of a validation split.
        no_target: ``(s)`` bool, True for the samples that refer to nothing.
        thresholds: candidates in (0, 1) (default: 0.01 ... 0.99).

    Raises:
        ValueError: a split without no-target samples or without targeted ones (nothing to
            balance), or values outside [0, 1].
    """
    flags = _vector("no_target", no_target, torch.bool)
    n_nt, n_t = int(flags.sum()), int((~flags).sum())
    if n_nt == 0 or n_t == 0:
        raise ValueError(
            "choosing a no-target threshold needs both kinds of samples; the split has "
            f"{n_nt} no-target and {n_t} targeted samples"
        )
    scores = gres_scores_at_thresholds(no_target_probability, flags, torch.zeros(flags.shape[0]), thresholds)
    balanced = scores["N-acc"] + scores["T-acc"]
    best = float(balanced.max())
    # the highest threshold among the best (exact ties: the counts are integers over fixed totals)
    tied = torch.nonzero(balanced >= best - 1e-9).flatten()
    index = int(tied[scores["threshold"][tied].argmax()])
    return NoTargetThreshold(
        threshold=float(scores["threshold"][index]),
        n_acc=float(scores["N-acc"][index]),
        t_acc=float(scores["T-acc"][index]),
    )
