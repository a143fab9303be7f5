"""Referring image segmentation metrics: oIoU, mIoU and Precision@X (torch + numpy only).

Axis legend: b batch (samples), h w space (any size; a prediction and its target must match).

For samples i = 1..n with prediction P_i and target G_i (boolean masks):

    I_i = |P_i ∩ G_i|,  U_i = |P_i ∪ G_i|
    IoU_i = I_i / U_i, and IoU_i = 1 when U_i = 0 (empty prediction for an empty target)
    oIoU = sum_i I_i / sum_i U_i                 (100 when every union is empty)
    mIoU = (1 / n) sum_i IoU_i
    Pr@X = (1 / n) #{i : IoU_i >= X}             (">=", LAVT's convention; CRIS uses ">")

All results are in percent. Every sentence of a ref is one sample. See docs/metrics.md.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_THRESHOLDS",
    "METRIC_KEYS",
    "intersection_union",
    "iou_from_counts",
    "ris_metrics",
    "RISMetricAccumulator",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
_IOU_GRID = float(2**30)

MaskBatch = Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]]


def _threshold_key(t: float) -> str:
    return f"Pr@{t:g}"


METRIC_KEYS: tuple[str, ...] = ("oIoU", "mIoU") + tuple(_threshold_key(t) for t in DEFAULT_THRESHOLDS)


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    """A bool tensor from a bool numpy array or tensor; anything else is a TypeError."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.bool_:
            raise TypeError(
                f"{name} must be a bool mask (threshold scores first, e.g. prob > 0.5), got "
                f"numpy dtype {x.dtype}"
            )
        if not x.flags.writeable:
            x = x.copy()  # torch warns on read-only buffers
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.bool:
            raise TypeError(
                f"{name} must be a bool mask (threshold scores first, e.g. prob > 0.5), got "
                f"torch dtype {x.dtype}"
            )
        return x
    raise TypeError(
        f"{name} must be a bool numpy array or torch tensor, got {type(x).__name__}"
    )


def _as_mask_list(x: MaskBatch, name: str) -> Union[torch.Tensor, list[torch.Tensor]]:
    """``(b h w)`` bool tensor for an array batch, or a list of ``(h w)`` bool tensors."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        t = _to_tensor(x, name)
        if t.ndim == 2:
            raise ValueError(
                f"{name} is a single (h w) mask of shape {tuple(t.shape)}; pass a sequence of "
                "masks [mask] or a (b h w) batch"
            )
        if t.ndim != 3:
            raise ValueError(f"{name} must be a (b h w) batch, got shape {tuple(t.shape)}")
        return t
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(
            f"{name} must be a sequence of (h w) bool masks or a (b h w) bool tensor/array, "
            f"got {type(x).__name__}"
        )
    out = []
    for i, m in enumerate(x):
        t = _to_tensor(m, f"{name}[{i}]")
        if t.ndim != 2:
            raise ValueError(f"{name}[{i}] must have shape (h w), got {tuple(t.shape)}")
        out.append(t)
    return out


def intersection_union(preds: MaskBatch, targets: MaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample intersection and union pixel counts.

    Args:
        preds: ``(b h w)`` bool tensor / array, or a sequence of ``(h w)`` bool masks.
        targets: same length as ``preds``; each target the same shape as its prediction.

    Returns:
        ``(intersection (b), union (b))`` float64 CPU tensors of pixel counts.

    Raises:
        TypeError: a mask is not bool (numpy or torch).
        ValueError: lengths or shapes differ, or a mask is not 2-D.
    """
    p = _as_mask_list(preds, "preds")
    g = _as_mask_list(targets, "targets")
    if len(p) != len(g):
        raise ValueError(f"preds and targets must have the same length, got {len(p)} and {len(g)}")
    if isinstance(p, torch.Tensor) and isinstance(g, torch.Tensor) and p.shape == g.shape:
        g = g.to(p.device)
        inter = (p & g).sum(dim=(1, 2))
        union = (p | g).sum(dim=(1, 2))
        return inter.to("cpu", torch.float64), union.to("cpu", torch.float64)
    inters, unions = [], []
    for i in range(len(p)):
        pi, gi = p[i], g[i]
        if pi.shape != gi.shape:
            raise ValueError(
                f"preds[{i}] has shape {tuple(pi.shape)} but targets[{i}] has shape "
                f"{tuple(gi.shape)}; resize the prediction to the target's size first"
            )
        gi = gi.to(pi.device)
        inters.append((pi & gi).sum())
        unions.append((pi | gi).sum())
    if not inters:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone()
    return (
        torch.stack(inters).to("cpu", torch.float64),
        torch.stack(unions).to("cpu", torch.float64),
    )


