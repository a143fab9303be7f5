#!/usr/bin/env python
"""Evaluate an EAVL checkpoint: oIoU, mIoU and Precision@0.5-0.9 per split.

Axis legend: b batch, S input size, H W original image size.

    python examples/evaluate.py --checkpoint runs/refcoco/best --data-root data \\
        --dataset refcoco --split val testA testB
    python examples/evaluate.py --checkpoint runs/demo/best          # the demo's synthetic set

Predictions are compared with the ground truth at the original image size (CRIS / VLT);
``--resized`` compares at the input size instead (LAVT's convention). Without ``--data-root``
the data settings of the training run (read from the checkpoint's ``training_state.json``)
are used, and else the synthetic set in the cache folder. Prints a table and writes
``metrics.json`` next to the checkpoint: ``{split: {"oIoU": ..., "mIoU": ..., "Pr@0.5": ...}}``
in percent. Runs under ``torchrun`` too (each process takes a share; sums are all-reduced).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from vlaligner import engine
from vlaligner.engine import DistEnv, ShardedSampler

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="an EAVL checkpoint folder (e.g. runs/x/best), or a training output dir (uses its best/)")
    p.add_argument("--data-root", type=Path, default=None, help="root of the refer layout; default: the training run's")
    p.add_argument("--cache-dir", type=Path, default=None, help="synthetic set folder (without --data-root)")
    p.add_argument("--synthetic-images", type=int, default=None, help="images of the synthetic set")
    p.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (default: the training run's)")
    p.add_argument("--split-by", default=None, help="unc, umd or google (default per data set)")
    p.add_argument("--split", nargs="+", default=["val"], help="one or more splits (default val)")
    p.add_argument("--resized", action="store_true", help="compare at the input size (LAVT) instead of the original size")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="per-process batch")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of the mask")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast on GPU")
    p.add_argument("--output", type=Path, default=None, help="metrics file (default CHECKPOINT/metrics.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


class UsageError(ValueError):
    """A command-line mistake, reported before the model is built."""


def resolve_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, fill defaults from the training run, and check (cheap: nothing is built)."""
    args = build_parser().parse_args(argv)
    ckpt = args.checkpoint
    if not ckpt.is_dir():
        raise UsageError(f"--checkpoint {ckpt} does not exist")
    if not (ckpt / "model.safetensors").is_file():
        if (ckpt / "best" / "model.safetensors").is_file():
            ckpt = ckpt / "best"
        else:
            raise UsageError(
                f"--checkpoint {ckpt} holds no model.safetensors (an EAVL checkpoint folder, e.g. OUTPUT_DIR/best)"
            )
    args.checkpoint = ckpt
    trained: dict[str, Any] = {}
    state_file = ckpt / engine.TRAINING_STATE_JSON
    if state_file.is_file():
        try:
            trained = json.loads(state_file.read_text()).get("args", {})
        except ValueError:
            trained = {}
    if args.data_root is None and args.dataset is None and trained.get("data_root"):
        args.data_root = Path(trained["data_root"])
    if args.dataset is None:
        args.dataset = trained.get("dataset") or "refcoco"
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown --dataset {args.dataset!r}; expected one of {', '.join(DATASETS)}")
    if args.split_by is None:
        same = trained.get("dataset") == args.dataset and trained.get("split_by")
        args.split_by = trained["split_by"] if same else DEFAULT_SPLIT_BY[args.dataset]
    if (args.dataset, args.split_by) not in SPLITS:
        raise UsageError(f"--split-by {args.split_by!r} does not exist for {args.dataset}")
    known = SPLITS[(args.dataset, args.split_by)]
    for split in args.split:
        if split not in known:
            raise UsageError(f"unknown --split {split!r} for {args.dataset} ({args.split_by}); expected {', '.join(known)}")
    if args.data_root is not None:
        try:
            engine.check_data_root(args.data_root, args.dataset, args.split_by)
        except FileNotFoundError as err:
            raise UsageError(f"--data-root: {err}") from None
    else:
        if (args.dataset, args.split_by) != ("refcoco", "unc"):
            raise UsageError("without --data-root the synthetic set is used, which has refcoco (unc) only")
        if args.cache_dir is None:
            args.cache_dir = Path(trained["cache_dir"]) if trained.get("cache_dir") else engine.default_cache_dir()
        if args.synthetic_images is None:
            args.synthetic_images = int(trained.get("synthetic_images", 800))
    if args.img_size is None and trained.get("img_size"):
        args.img_size = int(trained["img_size"])
    if args.img_size is not None and (args.img_size < 32 or args.img_size % 32):
        raise UsageError(f"--img-size must be a positive multiple of 32, got {args.img_size}")
    if not 0.0 < args.threshold < 1.0:
        raise UsageError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but no CUDA device is visible")
    if args.amp != "none" and torch.device(args.device).type != "cuda":
        raise UsageError(f"--amp {args.amp} needs a CUDA device (got --device {args.device})")
    if args.output is None:
        args.output = ckpt / "metrics.json"
    return args


def run(args: argparse.Namespace, env: DistEnv) -> dict:
    """Evaluate every split asked for; returns ``{split: metrics}`` (percent)."""
    from vlaligner.data import RefDataset, collate_ref_batch
    from vlaligner.models import EAVL

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    if env.distributed and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if args.data_root is None:
        root = engine.ensure_synthetic_set(args.cache_dir, num_images=args.synthetic_images,
                                           log=lambda m: print(m, file=sys.stderr) if env.is_main else None)
    else:
        root = args.data_root
    model = EAVL.from_pretrained(args.checkpoint, map_location=device).eval()
    img_size = args.img_size or model.img_size
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    results: dict[str, dict] = {}
    for split in args.split:
        dataset = RefDataset(root, args.dataset, args.split_by, split, tokenizer=model.tokenize, img_size=img_size)
        sampler = ShardedSampler(len(dataset), num_replicas=env.world_size, rank=env.rank, shuffle=False)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
            collate_fn=collate_ref_batch, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )
        t0 = time.perf_counter()
        metrics = engine.evaluate(model, loader, device=device, at_original_size=not args.resized,
                                  threshold=args.threshold, amp_dtype=amp_dtype,
                                  progress=not args.no_progress, description=f"eval {split}")
        if env.is_main:
            print(f"{split}: {metrics['num_samples']} samples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results[split] = {k: v for k, v in metrics.items() if k != "num_samples"}
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    env = DistEnv.from_environ()
    parser = build_parser()
    try:
        args = resolve_args(argv)
    except UsageError as err:
        parser.error(str(err))
    try:
        results = run(args, env)
        if env.is_main:
            convention = "input size (LAVT)" if args.resized else "original size"
            print(f"{args.checkpoint} on {args.dataset} ({args.split_by}), compared at the {convention}, percent:")
            print(engine.format_metrics_table(results))
            args.output.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.output.with_name(args.output.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            tmp.replace(args.output)
            print(f"wrote {args.output}")
    finally:
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
