"""Tests of vlaligner.metrics: oIoU, mIoU, Precision@X and the streaming accumulator.

Axis legend: b batch (samples), h w space.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlaligner.metrics import (
    DEFAULT_THRESHOLDS,
    METRIC_KEYS,
    RISMetricAccumulator,
    intersection_union,
    iou_from_counts,
    ris_metrics,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _m(rows: list[str]) -> np.ndarray:
    """A bool mask from strings: '#' = foreground."""
    return np.array([[c == "#" for c in r] for r in rows], dtype=bool)


# Four hand-computed samples (I, U, IoU):
#   0: I 2, U 4, IoU 0.5     1: I 3, U 3, IoU 1
#   2: empty vs empty, IoU 1 (convention)     3: prediction on an empty target: I 0, U 2, IoU 0
PREDS = [_m(["##..", "##.."]), _m(["###", "..."]), _m(["..", ".."]), _m(["#.", ".#"])]
TARGETS = [_m(["#...", "#..."]), _m(["###", "..."]), _m(["..", ".."]), _m(["..", ".."])]


def test_hand_computed() -> None:
    out = ris_metrics(PREDS, TARGETS)
    assert list(out) == list(METRIC_KEYS)
    assert all(isinstance(v, float) for v in out.values())
    assert out["oIoU"] == pytest.approx(100 * (2 + 3 + 0 + 0) / (4 + 3 + 0 + 2))
    assert out["mIoU"] == pytest.approx(100 * (0.5 + 1 + 1 + 0) / 4)
    assert out["Pr@0.5"] == pytest.approx(75.0)  # IoU == 0.5 counts (>=, LAVT)
    for t in ("Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"):
        assert out[t] == pytest.approx(50.0)


def test_empty_conventions() -> None:
    e = np.zeros((3, 3), dtype=bool)
    out = ris_metrics([e, e], [e, e])
    assert out == {k: 100.0 for k in METRIC_KEYS}  # all unions empty: oIoU 100 too
    full = np.ones((3, 3), dtype=bool)
    out = ris_metrics([e], [full])  # missed target
    assert out["oIoU"] == 0.0 and out["mIoU"] == 0.0 and out["Pr@0.5"] == 0.0
    out = ris_metrics([e, full], [e, full])
    assert out["mIoU"] == 100.0 and out["oIoU"] == 100.0


def test_thresholds_inclusive_at_exact_ratios() -> None:
    # IoU exactly 3/5, 7/10, 4/5, 9/10: each counts at its own threshold.
    preds, targets = [], []
    for inter, union in [(3, 5), (7, 10), (4, 5), (9, 10)]:
        p = np.zeros(union, dtype=bool)
        g = np.zeros(union, dtype=bool)
        p[:union] = True
        g[:inter] = True
        preds.append(p.reshape(1, -1))
        targets.append(g.reshape(1, -1))
    out = ris_metrics(preds, targets)
    assert out["Pr@0.5"] == out["Pr@0.6"] == 100.0
    assert out["Pr@0.7"] == 75.0 and out["Pr@0.8"] == 50.0 and out["Pr@0.9"] == 25.0


def test_input_forms_agree() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((6, 9, 7)) > 0.5
    g = rng.random((6, 9, 7)) > 0.4
    ref = ris_metrics(list(p), list(g))
    assert ris_metrics(torch.from_numpy(p), torch.from_numpy(g)) == ref
    assert ris_metrics(p, g) == ref
    assert ris_metrics([torch.from_numpy(x) for x in p], list(g)) == ref
    assert ris_metrics(tuple(p), torch.from_numpy(g)) == ref
    # Different sizes per sample (evaluation at the original image size).
    mixed_p = [p[0], p[1, :5, :3]]
    mixed_g = [g[0], g[1, :5, :3]]
    inter, union = intersection_union(mixed_p, mixed_g)
    assert inter.tolist() == [float((p[0] & g[0]).sum()), float((p[1, :5, :3] & g[1, :5, :3]).sum())]
    assert union.dtype == torch.float64


def test_errors() -> None:
    a = np.zeros((2, 3), dtype=bool)
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        ris_metrics([a, a], [a])
    with pytest.raises(ValueError, match=r"preds\[0\] has shape \(2, 3\) but targets\[0\] has shape \(3, 2\)"):
        ris_metrics([a], [a.T])
    with pytest.raises(TypeError, match=r"preds\[0\] must be a bool mask .* got numpy dtype float32"):
        ris_metrics([a.astype(np.float32)], [a])
    with pytest.raises(TypeError, match=r"targets must be a bool mask .* got torch dtype torch.uint8"):
        ris_metrics(torch.zeros(1, 2, 3, dtype=torch.bool), torch.zeros(1, 2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"preds is a single \(h w\) mask of shape \(2, 3\)"):
        ris_metrics(a, a)
    with pytest.raises(ValueError, match=r"preds\[0\] must have shape \(h w\), got \(1, 2, 3\)"):
        ris_metrics([a[None]], [a[None]])
    with pytest.raises(TypeError, match="must be a sequence of .* got int"):
        ris_metrics(3, [a])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"preds\[0\] must be a bool numpy array or torch tensor, got list"):
        ris_metrics([[[True]]], [a])
    with pytest.raises(ValueError, match="no samples"):
        ris_metrics([], [])


def test_iou_from_counts() -> None:
    iou = iou_from_counts(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 4.0, 3.0]))
    assert iou.tolist() == [1.0, 0.25, 0.0]


def _random_batch(rng: np.random.Generator, n: int) -> tuple[list, list]:
    preds, targets = [], []
    for _ in range(n):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        preds.append(rng.random((h, w)) > rng.random())
        targets.append(rng.random((h, w)) > rng.random())
    return preds, targets


def test_accumulator_split_and_merge_equal_single() -> None:
    rng = np.random.default_rng(1)
    preds, targets = _random_batch(rng, 40)
    whole = RISMetricAccumulator()
    whole.update(preds, targets)
    a, b = RISMetricAccumulator(), RISMetricAccumulator()
    for lo, hi in [(0, 7), (7, 19)]:
        a.update(preds[lo:hi], targets[lo:hi])
    for lo, hi in [(19, 20), (20, 40)]:
        b.update(preds[lo:hi], targets[lo:hi])
    assert a.merge(b) is a
    assert a.count == whole.count == 40
    assert a.compute() == whole.compute() == ris_metrics(preds, targets)
    assert torch.equal(a.state_tensor(), whole.state_tensor())
    # Exactly equal (not just close) for any split into batches and accumulators.
    for seed in range(5):
        cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, 40), size=6, replace=False).tolist())
        parts = [RISMetricAccumulator() for _ in range(3)]
        for k, (lo, hi) in enumerate(zip([0] + cuts, cuts + [40])):
            parts[k % 3].update(preds[lo:hi], targets[lo:hi])
        merged = parts[2].merge(parts[0]).merge(parts[1])
        assert merged.compute() == whole.compute()


def test_accumulator_state_round_trip_and_errors() -> None:
    rng = np.random.default_rng(2)
    preds, targets = _random_batch(rng, 10)
    acc = RISMetricAccumulator()
    ious = acc.update(preds, targets)
    assert ious.shape == (10,) and ious.dtype == torch.float64
    state = acc.state_tensor()
    assert state.dtype == torch.float64 and state.shape == (4 + len(DEFAULT_THRESHOLDS),)
    inter, union = intersection_union(preds, targets)
    assert state[[0, 1, 3]].tolist() == [inter.sum().item(), union.sum().item(), 10.0]
    assert state[2].item() == pytest.approx(ious.sum().item(), abs=1e-8)
    state[0] += 0  # the returned tensor is a copy
    other = RISMetricAccumulator()
    other.load_state_tensor(state)
    assert other.compute() == acc.compute()
    # Summed states (what all_reduce does) equal merged accumulators.
    doubled = RISMetricAccumulator()
    doubled.load_state_tensor(state + state)
    assert doubled.compute() == acc.compute() and doubled.count == 20
    with pytest.raises(ValueError, match=r"state must have shape \(9,\) for 5 thresholds, got \(4,\)"):
        other.load_state_tensor(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="state must be a torch.Tensor, got list"):
        other.load_state_tensor([0.0] * 9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot merge accumulators with thresholds"):
        acc.merge(RISMetricAccumulator(thresholds=(0.5,)))
    acc.reset()
    assert acc.count == 0
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    with pytest.raises(ValueError, match="thresholds must be distinct numbers in"):
        RISMetricAccumulator(thresholds=(0.5, 1.5))


def test_custom_thresholds_and_all_reduce_noop() -> None:
    acc = RISMetricAccumulator(thresholds=(0.25, 0.75))
    acc.update(PREDS, TARGETS)
    out = acc.compute()
    assert set(out) == {"oIoU", "mIoU", "Pr@0.25", "Pr@0.75"}
    assert out["Pr@0.25"] == 75.0 and out["Pr@0.75"] == 50.0
    before = acc.state_tensor()
    assert acc.all_reduce() is acc  # torch.distributed is not initialised: nothing changes
    assert torch.equal(acc.state_tensor(), before)


def _dist_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rng = np.random.default_rng(3)
        preds, targets = _random_batch(rng, 12)
        acc = RISMetricAccumulator()
        half = slice(0, 5) if rank == 0 else slice(5, 12)
        acc.update(preds[half], targets[half])
        acc.all_reduce()
        if rank == 1:
            torch.save(acc.state_tensor(), result_file)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    result = tmp_path / "state.pt"
    mp.start_processes(
        _dist_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True, start_method="fork"
    )
    rng = np.random.default_rng(3)
    preds, targets = _random_batch(rng, 12)
    whole = RISMetricAccumulator()
    whole.update(preds, targets)
    assert torch.equal(torch.load(result), whole.state_tensor())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**25 - 1), st.integers(0, 2**25 - 1)),
        min_size=1,
        max_size=6,
    )
)
def test_matches_numpy_reference(specs: list) -> None:
    preds, targets = [], []
    for h, w, pbits, gbits in specs:
        idx = np.arange(h * w)
        preds.append((((pbits >> idx) & 1) == 1).reshape(h, w))
        targets.append((((gbits >> idx) & 1) == 1).reshape(h, w))
    inter = np.array([(p & g).sum() for p, g in zip(preds, targets)], dtype=float)
    union = np.array([(p | g).sum() for p, g in zip(preds, targets)], dtype=float)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    out = ris_metrics(preds, targets)
    assert out["mIoU"] == pytest.approx(100 * iou.mean())
    assert out["oIoU"] == pytest.approx(100 * inter.sum() / union.sum() if union.sum() else 100.0)
    for t in DEFAULT_THRESHOLDS:
        assert out[f"Pr@{t:g}"] == pytest.approx(100 * (iou >= t).mean())
    assert all(0.0 <= v <= 100.0 for v in out.values())


def test_imports_without_pil_or_pycocotools() -> None:
    code = (
        "import sys; sys.modules['PIL'] = None; sys.modules['pycocotools'] = None\n"
        "import vlaligner.metrics as m\n"
        "import numpy as np\n"
        "print(m.ris_metrics([np.ones((2, 2), bool)], [np.ones((2, 2), bool)])['mIoU'])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "100.0"
