"""Query collapse: the diversity measures on hand-made inputs, why the logit aggregation lets
the queries collapse, and the probability aggregation that does not.

Axis legend: b batch, n queries, l words, c channels, d query width, H W mask space.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlaligner import VisionLanguageAligner
from vlaligner.functional import dynamic_conv2d, mixture_of_masks_logits
from vlaligner.query_diversity import (
    attention_distance,
    attention_entropy,
    pairwise_mask_iou,
    score_entropy,
    score_spread,
)

torch.set_num_threads(1)


def _box(h, w, top, left, bottom, right):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top:bottom, left:right] = True
    return m


def test_pairwise_mask_iou_of_known_masks():
    a = _box(4, 4, 0, 0, 2, 2)  # 4 pixels
    b = _box(4, 4, 0, 0, 2, 4)  # 8 pixels, contains a: IoU(a, b) = 4 / 8
    c = _box(4, 4, 2, 0, 4, 4)  # 8 pixels, disjoint from a and b
    masks = torch.stack([a, b, c])[None]  # (1 3 4 4)
    expected = (0.5 + 0.0 + 0.0) / 3
    assert pairwise_mask_iou(masks).item() == pytest.approx(expected)
    same = torch.stack([a, a, a])[None]
    assert pairwise_mask_iou(same).item() == 1.0
    empty = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    assert pairwise_mask_iou(empty).item() == 1.0  # two empty masks are the same mask
    # logits are binarised at 0
    logits = torch.where(torch.stack([a, c])[None], 3.0, -3.0)
    assert pairwise_mask_iou(logits).item() == 0.0
    assert math.isnan(pairwise_mask_iou(a[None, None]).item())


def test_score_measures():
    uniform = torch.full((1, 4), 0.25)
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert score_spread(uniform).item() == 0.0 and score_spread(peaked).item() == 1.0
    assert score_entropy(uniform).item() == pytest.approx(1.0)
    assert score_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert score_entropy(half).item() == pytest.approx(math.log(2) / math.log(4))


def test_attention_measures():
    word_mask = torch.tensor([[True, True, True, True, False]])
    uniform = torch.tensor([[[0.25, 0.25, 0.25, 0.25, 0.0]] * 2])
    one_hot = torch.tensor([[[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]]])
    assert torch.allclose(attention_entropy(uniform, word_mask), torch.ones(1, 2))
    assert torch.allclose(attention_entropy(one_hot, word_mask), torch.zeros(1, 2), atol=1e-6)
    assert attention_distance(uniform).item() == pytest.approx(0.0)
    assert attention_distance(one_hot).item() == pytest.approx(1.0)  # disjoint readings
    half = torch.tensor([[[0.5, 0.5, 0, 0, 0], [0, 0.5, 0.5, 0, 0]]])
    assert attention_distance(half).item() == pytest.approx(0.5)


def _aligner(aggregation: str) -> VisionLanguageAligner:
    torch.manual_seed(0)
    return VisionLanguageAligner(in_channels=8, query_dim=12, kernel_size=3, num_heads=2, aggregation=aggregation).eval()


def test_logit_aggregation_sees_only_the_weighted_mean_query():
    """Why the queries collapse: with Y = sum_i s_i m_i and a linear kernel generator,
    Y = K(q_bar) * F + b(q_bar) with q_bar = sum_i s_i q_i. Two query sets with the same
    weighted mean give the same logits, so the loss cannot tell the queries apart."""
    aligner = _aligner("logits").double()
    features, queries = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    out = aligner(features, queries)
    q_bar = (out.query_scores[..., None] * queries).sum(1, keepdim=True)  # (b 1 d)
    projected, weight, bias = aligner.mask_generator.kernels(features, q_bar)
    single = dynamic_conv2d(projected, weight, bias)  # one query: the weighted mean
    torch.testing.assert_close(out.logits, single)


def test_probability_aggregation_matches_the_plain_mixture_and_depends_on_each_query():
    aligner = _aligner("probabilities").double()
    features, queries = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    out = aligner(features, queries, return_query_masks=True)
    mixture = (out.query_scores[:, :, None, None] * torch.sigmoid(out.query_masks)).sum(1, keepdim=True)
    torch.testing.assert_close(torch.sigmoid(out.logits), mixture)
    # unlike the logit reading, replacing the queries by their weighted mean changes the output
    q_bar = (out.query_scores[..., None] * queries).sum(1, keepdim=True)
    projected, weight, bias = aligner.mask_generator.kernels(features, q_bar)
    assert not torch.allclose(out.logits, dynamic_conv2d(projected, weight, bias))


def test_mixture_logits_stay_finite_for_extreme_logits():
    masks = torch.tensor([[[[80.0, -80.0]], [[-80.0, -80.0]]]])  # (1 2 1 2)
    scores = torch.tensor([[0.5, 0.5]])
    logits = mixture_of_masks_logits(masks, scores)
    assert torch.isfinite(logits).all()
    assert torch.sigmoid(logits)[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert logits[0, 0, 0, 1].item() < -70


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        VisionLanguageAligner(in_channels=8, query_dim=12, aggregation="mean")
