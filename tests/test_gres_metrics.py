"""Tests of the GRES metrics (vlaligner.gres_metrics) against hand-computed values and a plain
transcription of ReLA's evaluator loop.

Axis legend: b samples, h w space.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlaligner.gres_metrics import (
    GRES_METRIC_KEYS,
    GRESMetricAccumulator,
    gres_metrics,
    gres_sample_scores,
)
from vlaligner.metrics import ris_metrics


def _m(*rows: list) -> np.ndarray:
    return np.array(rows, dtype=bool)


# Six 1x4 samples covering every case of ReLA's evaluator (see the module docstring).
PREDS = [
    _m([1, 0, 0, 0]),  # target, found: I=1 U=2 IoU .5
    _m([1, 1, 1, 0]),  # target, found: I=3 U=4 IoU .75
    _m([1, 1, 0, 0]),  # target, but "no target" predicted (FP): I->0, U=|P u G|=3, IoU 0
    _m([1, 0, 0, 0]),  # no target, "no target" predicted (TP): IoU 1, adds 0/0
    _m([1, 1, 0, 0]),  # no target, a mask predicted (FN): IoU 0, adds 0/|P|=2
    _m([0, 0, 1, 1]),  # target, exact: I=2 U=2 IoU 1
]
TARGETS = [
    _m([1, 1, 0, 0]),
    _m([1, 1, 1, 1]),
    _m([0, 1, 1, 0]),
    _m([0, 0, 0, 0]),
    _m([0, 0, 0, 0]),
    _m([0, 0, 1, 1]),
]
PRED_NT = [False, False, True, True, False, False]
GT_NT = [False, False, False, True, True, False]


def test_every_case_by_hand() -> None:
    s = gres_sample_scores(PREDS, TARGETS, PRED_NT, GT_NT)
    assert s["iou"].tolist() == [0.5, 0.75, 0.0, 1.0, 0.0, 1.0]
    assert s["intersection"].tolist() == [1, 3, 0, 0, 0, 2]
    assert s["union"].tolist() == [2, 4, 3, 0, 2, 2]
    r = gres_metrics(PREDS, TARGETS, PRED_NT, GT_NT)
    assert list(r) == list(GRES_METRIC_KEYS)
    assert r["gIoU"] == pytest.approx(100 * 3.25 / 6)
    assert r["cIoU"] == pytest.approx(100 * 6 / 13)
    # Pr over the 4 targeted samples only (IoUs .5, .75, 0, 1).
    assert r["Pr@0.7"] == pytest.approx(50.0)
    assert r["Pr@0.8"] == pytest.approx(25.0)
    assert r["Pr@0.9"] == pytest.approx(25.0)
    assert r["N-acc"] == pytest.approx(50.0)  # TP 1, FN 1
    assert r["T-acc"] == pytest.approx(75.0)  # TN 3, FP 1
    acc = GRESMetricAccumulator()
    acc.update(PREDS, TARGETS, PRED_NT, GT_NT)
    assert acc.confusion() == {"TP": 1, "FN": 1, "TN": 3, "FP": 1}


@pytest.mark.parametrize(
    "pred, pred_nt, gt_nt, target, giou, ciou_num_den",
    [
        # correct no-target with an empty mask: IoU 1, nothing added to cIoU
        ([0, 0, 0, 0], True, True, [0, 0, 0, 0], 100.0, None),
        # correct no-target although the mask head drew something: still IoU 1, nothing added
        ([1, 1, 1, 0], True, True, [0, 0, 0, 0], 100.0, None),
        # missed no-target: IoU 0, the predicted area enters the union
        ([1, 1, 1, 0], False, True, [0, 0, 0, 0], 0.0, (0, 3)),
        # missed no-target with an empty mask: IoU 0 although the masks agree
        ([0, 0, 0, 0], False, True, [0, 0, 0, 0], 0.0, None),
        # false "no target" on a targeted sample: IoU 0, U is the union with the raw mask
        ([1, 1, 0, 0], True, False, [1, 1, 0, 0], 0.0, (0, 2)),
        # false "no target" with a blanked mask: the union is the target alone
        ([0, 0, 0, 0], True, False, [1, 1, 1, 0], 0.0, (0, 3)),
    ],
)
def test_each_no_target_case_alone(pred, pred_nt, gt_nt, target, giou, ciou_num_den) -> None:
    r = gres_metrics([_m(pred)], [_m(target)], [pred_nt], [gt_nt])
    assert r["gIoU"] == pytest.approx(giou)
    if ciou_num_den is None:
        assert math.isnan(r["cIoU"])  # total union 0: ReLA divides by zero
    else:
        assert r["cIoU"] == pytest.approx(100.0 * ciou_num_den[0] / ciou_num_den[1])
    if gt_nt:
        assert r["N-acc"] == (100.0 if pred_nt else 0.0)
        assert math.isnan(r["T-acc"]) and math.isnan(r["Pr@0.7"])  # no targeted sample
    else:
        # No no-target sample in the set: ReLA reports both accuracies as 0.
        assert r["N-acc"] == 0.0 and r["T-acc"] == 0.0
        assert r["Pr@0.7"] == 0.0


def _relas_loop(preds, targets, pred_nt, gt_nt) -> dict:
    """ReLA's ReferEvaluator.evaluate for one source, transcribed as a plain loop."""
    accum_i = accum_u = accum_iou = 0.0
    pr = {0.7: 0, 0.8: 0, 0.9: 0}
    total = not_empty = empty = 0
    nt = {"TP": 0, "TN": 0, "FP": 0, "FN": 0}
    for p, g, pn, gn in zip(preds, targets, pred_nt, gt_nt):
        i = int(np.sum(np.logical_and(p, g)))
        u = int(np.sum(np.logical_or(p, g)))
        if gn:
            empty += 1
            if pn:
                nt["TP"] += 1
                accum_iou += 1
            else:
                nt["FN"] += 1
                accum_u += u
        else:
            if pn:
                nt["FP"] += 1
                i = 0
            else:
                nt["TN"] += 1
            this_iou = 0.0 if u == 0 else i / u
            accum_iou += this_iou
            accum_i += i
            accum_u += u
            not_empty += 1
            for t in pr:
                if this_iou >= t:
                    pr[t] += 1
        total += 1
    res = {"gIoU": 100.0 * accum_iou / total, "cIoU": accum_i * 100.0 / accum_u}
    if empty > 0:
        res["T-acc"] = 100.0 * nt["TN"] / (nt["TN"] + nt["FP"])
        res["N-acc"] = 100.0 * nt["TP"] / (nt["TP"] + nt["FN"])
    else:
        res["T-acc"] = res["N-acc"] = 0.0
    for t in pr:
        res[f"Pr@{t:g}"] = pr[t] * 100.0 / not_empty
    return res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_relas_loop_on_random_sets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    gt_nt = rng.random(n) < 0.2
    gt_nt[:2] = [True, False]
    pred_nt = np.where(rng.random(n) < 0.8, gt_nt, ~gt_nt)
    targets, preds = [], []
    for k in range(n):
        h, w = rng.integers(4, 12, size=2)
        g = np.zeros((h, w), dtype=bool) if gt_nt[k] else rng.random((h, w)) < 0.5
        g[0, 0] = g[0, 0] if gt_nt[k] else True  # targets are never empty
        p = np.where(rng.random((h, w)) < 0.8, g, ~g) if rng.random() < 0.7 else rng.random((h, w)) < 0.3
        targets.append(g)
        preds.append(p)
    expected = _relas_loop(preds, targets, pred_nt.tolist(), gt_nt.tolist())
    got = gres_metrics(preds, targets, pred_nt, gt_nt)
    for key in GRES_METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key  # IoUs summed on a 2^-30 grid
    # Batching does not change anything: three accumulators merged equal one pass.
    parts = [GRESMetricAccumulator() for _ in range(3)]
    for j, acc in enumerate(parts):
        idx = list(range(j, n, 3))
        acc.update([preds[i] for i in idx], [targets[i] for i in idx], pred_nt[idx], torch.from_numpy(gt_nt[idx]))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == n
    for key, value in merged.compute().items():
        assert value == pytest.approx(got[key], abs=1e-12), key
    state = GRESMetricAccumulator()
    state.load_state_tensor(merged.state_tensor())
    assert state.compute() == merged.compute()


