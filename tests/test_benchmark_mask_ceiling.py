"""benchmarks/mask_ceiling.py: the best IoU a mask predicted at a given stride can reach."""

from __future__ import annotations

import pytest
import torch


def test_ceiling_on_hand_made_masks(load_benchmark):
    bench = load_benchmark("mask_ceiling")
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True      # aligned with the stride-4 cells: rebuilt but its corners
    masks[1, 5, 5] = True            # one pixel: 1/16 of a cell, lost at stride 4
    masks[3, 0:8, 0:8] = True        # one stride-8 cell
    ious = bench.stride_ceiling_iou(masks, 4)
    # bilinear upsampling keeps the edges (0.625 inside, 0.375 outside) but rounds each corner
    # pixel (0.625 ** 2 < 0.5): 60 of 64 pixels
    assert ious[0] == pytest.approx(60 / 64) and ious[1] == 0.0
    assert ious[2] == 1.0  # the empty mask stays empty
    assert bench.stride_ceiling_iou(masks, 1).tolist() == [1.0, 1.0, 1.0, 1.0]
    # at stride 16 the 8x8 square is a quarter of the single cell: nothing survives
    assert bench.stride_ceiling_iou(masks, 16)[3] == 0.0
    summary = bench.summarize(torch.tensor([1.0, 0.0, 0.75, 0.95]))
    assert summary["mIoU"] == pytest.approx(67.5) and summary["Pr@0.7"] == 75.0 and summary["Pr@0.9"] == 50.0


def test_ceiling_rejects_sides_that_are_not_multiples_of_the_stride(load_benchmark):
    bench = load_benchmark("mask_ceiling")
    with pytest.raises(ValueError, match=r"\(10, 16\) must be multiples of stride 4"):
        bench.stride_ceiling_iou(torch.zeros(1, 10, 16), 4)
