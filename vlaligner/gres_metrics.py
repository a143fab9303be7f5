"""Generalized referring segmentation (GRES, gRefCOCO) metrics, exactly as ReLA's evaluator.

Axis legend: b batch (samples), h w space (any size; a prediction and its target must match).

ReLA (``gres_model/evaluation/refer_evaluation.py``) scores each sample i with the predicted
mask P_i, the ground truth G_i (empty for a no-target sample), the predicted no-target flag
p_i and the true one g_i. With I_i = |P_i ∩ G_i| and U_i = |P_i ∪ G_i|:

=====================================  ==========================  ===============  ====
case                                   IoU_i (for gIoU)            cIoU adds I / U  Pr@X
=====================================  ==========================  ===============  ====
no-target, predicted no-target (TP)    1                           0 / 0            no
no-target, predicted a target (FN)     0                           0 / U_i = |P_i|  no
target, predicted a target (TN)        I_i / U_i                   I_i / U_i        yes
target, predicted no-target (FP)       0 (I_i set to 0)            0 / U_i          yes
=====================================  ==========================  ===============  ====

    gIoU  = mean_i IoU_i over every sample                     (percent)
    cIoU  = sum_i I_i / sum_i U_i  (the table's additions)      (percent)
    Pr@X  = #{targeted i : IoU_i >= X} / #targeted             (percent; X = 0.7, 0.8, 0.9)
    N-acc = TP / (TP + FN)  over no-target samples             (percent; ReLA prints a fraction)
    T-acc = TN / (TN + FP)  over targeted samples              (percent; ReLA prints a fraction)

Note on the FP row: ReLA keeps U_i of the *predicted mask* (its mask head still outputs one),
so pass the raw thresholded mask together with the flag; a predictor that blanks the mask
of a no-target answer gives U_i = |G_i|, the same IoU (0) and a smaller union.

Where ReLA divides by zero (no targeted sample for Pr@X, a zero total union for cIoU, no
targeted sample for T-acc) the value here is ``nan``. Where ReLA reports 0 for both
accuracies because the set has no no-target sample, this module follows it (``T-acc`` and
``N-acc`` are 0), so that numbers copied from either agree. With no targets in the
set at all the classic metrics (:mod:`vlaligner.metrics`) are the ones to read.

Relation to the classic metrics: on a set without no-target samples and with every flag
predicted False, gIoU is mIoU and cIoU is oIoU (see docs/metrics.md).
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

import numpy as np
import torch

from .metrics import MaskBatch, intersection_union, sum_over_processes

__all__ = [
    "GRES_THRESHOLDS",
    "GRES_METRIC_KEYS",
    "GRESMetricAccumulator",
    "gres_metrics",
    "gres_sample_scores",
]

#: ReLA's precision thresholds.
GRES_THRESHOLDS: tuple[float, ...] = (0.7, 0.8, 0.9)
#: Keys of :meth:`GRESMetricAccumulator.compute`, in order.
GRES_METRIC_KEYS: tuple[str, ...] = ("gIoU", "cIoU") + tuple(f"Pr@{t:g}" for t in GRES_THRESHOLDS) + (
    "N-acc",
    "T-acc",
)
_IOU_GRID = float(2**30)

FlagBatch = Union[torch.Tensor, np.ndarray, Sequence[bool]]


def _flags(x: FlagBatch, name: str, n: int) -> torch.Tensor:
    """``(b)`` bool CPU tensor from a bool tensor / array / sequence of bools of length n."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x))
    elif isinstance(x, (list, tuple)):
        if not all(isinstance(v, (bool, np.bool_)) for v in x):
            bad = next(v for v in x if not isinstance(v, (bool, np.bool_)))
            raise TypeError(f"{name} must hold bools, got {type(bad).__name__} ({bad!r})")
        t = torch.tensor([bool(v) for v in x], dtype=torch.bool)
    else:
        raise TypeError(
            f"{name} must be a (b) bool tensor, array or list of bools, got {type(x).__name__}"
        )
    if t.dtype != torch.bool:
        raise TypeError(
            f"{name} must be bool (threshold no-target probabilities first, e.g. p > 0.5), got "
            f"dtype {t.dtype}"
        )
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one flag per mask), got {tuple(t.shape)}")
    return t