def test_classic_set_equals_miou_and_oiou() -> None:
    rng = np.random.default_rng(5)
    preds = torch.from_numpy(rng.random((8, 6, 7)) < 0.5)
    targets = torch.from_numpy(rng.random((8, 6, 7)) < 0.5)
    targets[:, 0, 0] = True
    flags = torch.zeros(8, dtype=torch.bool)
    gres = gres_metrics(preds, targets, flags, flags)
    ris = ris_metrics(preds, targets)
    assert gres["gIoU"] == pytest.approx(ris["mIoU"])
    assert gres["cIoU"] == pytest.approx(ris["oIoU"])
    assert gres["Pr@0.7"] == pytest.approx(ris["Pr@0.7"])


def test_bad_inputs() -> None:
    m = [_m([1, 0])]
    with pytest.raises(TypeError, match="pred_no_target must be bool"):
        gres_metrics(m, m, torch.tensor([0.7]), [False])
    with pytest.raises(TypeError, match="no_target must hold bools, got int"):
        gres_metrics(m, m, [False], [1])
    with pytest.raises(ValueError, match=r"no_target must have shape \(1,\)"):
        gres_metrics(m, m, [False], [False, True])
    with pytest.raises(ValueError, match="flagged no_target but their target masks are not empty"):
        gres_metrics(m, m, [False], [True])
    with pytest.raises(ValueError, match="no samples"):
        GRESMetricAccumulator().compute()
    with pytest.raises(ValueError, match="thresholds must be distinct"):
        GRESMetricAccumulator(thresholds=(0.7, 0.7))
