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
    rebuilt = bench.stride_reconstruction(masks, 4)
    assert rebuilt.shape == (4, 16, 16) and rebuilt.dtype == torch.bool
    # bilinear upsampling keeps the edges (0.625 inside, 0.375 outside) but rounds each corner
    # pixel (0.625 ** 2 < 0.5): 60 of 64 pixels
    corners = masks[0].clone()
    corners[4, 4] = corners[4, 11] = corners[11, 4] = corners[11, 11] = False
    assert torch.equal(rebuilt[0], corners) and not rebuilt[1].any()
    ious = bench.stride_ceiling_iou(masks, 4)
    assert ious[0] == pytest.approx(60 / 64) and ious[1] == 0.0
    assert ious[2] == 1.0  # the empty mask stays empty
    assert bench.stride_ceiling_iou(masks, 1).tolist() == [1.0, 1.0, 1.0, 1.0]
    # at stride 16 the 8x8 square is a quarter of the single cell: nothing survives
    assert bench.stride_ceiling_iou(masks, 16)[3] == 0.0


def test_the_nearest_target_sits_half_a_cell_off(load_benchmark):
    bench = load_benchmark("mask_ceiling")
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 6:19, 9:22] = True  # not aligned with the stride-4 cells
    area = bench.stride_ceiling_iou(masks, 4)[0].item()
    nearest = bench.stride_ceiling_iou(masks, 4, "nearest")[0].item()
    assert area > 0.85 and nearest < area - 0.1
    # each cell holds its top-left pixel but is read at its centre: the mask lands below and right
    rebuilt = bench.stride_reconstruction(masks, 4, "nearest")[0].nonzero().float().mean(0)
    assert (rebuilt > masks[0].nonzero().float().mean(0) + 1.0).all()
    with pytest.raises(ValueError, match="sampling must be one of"):
        bench.stride_reconstruction(masks, 4, "bicubic")


def test_ceiling_rejects_sides_that_are_not_multiples_of_the_stride(load_benchmark):
    bench = load_benchmark("mask_ceiling")
    with pytest.raises(ValueError, match=r"\(10, 16\) must be multiples of stride 4"):
        bench.stride_ceiling_iou(torch.zeros(1, 10, 16), 4)


def test_command_prints_one_row_per_stride(load_benchmark, tmp_path, capsys):
    from vlaligner.data import generate_synthetic_refcoco

    bench = load_benchmark("mask_ceiling")
    root = generate_synthetic_refcoco(tmp_path / "s", num_images=4, seed=0)
    assert bench.main(["--data-root", str(root), "--split", "train", "--img-size", "64", "--strides", "1", "16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[1:3] == [" stride ", " mIoU "]
    stride1, stride16 = (row.split("|")[1:-1] for row in rows[1:])
    assert [float(c) for c in stride1] == [1.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0]  # stride 1: exact
    assert float(stride16[1]) < 100.0
    with pytest.raises(SystemExit):
        bench.main(["--data-root", str(root), "--img-size", "64", "--strides", "3"])