def gres_sample_scores(
    preds: MaskBatch,
    targets: MaskBatch,
    pred_no_target: FlagBatch,
    no_target: FlagBatch,
) -> dict[str, torch.Tensor]:
    """Per-sample quantities of ReLA's evaluator (the table in the module docstring).

    Args:
        preds: ``(b h w)`` bool batch or a sequence of ``(h w)`` bool masks (the thresholded
            mask head output, as ReLA: not blanked when a no-target is predicted).
        targets: the ground-truth masks (empty for no-target samples), same shapes.
        pred_no_target: ``(b)`` bools, the model says "nothing is referred to".
        no_target: ``(b)`` bools, the ground truth says so.

    Returns:
        dict of ``(b)`` float64 CPU tensors: ``"iou"`` (the gIoU term), ``"intersection"``
        and ``"union"`` (the cIoU terms).

    Raises:
        TypeError / ValueError: non-bool masks or flags, or lengths / shapes that differ; a
        sample flagged no-target whose target mask is not empty.
    """
    inter, union = intersection_union(preds, targets)
    n = int(inter.shape[0])
    pred_nt = _flags(pred_no_target, "pred_no_target", n)
    gt_nt = _flags(no_target, "no_target", n)
    if bool(gt_nt.any()):
        # For a no-target sample ReLA's ground truth is an empty mask, so I must be 0.
        bad = (gt_nt & (inter > 0)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"samples {bad[:5]} are flagged no_target but their target masks are not empty; "
                "a no-target sample's target must be all False"
            )
    tp = gt_nt & pred_nt  # correct "nothing"
    fn = gt_nt & ~pred_nt  # missed "nothing"
    fp = ~gt_nt & pred_nt  # "nothing" said of a real target
    inter = torch.where(fp | gt_nt, torch.zeros_like(inter), inter)
    union = torch.where(tp, torch.zeros_like(union), union)
    safe = torch.where(union > 0, union, torch.ones_like(union))
    iou = torch.where(union > 0, inter / safe, torch.zeros_like(union))  # ReLA: U = 0 -> 0
    iou = torch.where(tp, torch.ones_like(iou), iou)
    iou = torch.where(fn, torch.zeros_like(iou), iou)
    return {"iou": iou, "intersection": inter, "union": union}


