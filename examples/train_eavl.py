#!/usr/bin/env python
"""Train EAVL for referring image segmentation, from one CPU to many GPUs.

Axis legend: b batch (per process and step), l words, S input size, h w logit grid (S / 4).

With no arguments (or ``--demo``) this runs the embedded demo: it generates the synthetic
referring set once into a cache folder, trains the tiny model on the CPU for about ten
minutes, evaluates it and writes ``runs/demo/predictions.png``::

    python examples/train_eavl.py

The paper's recipe (Swin-B + BERT-base, Adam, lr 5e-5, poly decay 0.9 per iteration,
40 epochs, global batch 32, input 480, BCE) is the default otherwise::

    python examples/train_eavl.py --data-root data --dataset refcoco --output-dir runs/refcoco
    torchrun --nproc_per_node=8 examples/train_eavl.py --data-root data --dataset refcoco \\
        --output-dir runs/refcoco --amp bf16
    python examples/train_eavl.py ... --resume          # continue runs/refcoco/last

Outputs in ``--output-dir``: ``last/`` and ``best/`` (each an ``EAVL.from_pretrained`` folder
plus ``training_state.{safetensors,json}``), ``train.log``, ``losses.jsonl`` (one line per
step), ``metrics.jsonl`` (one line per evaluation), ``curves.png``, ``predictions.png`` and
TensorBoard events in ``tb/`` when TensorBoard is installed. See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from vlaligner import engine
from vlaligner.engine import DistEnv, ShardedSampler

LOG = logging.getLogger("vlaligner.train")

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLIT_BYS = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google")}

# The paper's recipe (spec section 7); used for every option the command line leaves unset.
PAPER_DEFAULTS: dict[str, Any] = dict(
    model="swin-b", epochs=40, batch_size=32, lr=5e-5, img_size=None, output_dir=None,
    device="auto", synthetic_images=800, dice_weight=0.0, num_workers=4, threads=None,
)
# The embedded demo: the tiny model on the synthetic set, tuned for about ten minutes on
# 2 CPU cores (see docs/training.md for how these numbers were chosen).
DEMO_DEFAULTS: dict[str, Any] = dict(
    model="tiny", epochs=8, batch_size=16, lr=3e-4, img_size=128, output_dir="runs/demo",
    device="cpu", synthetic_images=800, dice_weight=1.0,
    # One compute thread and one loader process: on 2 shared cores two OpenMP threads slow
    # down 3x as soon as anything else runs (measured); the loader uses the other core.
    num_workers=1, threads=1,
)
NUM_PREVIEW = 8  # validation samples drawn in predictions.png


# ============================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    """The command line (options whose default depends on --demo default to None here)."""
    p = argparse.ArgumentParser(
        prog="train_eavl.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With no arguments at all the embedded demo runs (same as --demo).",
    )
    g = p.add_argument_group("preset")
    g.add_argument("--demo", action="store_true",
                   help="the embedded demo: synthetic set, tiny model, CPU, ~10 min; explicit options "
                        f"still override it (demo values: {DEMO_DEFAULTS})")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("tiny", "swin-b"), default=None,
                   help="architecture (default swin-b; tiny with --demo)")
    g.add_argument("--pretrained", action="store_true",
                   help="start Swin-B / BERT from pretrained weights available offline (timm / HF cache)")
    g.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                   help="start from the weights of an EAVL checkpoint folder (fine-tuning)")
    g.add_argument("--num-queries", type=int, default=None, help="N queries (paper 24; ablation 1-32)")
    g.add_argument("--head", choices=("aligner", "fixed"), default="aligner",
                   help="aligner (dynamic query kernels) or the fixed-kernel baseline of table III")
    g.add_argument("--no-estimator", action="store_true", help="equal query weights 1/N (no Multi-Query Estimator)")
    g.add_argument("--no-global-vision", action="store_true", help="ablation without F_g in Eq. 8")
    g.add_argument("--no-global-text", action="store_true", help="ablation without F_s in Eq. 2")
    g.add_argument("--kernel-size", type=int, default=None, help="dynamic kernel size k (default 3)")
    g.add_argument("--model-kwargs", type=json.loads, default=None, metavar="JSON",
                   help="extra keyword arguments for the builder, e.g. '{\"dim\": 64}'")

    g = p.add_argument_group("data")
    g.add_argument("--data-root", type=Path, default=None,
                   help="root of the refer layout (refcoco/, images/mscoco/...); without it the synthetic "
                        "set is generated once into --cache-dir")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where the synthetic set lives (default {engine.default_cache_dir()})")
    g.add_argument("--synthetic-images", type=int, default=None, help="images in the synthetic set (default 800)")
    g.add_argument("--dataset", default="refcoco", help=f"one of {', '.join(DATASETS)} (default refcoco)")
    g.add_argument("--split-by", default=None, help="unc (RefCOCO/+), umd or google (G-Ref); default per data set")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val", help="split evaluated during training (best checkpoint)")
    g.add_argument("--img-size", type=int, default=None, help="input side S (default: the model's, 480 for Swin-B)")
    g.add_argument("--augment", action="store_true", help="random flip that swaps left/right in the sentence")
    g.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="use only the first N training samples (quick runs)")
    g.add_argument("--val-samples", type=int, default=None, metavar="N",
                   help="evaluate on the first N validation samples only (quick runs)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loading processes per training process (default 4; 1 with --demo)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 40)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (also the length of the lr schedule)")
    g.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch per optimizer step (default 32)")
    g.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches accumulated per step; per-process batch = batch-size / (world x accum)")
    g.add_argument("--batch-per-step", type=int, default=None,
                   help="per-process micro-batch instead of --grad-accum (accum = batch-size / (world x this))")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-5)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--poly-power", type=float, default=0.9, help="polynomial decay power, per iteration")
    g.add_argument("--dice-weight", type=float, default=None,
                   help="add this times a soft Dice loss to the BCE (default 0 as the paper; 1 with --demo)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision on GPU (fp16 uses a gradient scaler)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=Path, default=None, help="default runs/<model>-<dataset> (runs/demo)")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto; cpu with --demo)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default torch's; 1 with --demo)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: every epoch)")
    g.add_argument("--save-every", type=int, default=0, help="also save last/ every N steps (0: every epoch only)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="per-process evaluation batch")
    g.add_argument("--best-metric", choices=("mIoU", "oIoU"), default="mIoU")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last")
    g.add_argument("--overwrite", action="store_true", help="start over in an output dir that holds a checkpoint")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for partial graphs")
    g.add_argument("--log-every", type=int, default=20, help="write a train.log line every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Test hooks: stop as if killed right after step N (after any save due then), and dump
    # a digest of the parameters of every process at the end.
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--debug-param-digest", action="store_true", help=argparse.SUPPRESS)
    return p


class UsageError(ValueError):
    """A command-line mistake, reported before any heavy work."""


def resolve_args(argv: Optional[Sequence[str]] = None, env: Optional[DistEnv] = None) -> argparse.Namespace:
    """Parse and check the command line; cheap (no model, no data), so mistakes fail fast.

    Raises:
        UsageError: with a message that names the option and the value received.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = " ".join(shlex.quote(a) for a in ["train_eavl.py", *argv])
    if not argv:
        args.demo = True
    env = env or DistEnv.from_environ()
    preset = DEMO_DEFAULTS if args.demo else PAPER_DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.dataset not in DATASETS:
        raise UsageError(f"unknown --dataset {args.dataset!r}; expected one of {', '.join(DATASETS)}")
    if args.split_by is None:
        args.split_by = DEFAULT_SPLIT_BY[args.dataset]
    if args.split_by not in SPLIT_BYS[args.dataset]:
        raise UsageError(
            f"--split-by {args.split_by!r} does not exist for {args.dataset}; expected one of "
            f"{', '.join(SPLIT_BYS[args.dataset])}"
        )
    for name in ("epochs", "batch_size", "synthetic_images"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "grad_accum", "batch_per_step", "eval_batch_size", "threads", "stop_after_steps",
                 "train_samples", "val_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("eval_every", "save_every", "num_workers"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.dice_weight < 0:
        raise UsageError(f"--dice-weight must be >= 0, got {args.dice_weight}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.img_size is not None and (args.img_size < 32 or args.img_size % 32):
        raise UsageError(f"--img-size must be a positive multiple of 32 (the backbone's coarsest stride), got {args.img_size}")
    if args.kernel_size is not None and (args.kernel_size < 1 or args.kernel_size % 2 == 0):
        raise UsageError(f"--kernel-size must be an odd positive int (same padding), got {args.kernel_size}")
    if args.num_queries is not None and args.num_queries < 1:
        raise UsageError(f"--num-queries must be >= 1, got {args.num_queries}")
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")

    # Global batch = world size x accumulation x per-process micro-batch, exactly.
    world = env.world_size
    if args.batch_per_step is not None:
        per = world * args.batch_per_step
        if args.batch_size % per:
            raise UsageError(
                f"--batch-size {args.batch_size} is not divisible by world size {world} x "
                f"--batch-per-step {args.batch_per_step} = {per}"
            )
        accum = args.batch_size // per
        if args.grad_accum is not None and args.grad_accum != accum:
            raise UsageError(
                f"--grad-accum {args.grad_accum} contradicts --batch-per-step {args.batch_per_step}: "
                f"{args.batch_size} / ({world} x {args.batch_per_step}) = {accum}"
            )
        args.grad_accum = accum
    else:
        args.grad_accum = args.grad_accum or 1
        per = world * args.grad_accum
        if args.batch_size % per:
            raise UsageError(
                f"--batch-size {args.batch_size} is not divisible by world size {world} x "
                f"--grad-accum {args.grad_accum} = {per}; choose a global batch that is a multiple of {per}"
            )
        args.batch_per_step = args.batch_size // per
    args.world_size = world
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_per_step

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but no CUDA device is visible")
    if args.amp != "none" and device.type != "cuda":
        raise UsageError(f"--amp {args.amp} needs a CUDA device (got --device {args.device}); use --amp none on CPU")

    if args.data_root is not None:
        try:
            engine.check_data_root(args.data_root, args.dataset, args.split_by)
        except FileNotFoundError as err:
            raise UsageError(f"--data-root: {err}") from None
    elif args.dataset != "refcoco" or args.split_by != "unc":
        raise UsageError(
            f"without --data-root the synthetic set is used, which has refcoco (unc) only; "
            f"got --dataset {args.dataset} --split-by {args.split_by}: pass --data-root for real data"
        )
    if args.cache_dir is None:
        args.cache_dir = engine.default_cache_dir()
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{args.model}-{args.dataset}"
    args.output_dir = Path(args.output_dir)
    last = args.output_dir / "last"
    if args.resume and engine.resolve_checkpoint_dir(last) is None:
        raise UsageError(f"--resume: no checkpoint in {last} (nor {last}.old); run without --resume to start")
    if (
        not args.resume and not args.overwrite and not args.demo
        and engine.resolve_checkpoint_dir(last) is not None
    ):
        raise UsageError(
            f"{args.output_dir} already holds a checkpoint ({last}); pass --resume to continue it "
            "or --overwrite to start over"
        )
    if args.init_from is not None and not (args.init_from / "model.safetensors").is_file():
        raise UsageError(f"--init-from {args.init_from} has no model.safetensors (an EAVL checkpoint folder)")
    if args.pretrained and args.model != "swin-b":
        raise UsageError("--pretrained applies to --model swin-b (the tiny model has no pretrained weights)")
    return args


# ============================================================================ set-up pieces
class _TqdmHandler(logging.Handler):
    """Log lines printed through tqdm.write, so that they do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(output_dir: Path, env: DistEnv, *, append: bool) -> None:
    LOG.handlers.clear()
    LOG.propagate = False
    if env.is_main:
        LOG.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(output_dir / "train.log", mode="a" if append else "w")
        file_handler.setFormatter(fmt)
        LOG.addHandler(file_handler)
        stream = _TqdmHandler()
        stream.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(stream)
    else:
        LOG.setLevel(logging.WARNING)
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(f"[rank {env.rank}] %(levelname)s %(message)s"))
        LOG.addHandler(stream)


def init_distributed(env: DistEnv, device: torch.device) -> None:
    if not env.distributed:
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def build_model(args: argparse.Namespace):
    """The EAVL model named by ``--model`` with every ablation switch of the command line."""
    from vlaligner.models import build_eavl_swin_b, build_eavl_tiny

    kwargs: dict[str, Any] = dict(args.model_kwargs or {})
    kwargs.update(
        head=args.head,
        use_estimator=not args.no_estimator,
        use_global_vision=not args.no_global_vision,
        use_global_text=not args.no_global_text,
    )
    if args.num_queries is not None:
        kwargs["num_queries"] = args.num_queries
    if args.kernel_size is not None:
        kwargs["kernel_size"] = args.kernel_size
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.model == "swin-b":
        return build_eavl_swin_b(pretrained=args.pretrained, **kwargs)
    return build_eavl_tiny(**kwargs)


def make_datasets(args: argparse.Namespace, model, data_root: Path):
    from vlaligner.data import RefDataset

    common = dict(tokenizer=model.tokenize, img_size=args.img_size)
    train = RefDataset(data_root, args.dataset, args.split_by, args.train_split, augment=args.augment, **common)
    val = RefDataset(data_root, args.dataset, args.split_by, args.val_split, **common)
    if args.train_samples is not None and args.train_samples < len(train):
        train = torch.utils.data.Subset(train, range(args.train_samples))
    if args.val_samples is not None and args.val_samples < len(val):
        val = torch.utils.data.Subset(val, range(args.val_samples))
    return train, val


def _image_path(dataset, index: int) -> Path:
    """The image file of sample ``index`` of a RefDataset or of a Subset of one."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset.image_path(index)


def make_loader(dataset, sampler, batch_size: int, args: argparse.Namespace, device: torch.device, seed: int):
    from vlaligner.data import collate_ref_batch

    # An explicit generator: otherwise creating the iterator draws from the global torch RNG,
    # and a resumed run (which creates it at another point of the stream) would diverge.
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=collate_ref_batch,
        pin_memory=device.type == "cuda",
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
    )


def gather_rng_states(env: DistEnv) -> list:
    """Every process's RNG states, in rank order (a collective: call it on all ranks)."""
    state = engine.capture_rng_state()
    if not env.distributed:
        return [state]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    dist.all_gather_object(out, state)
    return out


def param_digest(model) -> str:
    """SHA-256 over every parameter's bytes, in name order (identical weights <=> same digest)."""
    h = hashlib.sha256()
    for name, p in sorted(engine.unwrap_model(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the lines written after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    keep = [r for r in engine._read_jsonl(path) if int(r.get("step", 0)) <= max_step]
    with open(path, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # TensorBoard is optional: skip silently
        return None
    return SummaryWriter(str(output_dir / "tb"))


# ============================================================================ training
class Trainer:
    """One training run: owns the model, optimizer, schedule, loaders and output files."""

    def __init__(self, args: argparse.Namespace, env: DistEnv) -> None:
        self.args = args
        self.env = env
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", env.local_rank)
        self.out = Path(args.output_dir)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        args, env = self.args, self.env
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        init_distributed(env, self.device)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._barrier()
        setup_logging(self.out, env, append=args.resume)
        LOG.info("command: %s", args.command)
        if args.demo:
            LOG.info("embedded demo: synthetic set, tiny model, %s (see docs/training.md)", args.device)

        if args.data_root is None:
            self.data_root = engine.ensure_synthetic_set(
                args.cache_dir, num_images=args.synthetic_images, seed=0, log=LOG.info
            )
            LOG.info("data: synthetic set in %s", self.data_root)
        else:
            self.data_root = Path(args.data_root)

        engine.seed_everything(args.seed)  # same initial weights on every process
        model = build_model(args)
        if args.img_size is None:
            args.img_size = model.img_size
        if args.init_from is not None:
            engine.load_model_weights(model, args.init_from)
            LOG.info("initialised from %s", args.init_from)
        elif args.model == "swin-b" and not args.pretrained and not args.resume:
            LOG.warning(
                "Swin-B and BERT-base start from random weights; the paper starts from ImageNet Swin-B "
                "and pretrained BERT-base: pass --pretrained (weights from the local timm / Hugging Face caches)"
            )
        self.model = model.to(self.device)
        self.train_set, self.val_set = make_datasets(args, model, self.data_root)
        if len(self.train_set) < args.batch_size:
            raise UsageError(
                f"the {args.train_split} split has {len(self.train_set)} samples, fewer than one global "
                f"batch (--batch-size {args.batch_size})"
            )
        self.train_sampler = ShardedSampler(
            len(self.train_set), num_replicas=env.world_size, rank=env.rank, shuffle=True,
            seed=args.seed, global_batch_size=args.batch_size,
        )
        self.val_sampler = ShardedSampler(len(self.val_set), num_replicas=env.world_size, rank=env.rank, shuffle=False)
        self.steps_per_epoch = self.train_sampler.steps_per_epoch
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            self.total_steps = min(self.total_steps, args.max_steps)

        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = engine.build_poly_scheduler(self.optimizer, total_steps=self.total_steps, power=args.poly_power)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")

        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_score = -math.inf
        self.best_step: Optional[int] = None
        self.last_eval_step: Optional[int] = None
        if args.resume:
            self._resume()
        elif env.is_main:
            # A fresh start (--overwrite, or the demo again): nothing of an older run may
            # survive, or a stale best/ could outlive this run's first evaluation.
            import shutil

            for name in ("losses.jsonl", "metrics.jsonl", "curves.png", "predictions.png"):
                (self.out / name).unlink(missing_ok=True)
            for name in ("last", "last.old", "best", "best.old"):
                shutil.rmtree(self.out / name, ignore_errors=True)
        # Dropout differs per process (as independent GPUs would), deterministically.
        if not args.resume:
            engine.seed_everything(args.seed + env.rank)

        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=args.find_unused_parameters,
            )
        else:
            self.ddp = self.model
        self.writer = _tensorboard(self.out) if env.is_main else None

        n_params = sum(p.numel() for p in model.parameters())
        LOG.info(
            "model %s (%.2f M parameters, input %d), %s: %d train / %d %s samples",
            args.model, n_params / 1e6, args.img_size, args.dataset, len(self.train_set), len(self.val_set), args.val_split,
        )
        LOG.info(
            "global batch %d = %d process(es) x %d accumulation x %d per step; %d steps/epoch, %d steps in all; "
            "Adam lr %g, poly %.1f; device %s%s",
            args.batch_size, env.world_size, args.grad_accum, args.batch_per_step, self.steps_per_epoch,
            self.total_steps, args.lr, args.poly_power, self.device, f", amp {args.amp}" if self.amp_dtype else "",
        )

    def _resume(self) -> None:
        args, env = self.args, self.env
        state = engine.load_checkpoint(self.out / "last")
        engine.load_model_weights(self.model, state["path"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_total = self.scheduler.lr_lambdas[0].total_steps
        if saved_total != self.total_steps:
            LOG.warning(
                "the lr schedule of the checkpoint spans %d steps, this run %d (changed --epochs/--max-steps/"
                "--batch-size?): continuing with %d", saved_total, self.total_steps, self.total_steps,
            )
            self.scheduler.lr_lambdas[0].total_steps = self.total_steps
        if state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        saved_best = state.get("best_score")
        self.best_score = -math.inf if saved_best is None else float(saved_best)
        self.best_step = state.get("best_step")
        self.last_eval_step = state.get("last_eval_step")
        rng = state.get("rng") or []
        if len(rng) == env.world_size:
            engine.restore_rng_state(rng[env.rank])
        else:
            LOG.warning(
                "the checkpoint holds RNG states of %d process(es), this run has %d: reseeding from --seed",
                len(rng), env.world_size,
            )
            engine.seed_everything(args.seed + env.rank + self.step)
        saved_args = state.get("args", {})
        for key in ("batch_size", "lr", "model", "dataset", "seed", "img_size"):
            if key in saved_args and saved_args[key] != _jsonable(getattr(args, key)):
                LOG.warning("--%s differs from the checkpoint's (%r vs %r)", key.replace("_", "-"), getattr(args, key), saved_args[key])
        if env.is_main:
            for name in ("losses.jsonl", "metrics.jsonl"):
                _truncate_jsonl(self.out / name, self.step)
        LOG.info("resumed from %s at step %d (epoch %d, step %d of it)", state["path"], self.step, self.epoch + 1, self.step_in_epoch)

    def _epoch_of_step(self) -> int:
        """The 1-based epoch that step ``self.step`` belongs to (the same in resumed runs)."""
        return (max(self.step, 1) - 1) // self.steps_per_epoch + 1

    def _barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def save(self, name: str) -> None:
        """Write OUTPUT_DIR/<name> (collective: every process contributes its RNG state)."""
        rng = gather_rng_states(self.env)
        if not self.env.is_main:
            return
        extra = dict(
            step=self.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            best_score=self.best_score if math.isfinite(self.best_score) else None,
            best_metric=self.args.best_metric, best_step=self.best_step, last_eval_step=self.last_eval_step,
            world_size=self.env.world_size, total_steps=self.total_steps,
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        t0 = time.perf_counter()
        engine.save_checkpoint(
            self.out / name, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, rng_states=rng, args=vars(self.args), extra=extra,
        )
        LOG.info("saved %s at step %d (%.1f s)", self.out / name, self.step, time.perf_counter() - t0)

    # ------------------------------------------------------------------ evaluation
    def run_eval(self) -> dict:
        loader = make_loader(self.val_set, self.val_sampler, self.args.eval_batch_size, self.args, self.device, seed=0)
        t0 = time.perf_counter()
        metrics = engine.evaluate(
            self.model, loader, device=self.device, amp_dtype=self.amp_dtype,
            progress=not self.args.no_progress, description=f"eval {self.args.val_split}",
        )
        self.last_eval_step = self.step
        score = metrics[self.args.best_metric]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_step = score, self.step
        if self.env.is_main:
            row = dict(step=self.step, epoch=self._epoch_of_step(), split=self.args.val_split, metrics=metrics,
                       time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            _append_jsonl(self.out / "metrics.jsonl", row)
            LOG.info(
                "eval %s at step %d: oIoU %.2f mIoU %.2f Pr@0.5 %.2f Pr@0.7 %.2f Pr@0.9 %.2f (%d samples, %.1f s)%s",
                self.args.val_split, self.step, metrics["oIoU"], metrics["mIoU"], metrics["Pr@0.5"],
                metrics["Pr@0.7"], metrics["Pr@0.9"], metrics.get("num_samples", 0), time.perf_counter() - t0,
                " new best" if improved else "",
            )
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(f"{self.args.val_split}/{key}", value, self.step)
        if improved:
            self.save("best")
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        args, env = self.args, self.env
        from vlaligner.losses import mask_bce_loss

        per_rank_step = args.batch_per_step * args.grad_accum
        t_start = time.perf_counter()
        start_step = self.step
        while self.step < self.total_steps and self.epoch < args.epochs:
            self.train_sampler.set_epoch(self.epoch, skip=self.step_in_epoch * per_rank_step)
            loader = make_loader(
                self.train_set, self.train_sampler, args.batch_per_step, args, self.device,
                seed=engine._epoch_seed(args.seed, self.epoch) + self.step_in_epoch,
            )
            batches = iter(loader)
            self.ddp.train()
            bar = None
            if env.is_main and not args.no_progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, dynamic_ncols=True,
                           desc=f"epoch {self.epoch + 1}/{args.epochs}", leave=False)
            ema_rate: Optional[float] = None
            while self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss_sum = torch.zeros((), device=self.device)
                for micro in range(args.grad_accum):
                    batch = next(batches)
                    sync = micro == args.grad_accum - 1 or not env.distributed
                    with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                            out = self.ddp(
                                batch["image"].to(self.device, non_blocking=True),
                                batch["input_ids"].to(self.device, non_blocking=True),
                                batch["attention_mask"].to(self.device, non_blocking=True),
                            )
                        target = batch["mask"].to(self.device, non_blocking=True)
                        loss = mask_bce_loss(out.logits.float(), target)
                        if args.dice_weight:
                            loss = loss + args.dice_weight * engine.soft_dice_loss(out.logits.float(), target)
                        self.scaler.scale(loss / args.grad_accum).backward()
                    loss_sum += loss.detach()
                if args.clip_grad > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                self.step_in_epoch += 1

                mean_loss = loss_sum / args.grad_accum
                if env.distributed:
                    import torch.distributed as dist

                    dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
                    mean_loss /= env.world_size
                loss_value = float(mean_loss)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"the training loss became {loss_value} at step {self.step}: lower --lr, or use --amp bf16 "
                        "instead of fp16"
                    )
                rate = args.batch_size / max(time.perf_counter() - t0, 1e-9)
                ema_rate = rate if ema_rate is None else 0.9 * ema_rate + 0.1 * rate
                if env.is_main:
                    _append_jsonl(self.out / "losses.jsonl", dict(step=self.step, epoch=self._epoch_of_step(), loss=loss_value, lr=lr))
                    if self.writer is not None:
                        self.writer.add_scalar("train/loss", loss_value, self.step)
                        self.writer.add_scalar("train/lr", lr, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{ema_rate:.1f}")
                        bar.update(1)
                    if args.log_every and self.step % args.log_every == 0:
                        LOG.info("step %d/%d epoch %d loss %.4f lr %.3e %.1f img/s",
                                 self.step, self.total_steps, self.epoch + 1, loss_value, lr, ema_rate)

                epoch_done = self.step_in_epoch == self.steps_per_epoch
                finished = self.step >= self.total_steps
                if not epoch_done and not finished:
                    if args.eval_every and self.step % args.eval_every == 0:
                        self.run_eval()
                    if args.save_every and self.step % args.save_every == 0:
                        self.save("last")
                if args.stop_after_steps is not None and self.step >= args.stop_after_steps and not (epoch_done or finished):
                    LOG.warning("stopping after step %d (--stop-after-steps), as if interrupted", self.step)
                    raise _Interrupted()
            if bar is not None:
                bar.close()
            del batches, loader
            if self.step_in_epoch == self.steps_per_epoch:
                # End of an epoch: evaluate (unless evaluating by steps), then save last/ at
                # the start of the next epoch.
                self.epoch += 1
                self.step_in_epoch = 0
                if not args.eval_every or self.step % args.eval_every == 0:
                    self.run_eval()
            if self.step >= self.total_steps and self.last_eval_step != self.step:
                self.run_eval()  # the final model is always evaluated
            self.save("last")
            elapsed = time.perf_counter() - t_start
            if env.is_main and self.step > start_step:
                LOG.info("%d steps in %.1f s: %.2f img/s (global)", self.step - start_step, elapsed,
                         (self.step - start_step) * args.batch_size / elapsed)
            if args.stop_after_steps is not None and self.step >= args.stop_after_steps and self.step < self.total_steps:
                LOG.warning("stopping after step %d (--stop-after-steps), as if interrupted", self.step)
                raise _Interrupted()

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        args, env = self.args, self.env
        if args.debug_param_digest:
            digest = param_digest(self.model)
            (self.out / f"param_digest.rank{env.rank}.txt").write_text(digest + "\n")
        summary: dict = {}
        if env.is_main:
            if self.writer is not None:
                self.writer.close()
            engine.plot_training_curves(self.out / "losses.jsonl", self.out / "metrics.jsonl", self.out / "curves.png",
                                        metric=args.best_metric)
            rows = [r for r in engine._read_jsonl(self.out / "metrics.jsonl") if r.get("split") == args.val_split]
            best = next((r for r in rows if r["step"] == self.best_step), None)
            results = {}
            if rows:
                results[f"{args.val_split} (last, step {rows[-1]['step']})"] = rows[-1]["metrics"]
            if best is not None:
                results[f"{args.val_split} (best, step {best['step']})"] = best["metrics"]
                with open(self.out / "best" / "metrics.json", "w") as f:
                    json.dump({args.val_split: best["metrics"]}, f, indent=1)
            LOG.info("results:\n%s", engine.format_metrics_table(results))
            self.write_predictions()
            LOG.info("curves: %s, predictions: %s", self.out / "curves.png", self.out / "predictions.png")
            summary = {"best": best, "last": rows[-1] if rows else None}
        self._barrier()
        return summary

    def write_predictions(self) -> None:
        """predictions.png: a few validation samples predicted by the best checkpoint."""
        import numpy as np

        from vlaligner.data import collate_ref_batch, load_image

        model = self.model
        best = self.out / "best"
        if (best / "model.safetensors").is_file():
            engine.load_model_weights(model, best)
        n = min(NUM_PREVIEW, len(self.val_set))
        indices = sorted({int(i) for i in np.linspace(0, len(self.val_set) - 1, n)})
        batch = collate_ref_batch([self.val_set[i] for i in indices])
        preds = engine.predict_masks(model, batch, device=self.device, amp_dtype=self.amp_dtype)
        images = [np.asarray(load_image(_image_path(self.val_set, i))) for i in indices]
        targets = [m.numpy() for m in batch["orig_mask"]]
        ious = []
        for p, t in zip(preds, targets):
            union = np.logical_or(p.numpy(), t).sum()
            ious.append(float(np.logical_and(p.numpy(), t).sum() / union) if union else 1.0)
        engine.save_prediction_grid(self.out / "predictions.png", images, [p.numpy() for p in preds], targets,
                                    batch["sentence"], ious=ious)


class _Interrupted(Exception):
    """Raised by --stop-after-steps to end the run the way a kill would (no final steps)."""


def _jsonable(value: Any) -> Any:
    return engine._jsonable(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    t0 = time.perf_counter()
    env = DistEnv.from_environ()
    parser = build_parser()
    try:
        args = resolve_args(argv, env)
    except UsageError as err:
        parser.error(str(err))  # exits with status 2 and the usage line
    trainer = Trainer(args, env)
    try:
        trainer.setup()
        trainer.train()
        trainer.finish()
        if env.is_main:
            LOG.info("done in %.1f min (wall, from start-up); checkpoints in %s (evaluate with "
                     "examples/evaluate.py --checkpoint %s)",
                     (time.perf_counter() - t0) / 60, args.output_dir, args.output_dir / "best")
    except UsageError as err:
        if env.is_main:
            print(f"train_eavl.py: error: {err}", file=sys.stderr)
        return 2
    except _Interrupted:
        return 3
    finally:
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
