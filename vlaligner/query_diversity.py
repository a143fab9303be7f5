"""How different the N queries of an aligner are: the measures of query collapse.

Axis legend: b batch, n queries, l words, H W mask space.

EAVL's queries are meant to read the sentence with different emphases (paper Fig. 4). These
pure functions measure whether they do, per sample:

- ``pairwise_mask_iou``: mean IoU between the binarised masks of every pair of queries
  (1: all queries draw the same mask; 0: disjoint masks).
- ``score_spread``: max - min of the estimator's scores (0: every query weighs 1/n).
- ``score_entropy``: entropy of the scores over n, divided by log n (1: uniform).
- ``attention_entropy``: entropy of each query's word attention over the real words, divided
  by log(real words) (1: the query reads every word alike).
- ``attention_distance``: mean total-variation distance between the word attentions of every
  pair of queries (0: every query reads the sentence the same way).

A pair of empty masks counts as identical (IoU 1). With n = 1 the pairwise measures are NaN.
"""

from __future__ import annotations

import math

import torch

from ._validation import check_bool_mask, check_rank

__all__ = [
    "pairwise_mask_iou",
    "score_spread",
    "score_entropy",
    "attention_entropy",
    "attention_distance",
]


def _pairs(n: int, device: torch.device) -> torch.Tensor:
    return torch.triu_indices(n, n, offset=1, device=device)


def pairwise_mask_iou(query_masks: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """``(b n H W)`` per-query mask logits (or bool masks) -> ``(b)`` mean pairwise IoU.

    Logits are binarised at ``threshold`` (0: probability 0.5).
    """
    check_rank("query_masks", query_masks, "b n H W")
    masks = query_masks if query_masks.dtype == torch.bool else query_masks > threshold
    b, n = masks.shape[:2]
    if n < 2:
        return torch.full((b,), float("nan"))
    flat = masks.flatten(2).float()  # (b n p)
    inter = torch.einsum("bip,bjp->bij", flat, flat)
    area = flat.sum(-1)
    union = area[:, :, None] + area[:, None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    i, j = _pairs(n, iou.device)
    return iou[:, i, j].mean(-1).cpu()


def score_spread(scores: torch.Tensor) -> torch.Tensor:
    """``(b n)`` scores -> ``(b)`` max - min."""
    check_rank("scores", scores, "b n")
    return (scores.amax(-1) - scores.amin(-1)).float().cpu()


def score_entropy(scores: torch.Tensor) -> torch.Tensor:
    """``(b n)`` scores summing to 1 -> ``(b)`` entropy / log n (1: uniform; NaN for n = 1)."""
    check_rank("scores", scores, "b n")
    n = scores.shape[1]
    if n < 2:
        return torch.full((scores.shape[0],), float("nan"))
    p = scores.float().clamp_min(0)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return (h / math.log(n)).cpu()


def attention_entropy(attention: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """``(b n l)`` word attention, ``(b l)`` real words -> ``(b n)`` entropy / log(real words).

    A sentence of one real word gets 0 (nothing to choose).
    """
    check_rank("attention", attention, "b n l")
    check_bool_mask("word_mask", word_mask, (attention.shape[0], attention.shape[2]), "b l")
    p = attention.float() * word_mask[:, None, :]
    h = -(p * p.clamp_min(1e-12).log()).sum(-1)
    words = word_mask.sum(-1).float()
    norm = words.clamp_min(2).log()[:, None]
    return torch.where(words[:, None] > 1, h / norm, torch.zeros_like(h)).cpu()


def attention_distance(attention: torch.Tensor) -> torch.Tensor:
    """``(b n l)`` word attention -> ``(b)`` mean total-variation distance over query pairs."""
    check_rank("attention", attention, "b n l")
    b, n = attention.shape[:2]
    if n < 2:
        return torch.full((b,), float("nan"))
    a = attention.float()
    tv = 0.5 * (a[:, :, None, :] - a[:, None, :, :]).abs().sum(-1)  # (b n n)
    i, j = _pairs(n, tv.device)
    return tv[:, i, j].mean(-1).cpu()