def iou_from_counts(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU ``(b)`` from counts ``(b)``; 1 where the union is empty (empty vs empty)."""
    safe = torch.where(union > 0, union, torch.ones_like(union))
    return torch.where(union > 0, intersection / safe, torch.ones_like(union))


def sum_over_processes(state: torch.Tensor, group: Any = None) -> Optional[torch.Tensor]:
    """A metric accumulator's state summed over all ``torch.distributed`` processes.

    Returns None when no process group is initialised (nothing to sum). With NCCL the state
    travels as a CUDA tensor (NCCL reduces nothing else); float64 keeps pixel counts exact.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend(group) == "nccl":
        state = state.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
    return state


class RISMetricAccumulator:
    """Streaming oIoU / mIoU / Precision@X over batches and processes.

    The state is a handful of sums (total intersection, total union, sum of IoUs, number of
    samples, hits per threshold), so accumulators merge exactly and the state can be
    all-reduced across processes with one float64 tensor.

    Args:
        thresholds: IoU thresholds for Precision@X, counted with ``IoU >= X``.
    """

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        ths = tuple(float(t) for t in thresholds)
        if not ths or any(not (0.0 <= t <= 1.0) for t in ths) or len(set(ths)) != len(ths):
            raise ValueError(
                f"thresholds must be distinct numbers in [0, 1], got {tuple(thresholds)!r}"
            )
        self.thresholds = ths
        self.reset()

    # state layout: [inter, union, iou_sum, count, hits_0, ..., hits_{k-1}]
    @property
    def state_size(self) -> int:
        return 4 + len(self.thresholds)

    def reset(self) -> None:
        """Forget every sample."""
        self._state = torch.zeros(self.state_size, dtype=torch.float64)

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return int(self._state[3].item())

    def update(self, preds: MaskBatch, targets: MaskBatch) -> torch.Tensor:
        """Add a batch of samples.

        Args:
            preds: ``(b h w)`` bool tensor / array or a sequence of ``(h w)`` bool masks.
            targets: the matching ground-truth masks, same shapes.

        Returns:
            the batch's per-sample IoUs, ``(b)`` float64 (handy for logging).
        """
        inter, union = intersection_union(preds, targets)
        iou = iou_from_counts(inter, union)
        # IoUs are summed on a 2^-30 grid: multiples of 2^-30 add exactly in float64 up to
        # 2^23 (8.4 M) samples, so the sum, and mIoU, do not depend on how the samples were
        # split over batches, accumulators or processes (pixel counts are integers anyway).
        iou_grid = torch.round(iou * _IOU_GRID) / _IOU_GRID
        th = torch.tensor(self.thresholds, dtype=torch.float64)
        hits = (iou[:, None] >= th[None, :]).sum(dim=0).to(torch.float64)
        delta = torch.cat(
            [
                torch.stack(
                    [inter.sum(), union.sum(), iou_grid.sum(), torch.tensor(float(iou.numel()), dtype=torch.float64)]
                ),
                hits,
            ]
        )
        self._state += delta
        return iou

    def merge(self, other: "RISMetricAccumulator") -> "RISMetricAccumulator":
        """Add another accumulator's samples to this one (in place); returns self."""
        if not isinstance(other, RISMetricAccumulator):
            raise TypeError(f"can only merge a RISMetricAccumulator, got {type(other).__name__}")
        if other.thresholds != self.thresholds:
            raise ValueError(
                f"cannot merge accumulators with thresholds {other.thresholds} into {self.thresholds}"
            )
        self._state += other._state
        return self

    def state_tensor(self) -> torch.Tensor:
        """The sums as a 1-D float64 tensor (a copy), length ``4 + len(thresholds)``.

        Layout: ``[total intersection, total union, sum of IoUs, count, hits at each
        threshold]``. Every entry adds exactly (pixel counts and sample counts are integers,
        IoUs are summed on a 2^-30 grid), so ``all_reduce`` / ``merge`` give bit-identical
        results however the samples were split.
        """
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the sums by ``state`` (as produced by :meth:`state_tensor`, possibly all-reduced)."""
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
        if state.shape != (self.state_size,):
            raise ValueError(
                f"state must have shape ({self.state_size},) for {len(self.thresholds)} thresholds, "
                f"got {tuple(state.shape)}"
            )
        self._state = state.detach().to("cpu", torch.float64).clone()

    def all_reduce(self, group: Any = None) -> "RISMetricAccumulator":
        """Sum the state over all processes of ``torch.distributed`` (no-op when not initialised).

        Call it once, on every rank, before :meth:`compute`; calling it twice double counts.
        """
        summed = sum_over_processes(self.state_tensor(), group)
        if summed is not None:
            self.load_state_tensor(summed)
        return self

    def compute(self) -> dict[str, float]:
        """oIoU, mIoU and Pr@X in percent.

        Raises:
            ValueError: no samples were added.
        """
        inter, union, iou_sum, count = (float(v) for v in self._state[:4].tolist())
        if count <= 0:
            raise ValueError("no samples: call update() with at least one prediction first")
        out = {
            "oIoU": 100.0 * inter / union if union > 0 else 100.0,
            "mIoU": 100.0 * iou_sum / count,
        }
        for t, hits in zip(self.thresholds, self._state[4:].tolist()):
            out[_threshold_key(t)] = 100.0 * float(hits) / count
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(thresholds={self.thresholds}, count={self.count})"


def ris_metrics(preds: MaskBatch, targets: MaskBatch) -> dict[str, float]:
    """oIoU, mIoU and Pr@0.5..0.9 (percent) of predictions against targets.

    Args:
        preds: sequence of ``(h w)`` bool masks (numpy or torch) or a ``(b h w)`` bool batch.
        targets: the ground truth, same length, each the same shape as its prediction.

    Returns:
        dict with keys ``"oIoU"``, ``"mIoU"``, ``"Pr@0.5"``, ..., ``"Pr@0.9"`` (floats, percent).

    Raises:
        TypeError: non-bool masks. ValueError: length or shape mismatch, or no samples.
    """
    acc = RISMetricAccumulator()
    acc.update(preds, targets)
    return acc.compute()