class GRESMetricAccumulator:
    """Streaming gIoU / cIoU / Pr@0.7-0.9 / N-acc / T-acc over batches and processes.

    The state is a handful of exact sums, so accumulators merge and all-reduce exactly,
    like :class:`vlaligner.metrics.RISMetricAccumulator`.

    Args:
        thresholds: IoU thresholds of Pr@X (``IoU >= X``, targeted samples only).
    """

    # state layout: [inter, union, iou_sum, count, targeted, TP, FN, TN, FP, hits_0, ...]
    _FIXED = 9

    def __init__(self, thresholds: Sequence[float] = GRES_THRESHOLDS) -> None:
        ths = tuple(float(t) for t in thresholds)
        if not ths or any(not (0.0 <= t <= 1.0) for t in ths) or len(set(ths)) != len(ths):
            raise ValueError(f"thresholds must be distinct numbers in [0, 1], got {tuple(thresholds)!r}")
        self.thresholds = ths
        self.reset()

    @property
    def state_size(self) -> int:
        return self._FIXED + len(self.thresholds)

    def reset(self) -> None:
        """Forget every sample."""
        self._state = torch.zeros(self.state_size, dtype=torch.float64)

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return int(self._state[3].item())

    def update(
        self,
        preds: MaskBatch,
        targets: MaskBatch,
        pred_no_target: FlagBatch,
        no_target: FlagBatch,
    ) -> torch.Tensor:
        """Add a batch; arguments as :func:`gres_sample_scores`. Returns the ``(b)`` IoU terms."""
        s = gres_sample_scores(preds, targets, pred_no_target, no_target)
        iou = s["iou"]
        n = int(iou.shape[0])
        pred_nt = _flags(pred_no_target, "pred_no_target", n)
        gt_nt = _flags(no_target, "no_target", n)
        targeted = ~gt_nt
        th = torch.tensor(self.thresholds, dtype=torch.float64)
        hits = ((iou[:, None] >= th[None, :]) & targeted[:, None]).sum(dim=0).to(torch.float64)
        # IoUs summed on a 2^-30 grid so that the sum does not depend on batching (as RIS).
        iou_grid = torch.round(iou * _IOU_GRID) / _IOU_GRID
        counts = [
            float(n),
            float(targeted.sum()),
            float((gt_nt & pred_nt).sum()),
            float((gt_nt & ~pred_nt).sum()),
            float((targeted & ~pred_nt).sum()),
            float((targeted & pred_nt).sum()),
        ]
        delta = torch.cat(
            [
                torch.stack([s["intersection"].sum(), s["union"].sum(), iou_grid.sum()]),
                torch.tensor(counts, dtype=torch.float64),
                hits,
            ]
        )
        self._state += delta
        return iou

    def merge(self, other: "GRESMetricAccumulator") -> "GRESMetricAccumulator":
        """Add another accumulator's samples to this one (in place); returns self."""
        if not isinstance(other, GRESMetricAccumulator):
            raise TypeError(f"can only merge a GRESMetricAccumulator, got {type(other).__name__}")
        if other.thresholds != self.thresholds:
            raise ValueError(f"cannot merge accumulators with thresholds {other.thresholds} into {self.thresholds}")
        self._state += other._state
        return self

    def state_tensor(self) -> torch.Tensor:
        """The sums as a 1-D float64 tensor (a copy), for ``all_reduce``."""
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the sums by ``state`` (from :meth:`state_tensor`, possibly all-reduced)."""
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
        if state.shape != (self.state_size,):
            raise ValueError(f"state must have shape ({self.state_size},), got {tuple(state.shape)}")
        self._state = state.detach().to("cpu", torch.float64).clone()

    def all_reduce(self, group: Any = None) -> "GRESMetricAccumulator":
        """Sum the state over all processes (no-op without ``torch.distributed``); call once."""
        summed = sum_over_processes(self.state_tensor(), group)
        if summed is not None:
            self.load_state_tensor(summed)
        return self

    def confusion(self) -> dict[str, int]:
        """ReLA's no-target confusion counts: TP, FN (no-target samples), TN, FP (targeted)."""
        tp, fn, tn, fp = (int(v) for v in self._state[5:9].tolist())
        return {"TP": tp, "FN": fn, "TN": tn, "FP": fp}

    def compute(self) -> dict[str, float]:
        """gIoU, cIoU, Pr@X, N-acc and T-acc in percent (keys :data:`GRES_METRIC_KEYS`).

        Raises:
            ValueError: no samples were added.
        """
        inter, union, iou_sum, count, targeted, tp, fn, tn, fp = (float(v) for v in self._state[:9].tolist())
        if count <= 0:
            raise ValueError("no samples: call update() with at least one prediction first")
        nan = math.nan
        out = {
            "gIoU": 100.0 * iou_sum / count,
            "cIoU": 100.0 * inter / union if union > 0 else nan,
        }
        for t, hits in zip(self.thresholds, self._state[self._FIXED:].tolist()):
            out[f"Pr@{t:g}"] = 100.0 * float(hits) / targeted if targeted > 0 else nan
        if tp + fn > 0:  # ReLA computes both accuracies only when there are no-target samples
            out["N-acc"] = 100.0 * tp / (tp + fn)
            out["T-acc"] = 100.0 * tn / (tn + fp) if tn + fp > 0 else nan
        else:
            out["N-acc"] = out["T-acc"] = 0.0
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(thresholds={self.thresholds}, count={self.count})"


def gres_metrics(
    preds: MaskBatch,
    targets: MaskBatch,
    pred_no_target: FlagBatch,
    no_target: FlagBatch,
) -> dict[str, float]:
    """gIoU, cIoU, Pr@0.7/0.8/0.9, N-acc and T-acc (percent) of one set of predictions.

    Arguments as :func:`gres_sample_scores`; see the module docstring for the definitions.
    """
    acc = GRESMetricAccumulator()
    acc.update(preds, targets, pred_no_target, no_target)
    return acc.compute()
