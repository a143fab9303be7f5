"""How much of the ground truth a mask predicted at a given stride can hold.

Axis legend: b batch, h w space of the input.

A model that predicts its mask on a grid of stride ``s`` (EAVL: logits at stride 4, made by
upsampling the decoder's stride-16 grid) and is scored after bilinear upsampling can at best
reproduce the ground truth area-averaged to that grid. This script computes that ceiling on a
data set's masks: each mask is average-pooled by ``s``, upsampled back bilinearly, thresholded
at 0.5 and compared with itself by :func:`vlaligner.metrics.ris_metrics` (mIoU, Pr@0.5-0.9 in
percent, exactly as the evaluation scores a model)::

    python benchmarks/mask_ceiling.py                           # the demo's synthetic set, 128 px
    python benchmarks/mask_ceiling.py --img-size 160 --strides 4 8 16
    python benchmarks/mask_ceiling.py --data-root data --dataset refcoco --img-size 480

It says whether blob-shaped masks are the grid's fault (the ceiling is low) or the model's
(the ceiling is high and the model is far below it).

``--sampling nearest`` adds the ceiling of CRIS's training target: the mask resized to the grid
by nearest sampling (each cell's top-left pixel), which is what a model trained with
``mask_bce_loss(upsample_logits=False)`` learns to reproduce::

    python benchmarks/mask_ceiling.py --strides 4 --sampling area nearest
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLINGS = ("area", "nearest")


def stride_reconstruction(masks: torch.Tensor, stride: int, sampling: str = "area") -> torch.Tensor:
    """The best mask a stride-``stride`` grid can give: ``masks`` area-averaged to the grid,
    upsampled back bilinearly (as the evaluation upsamples logits), thresholded at 0.5.

    Args:
        masks: ``(b h w)`` ground truth (bool or 0/1 float); ``h`` and ``w`` multiples of ``stride``.
        stride: the grid's stride (1 gives the masks back).
        sampling: ``"area"`` (the ceiling) or ``"nearest"``: the grid holds the mask resized
            with nearest sampling (``F.interpolate(mode="nearest")``: each cell's top-left
            pixel), the training target of CRIS's loss.

    Returns:
        ``(b h w)`` bool.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (b h w), got {tuple(masks.shape)}")
    if stride < 1 or masks.shape[-1] % stride or masks.shape[-2] % stride:
        raise ValueError(f"the mask sides {tuple(masks.shape[-2:])} must be multiples of stride {stride}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    truth = (masks.float() > 0.5)[:, None].float()
    if sampling == "area":
        low = F.avg_pool2d(truth, stride)
    else:
        low = F.interpolate(truth, size=(truth.shape[-2] // stride, truth.shape[-1] // stride), mode="nearest")
    return F.interpolate(low, size=truth.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > 0.5


def stride_ceiling_iou(masks: torch.Tensor, stride: int, sampling: str = "area") -> torch.Tensor:
    """Per-mask IoU ``(b)`` of :func:`stride_reconstruction` against the masks themselves
    (:mod:`vlaligner.metrics`' convention: an empty mask rebuilt empty counts 1)."""
    from vlaligner.metrics import intersection_union, iou_from_counts

    rebuilt = stride_reconstruction(masks, stride, sampling)
    return iou_from_counts(*intersection_union(rebuilt, masks.float() > 0.5))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=None, help="refer layout (default: the demo's synthetic set)")
    p.add_argument("--dataset", default="refcoco")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--split", default="val")
    p.add_argument("--img-size", type=int, default=128, help="input side the masks are resized to")
    p.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--sampling", nargs="+", choices=SAMPLINGS, default=["area"],
                   help="how the mask reaches the grid: area (the ceiling) and/or nearest (CRIS's training target)")
    p.add_argument("--synthetic-images", type=int, default=800)
    args = p.parse_args(argv)
    if any(args.img_size % s for s in args.strides):
        p.error(f"--img-size {args.img_size} must be a multiple of every stride {args.strides}")

    from vlaligner.data import RefDataset
    from vlaligner.data.cache import default_cache_dir, ensure_synthetic_set
    from vlaligner.metrics import METRIC_KEYS, ris_metrics

    root = args.data_root
    if root is None:
        root = ensure_synthetic_set(default_cache_dir(), num_images=args.synthetic_images, log=print)
    data = RefDataset(root, args.dataset, args.split_by, args.split, img_size=args.img_size)
    masks: List[torch.Tensor] = []
    for i in range(len(data)):
        mask = torch.as_tensor(data[i]["mask"]).float()
        masks.append(mask.reshape(mask.shape[-2:]))
    stack = torch.stack(masks)
    area = 100 * stack.flatten(1).mean(1).median().item()
    print(f"{args.dataset} {args.split}: {len(data)} masks at {args.img_size} px; median object area "
          f"{area:.2f} % of the image")
    keys = [k for k in METRIC_KEYS if k != "oIoU"]  # mIoU and Pr@0.5-0.9, as the evaluation reports
    print("| stride | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    truth = stack > 0.5
    for sampling in args.sampling:
        for stride in args.strides:
            row = ris_metrics(stride_reconstruction(stack, stride, sampling), truth)
            label = str(stride) if sampling == "area" else f"{stride} ({sampling})"
            print(f"| {label} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
