"""Train and evaluate VLT, or VLT + aligner, on RefCOCO / RefCOCO+ / G-Ref (or the synthetic set).

Axis legend: b batch, l words, S input size, h w logit grid (S / out_stride).

Usage::

    # a few CPU steps of the tiny VLT + aligner on the synthetic set (generated once into
    # the package's cache), with evaluation and best / last checkpoints in runs/vlt-tiny
    python adapters/vlt/train_vlt.py --max-steps 20 --eval-every 10 --output-dir runs/vlt-tiny
    python adapters/vlt/train_vlt.py --max-steps 40 --output-dir runs/vlt-tiny --resume
    # VLT's own fixed final kernel, for comparison (write elsewhere)
    python adapters/vlt/train_vlt.py --head fixed --max-steps 20 --output-dir runs/vlt-tiny-fixed
    # Swin-B + BERT-base on real data, 8 GPUs (folder layout: docs/data.md)
    torchrun --nproc_per_node 8 adapters/vlt/train_vlt.py --model swin-b --pretrained \\
        --bert ~/models/bert-base-uncased --data-root ~/refer_data --dataset refcoco+ \\
        --img-size 480 --batch-size 32 --lr 1e-4 --epochs 40 --amp bf16 --output-dir runs/vlt-refcoco+

The training loop is the project's (``vlaligner.training``): Adam with polynomial decay per
step, a data order that is a pure function of (seed, epoch) split over processes
(``ShardedSampler``), DistributedDataParallel under ``torchrun``, mixed precision on GPU,
evaluation (oIoU, mIoU, Pr@X at the original image size) every ``--eval-every`` steps and at
the end of each epoch, ``best/`` (by ``--best-metric``) and ``last/`` checkpoints written
atomically (``model.safetensors`` + ``vlt_config.json`` with the weights' SHA-256 +
``training_state.{safetensors,json}``: never a pickle), and ``--resume`` from ``last/`` exactly
where it stopped. The loss is VLT's: binary cross-entropy with logits against the mask
resized (nearest) to the logits.

What is VLT-specific is :class:`VLTTask` (build the host, retrofit it, tokenize, forward to
an object with ``.logits``, loss): the rest is model-agnostic and meant to move onto the
project's shared trainer when it exists.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from adapters import HEADS  # noqa: E402
from adapters.vlt.model import VLT, build_vlt_swin_b, build_vlt_tiny, vlt_loss  # noqa: E402
from adapters.vlt.retrofit import retrofit_vlt  # noqa: E402
from vlaligner.data import check_data_root, default_cache_dir, ensure_synthetic_set
from vlaligner.fileio import read_jsonl, resolve_checkpoint_dir, sha256_file
from vlaligner.training.options import UsageError as TrainingUsageError
from vlaligner.training.options import resolve_device_option as resolve_device
from vlaligner.training.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from vlaligner.training.distributed import DistEnv
from vlaligner.training.evaluation import evaluate as evaluate_masks
from vlaligner.training.rng import capture_rng_state, restore_rng_state, seed_everything
from vlaligner.training.sampler import ShardedSampler, epoch_seed
from vlaligner.training.schedule import build_poly_scheduler  # noqa: E402

__all__ = ["VLTConfig", "VLTTask", "SegmentationOutput", "train_steps", "build_parser", "resolve_args", "main"]

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLIT_BYS = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
CONFIG_NAME = "vlt_config.json"

Tokenizer = Callable[[List[str], int], Tuple[torch.Tensor, torch.Tensor]]


# ============================================================================ the VLT part
@dataclass
class SegmentationOutput:
    """What the training loop reads from a forward: ``logits (b 1 h w)``."""

    logits: torch.Tensor


@dataclass
class VLTConfig:
    """Everything that fixes the model's architecture (saved as ``vlt_config.json``)."""

    model: str = "tiny"
    head: str = "aligner"
    img_size: int = 64
    vocab_size: int = 30522
    max_length: int = 17
    num_queries: int = 24
    kernel_size: int = 3
    use_estimator: bool = True
    use_global_vision: bool = True


class VLTTask(nn.Module):
    """The model-specific part of the trainer: VLT (+ aligner), its tokenizer, forward and loss.

    ``forward(images (b 3 S S), input_ids (b l), attention_mask (b l))`` returns a
    :class:`SegmentationOutput` with ``logits (b 1 S/out_stride S/out_stride)``; ``loss(out,
    mask (b S S))`` is VLT's BCE. ``self.model`` is the VLT module whose ``state_dict`` the
    checkpoints hold (VLT's own keys; with the aligner, plus ``aligner.*`` and
    ``query_generator.*``).
    """

    def __init__(self, config: VLTConfig, *, bert: Optional[str] = None, pretrained: bool = False) -> None:
        super().__init__()
        if config.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {config.head!r}")
        if config.model == "tiny":
            host: VLT = build_vlt_tiny(img_size=config.img_size, vocab_size=config.vocab_size,
                                       max_length=config.max_length)
        elif config.model == "swin-b":
            host = build_vlt_swin_b(img_size=config.img_size, bert=bert, pretrained=pretrained)
        else:
            raise ValueError(f"model must be 'tiny' or 'swin-b', got {config.model!r}")
        self.config = config
        self.model = retrofit_vlt(
            host, head=config.head, num_queries=config.num_queries, kernel_size=config.kernel_size,
            use_estimator=config.use_estimator, use_global_vision=config.use_global_vision,
        )

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SegmentationOutput:
        return SegmentationOutput(logits=self.model(images, input_ids, attention_mask))

    @staticmethod
    def loss(out: SegmentationOutput, mask: torch.Tensor) -> torch.Tensor:
        """VLT's loss: BCE with logits against ``mask (b S S)`` resized (nearest) to the logits."""
        return vlt_loss(out.logits.float(), mask)


def make_tokenizer(bert: Optional[str]) -> Tuple[Tokenizer, int]:
    """A ``(sentences, max_length) -> (input_ids, attention_mask)`` tokenizer and its vocabulary size.

    ``bert`` names a local BERT folder with its tokenizer; None uses vlaligner's embedded
    WordPiece vocabulary (no download).
    """
    from vlaligner.models.tokenizer import load_tiny_tokenizer, load_tokenizer, tokenize

    tokenizer = load_tiny_tokenizer() if bert is None else load_tokenizer(bert)
    return (lambda sentences, max_length: tokenize(tokenizer, sentences, max_length)), len(tokenizer)


def train_steps(
    model: nn.Module,
    batches: Iterable[Dict[str, Any]],
    *,
    steps: int,
    lr: float = 1e-3,
    device: str = "cpu",
    log: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> List[float]:
    """``steps`` plain Adam steps of VLT's loss, cycling over ``batches`` (no schedule, no checkpoints).

    A minimal loop for a quick check from Python; ``main`` is the full trainer.

    Args:
        model: VLT or its retrofit: ``forward(images, input_ids, attention_mask) -> (b 1 h w)``.
        batches: dicts with ``image (b 3 S S)``, ``input_ids (b l)``, ``attention_mask (b l)``,
            ``mask (b S S)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: List[float] = []
    for step, batch in enumerate(itertools.islice(_forever(batches), steps)):
        logits = model(batch["image"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device))
        loss = vlt_loss(logits, batch["mask"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log({"step": step, "loss": losses[-1]})
    return losses


def _forever(batches: Iterable[Dict[str, Any]]) -> Iterable[Dict[str, Any]]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches is empty: the data set has fewer samples than one batch")


# ============================================================================ arguments
class UsageError(ValueError):
    """A command-line mistake, reported before any model is built."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_vlt.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=("tiny", "swin-b"))
    g.add_argument("--bert", default=None, help="local BERT folder (swin-b): weights + tokenizer")
    g.add_argument("--pretrained", action="store_true", help="ImageNet Swin-B weights via timm's cache")
    g.add_argument("--head", default="aligner", choices=HEADS, help="the aligner, or VLT's own fixed final kernel")
    g.add_argument("--num-queries", type=int, default=24)
    g.add_argument("--kernel-size", type=int, default=3)
    g.add_argument("--no-estimator", action="store_true")
    g.add_argument("--no-global-vision", action="store_true")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", type=Path, default=None,
                   help="refer layout root; without it the synthetic set is generated once into --cache-dir")
    g.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="write a synthetic set of N images into --data-root first (a folder of your own)")
    g.add_argument("--cache-dir", type=Path, default=None, help="synthetic set cache (default: the package's)")
    g.add_argument("--synthetic-images", type=int, default=800, help="images of the cached synthetic set")
    g.add_argument("--dataset", default="refcoco", choices=DATASETS)
    g.add_argument("--split-by", default=None, help="unc (RefCOCO/+), umd or google (G-Ref); default per data set")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--img-size", type=int, default=64, help="input side, a multiple of 32 (VLT's grid is fixed by it)")
    g.add_argument("--max-length", type=int, default=17, help="tokens per sentence")
    g.add_argument("--train-samples", type=int, default=None, help="use the first N training samples only")
    g.add_argument("--val-samples", type=int, default=None, help="evaluate on the first N samples only")
    g.add_argument("--num-workers", type=int, default=0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None,
                   help="the run's length in steps (and the schedule's), instead of --epochs")
    g.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)  # old name of --max-steps
    g.add_argument("--batch-size", type=int, default=2, help="GLOBAL batch per step (split over processes)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (VLT: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision (GPU)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=Path, default=None, help="default runs/vlt-<model>-<head>-<dataset>")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cuda: cuda:LOCAL_RANK under torchrun)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at epoch ends only)")
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--best-metric", choices=("mIoU", "oIoU"), default="mIoU")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last")
    g.add_argument("--overwrite", action="store_true", help="start over in an output dir that holds a checkpoint")
    g.add_argument("--json", type=Path, default=None, help="also write the losses and final metrics here")
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    return p


def resolve_args(argv: Optional[Sequence[str]] = None, env: Optional[DistEnv] = None) -> argparse.Namespace:
    """Parse and check the command line (cheap: no model, no data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = " ".join(shlex.quote(a) for a in ["train_vlt.py", *argv])
    env = env or DistEnv.from_environ()
    if args.steps is not None:
        args.max_steps = args.max_steps or args.steps
    if args.split_by is None:
        args.split_by = DEFAULT_SPLIT_BY[args.dataset]
    if args.split_by not in SPLIT_BYS[args.dataset]:
        raise UsageError(f"--split-by {args.split_by!r} does not exist for {args.dataset}; "
                         f"expected one of {', '.join(SPLIT_BYS[args.dataset])}")
    for name in ("epochs", "batch_size", "num_queries", "max_length"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "train_samples", "val_samples", "eval_batch_size", "threads", "stop_after_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.img_size < 32 or args.img_size % 32:
        raise UsageError(f"--img-size must be a positive multiple of 32, got {args.img_size}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.batch_size % env.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {env.world_size} processes")
    args.batch_per_process = args.batch_size // env.world_size
    args.eval_batch_size = args.eval_batch_size or args.batch_per_process
    try:
        resolve_device(args)  # the training package's check: a device that exists, AMP on CUDA only
    except TrainingUsageError as err:
        raise UsageError(str(err)) from None
    if args.synthetic and args.data_root is None:
        raise UsageError("--synthetic N writes a synthetic set into --data-root: pass --data-root")
    if args.data_root is None and args.dataset != "refcoco":
        raise UsageError(f"the synthetic set has refcoco (unc) only, got --dataset {args.dataset}: pass --data-root")
    if args.data_root is not None and not args.synthetic:
        try:
            check_data_root(args.data_root, args.dataset, args.split_by)
        except FileNotFoundError as err:
            raise UsageError(f"--data-root: {err}") from None
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"vlt-{args.model}-{args.head}-{args.dataset}"
    last = args.output_dir / "last"
    if args.resume and resolve_checkpoint_dir(last) is None:
        raise UsageError(f"--resume: no checkpoint in {last}; run without --resume to start")
    if not args.resume and not args.overwrite and resolve_checkpoint_dir(last) is not None:
        raise UsageError(f"{args.output_dir} already holds a checkpoint ({last}); pass --resume to continue "
                         "it or --overwrite to start over")
    return args


# ============================================================================ the loop
def _jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


_read_jsonl = read_jsonl
_sha256 = sha256_file


class VLTTrainer:
    """One run: data, model, optimizer, schedule, evaluation and checkpoints (the training package's pieces)."""

    def __init__(self, args: argparse.Namespace, env: DistEnv) -> None:
        self.args, self.env = args, env
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", env.local_rank)
        self.out = Path(args.output_dir)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)
            with open(self.out / "train.log", "a") as f:
                f.write(message + "\n")

    def setup(self) -> None:
        args, env = self.args, self.env
        if args.threads:
            torch.set_num_threads(args.threads)
        if env.distributed:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not args.resume:
                import shutil

                for name in ("losses.jsonl", "metrics.jsonl", "train.log"):
                    (self.out / name).unlink(missing_ok=True)
                for name in ("last", "last.old", "best", "best.old"):
                    shutil.rmtree(self.out / name, ignore_errors=True)
        self._barrier()
        self.log(f"command: {args.command}")
        if args.data_root is None:
            cache = args.cache_dir or default_cache_dir()
            self.data_root = ensure_synthetic_set(cache, num_images=args.synthetic_images, seed=0, log=self.log)
        else:
            self.data_root = Path(args.data_root)
            if args.synthetic and env.is_main:
                from vlaligner.data import generate_synthetic_refcoco

                generate_synthetic_refcoco(self.data_root, num_images=args.synthetic, seed=args.seed)
            self._barrier()
        tokenizer, vocab_size = make_tokenizer(args.bert)
        self.config = VLTConfig(
            model=args.model, head=args.head, img_size=args.img_size, vocab_size=vocab_size,
            max_length=args.max_length, num_queries=args.num_queries, kernel_size=args.kernel_size,
            use_estimator=not args.no_estimator, use_global_vision=not args.no_global_vision,
        )
        seed_everything(args.seed)  # the same initial weights on every process
        self.task = VLTTask(self.config, bert=args.bert, pretrained=args.pretrained).to(self.device)

        from vlaligner.data import RefDataset

        common = dict(tokenizer=tokenizer, img_size=args.img_size, max_length=args.max_length)
        self.train_set = RefDataset(self.data_root, args.dataset, args.split_by, args.train_split, **common)
        self.val_set = RefDataset(self.data_root, args.dataset, args.split_by, args.val_split, **common)
        if args.train_samples:
            self.train_set = torch.utils.data.Subset(self.train_set, range(min(args.train_samples, len(self.train_set))))
        if args.val_samples:
            self.val_set = torch.utils.data.Subset(self.val_set, range(min(args.val_samples, len(self.val_set))))
        if len(self.train_set) < args.batch_size:
            raise UsageError(f"the {args.train_split} split has {len(self.train_set)} samples, fewer than one "
                             f"global batch (--batch-size {args.batch_size})")
        self.train_sampler = ShardedSampler(len(self.train_set), num_replicas=env.world_size, rank=env.rank,
                                            seed=args.seed, global_batch_size=args.batch_size)
        self.val_sampler = ShardedSampler(len(self.val_set), num_replicas=env.world_size, rank=env.rank, shuffle=False)
        self.steps_per_epoch = self.train_sampler.steps_per_epoch
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps:  # --max-steps, when given, is the run's length (--epochs is then ignored)
            self.total_steps = args.max_steps
        params = [p for p in self.task.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = build_poly_scheduler(self.optimizer, total_steps=self.total_steps, power=args.poly_power)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.step = self.epoch = self.step_in_epoch = 0
        self.best_score, self.best_step, self.last_eval_step = -math.inf, None, None
        if args.resume:
            self._resume()
        else:
            seed_everything(args.seed + env.rank)
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.device.type == "cuda":  # VLT is full of BatchNorm: statistics over the global batch
                self.task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.task)
            self.forward = DDP(self.task, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.forward = self.task
        n = sum(p.numel() for p in self.task.parameters())
        self.log(f"VLT {args.model} + head {args.head}: {n / 1e6:.2f} M parameters, input {args.img_size}; "
                 f"{args.dataset} ({args.split_by}): {len(self.train_set)} train / {len(self.val_set)} "
                 f"{args.val_split} samples; {self.total_steps} steps of global batch {args.batch_size} "
                 f"({env.world_size} process(es)), Adam lr {args.lr}, poly {args.poly_power}; device {self.device}"
                 + (f", amp {args.amp}" if self.amp_dtype else ""))

    def _barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _resume(self) -> None:
        state = load_checkpoint(self.out / "last")
        saved = json.loads((Path(state["path"]) / CONFIG_NAME).read_text())["config"]
        if saved != asdict(self.config):
            differ = {k: (saved.get(k), v) for k, v in asdict(self.config).items() if saved.get(k) != v}
            raise UsageError(f"--resume: the checkpoint's model differs from this command's "
                             f"(checkpoint, command): {differ}")
        load_model_weights(self.task.model, state["path"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.scheduler.lr_lambdas[0].total_steps = self.total_steps
        self.step, self.epoch, self.step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        best = state.get("best_score")
        self.best_score = -math.inf if best is None else float(best)
        self.best_step, self.last_eval_step = state.get("best_step"), state.get("last_eval_step")
        rng = state.get("rng") or []
        if len(rng) == self.env.world_size:
            restore_rng_state(rng[self.env.rank])
        else:
            seed_everything(self.args.seed + self.env.rank + self.step)
        if self.env.is_main:
            for name in ("losses.jsonl", "metrics.jsonl"):
                rows = [r for r in _read_jsonl(self.out / name) if int(r.get("step", 0)) <= self.step]
                (self.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.log(f"resumed from {state['path']} at step {self.step}")

    def save(self, name: str) -> None:
        rng = [capture_rng_state()]
        if self.env.distributed:
            import torch.distributed as dist

            rng = [None] * self.env.world_size
            dist.all_gather_object(rng, capture_rng_state())
        if not self.env.is_main:
            return
        extra = dict(step=self.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                     best_score=self.best_score if math.isfinite(self.best_score) else None,
                     best_metric=self.args.best_metric, best_step=self.best_step,
                     last_eval_step=self.last_eval_step, total_steps=self.total_steps)
        config = asdict(self.config)

        def write_config(folder: Path) -> None:
            document = {"format": "vlaligner-vlt", "config": config,
                        "model.safetensors sha256": _sha256(folder / "model.safetensors")}
            (folder / CONFIG_NAME).write_text(json.dumps(document, indent=1))

        save_checkpoint(self.out / name, model=self.task.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, scaler=self.scaler, rng_states=rng,
                               args=vars(self.args), extra=extra, before_commit=write_config)

    def run_eval(self) -> dict:
        from vlaligner.data import collate_ref_batch

        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.args.eval_batch_size, sampler=self.val_sampler,
                                             collate_fn=collate_ref_batch, num_workers=self.args.num_workers)
        metrics = evaluate_masks(self.task, loader, device=self.device, amp_dtype=self.amp_dtype, progress=False)
        self.last_eval_step = self.step
        score = metrics[self.args.best_metric]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_step = score, self.step
        if self.env.is_main:
            _jsonl(self.out / "metrics.jsonl", dict(step=self.step, split=self.args.val_split, metrics=metrics))
            self.log(f"eval {self.args.val_split} at step {self.step}: oIoU {metrics['oIoU']:.2f} mIoU "
                     f"{metrics['mIoU']:.2f} Pr@0.5 {metrics['Pr@0.5']:.2f}{' new best' if improved else ''}")
        if improved:
            self.save("best")
        return metrics

    def train(self) -> None:
        from vlaligner.data import collate_ref_batch

        args = self.args
        while self.step < self.total_steps:
            self.train_sampler.set_epoch(self.epoch, skip=self.step_in_epoch * self.args.batch_per_process)
            loader = torch.utils.data.DataLoader(
                self.train_set, batch_size=args.batch_per_process, sampler=self.train_sampler,
                collate_fn=collate_ref_batch, num_workers=args.num_workers, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(epoch_seed(args.seed, self.epoch) + self.step_in_epoch),
            )
            self.forward.train()
            for batch in loader:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out = self.forward(batch["image"].to(self.device), batch["input_ids"].to(self.device),
                                       batch["attention_mask"].to(self.device))
                loss = self.task.loss(out, batch["mask"].to(self.device))
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.step += 1
                self.step_in_epoch += 1
                value = loss.detach()
                if self.env.distributed:
                    import torch.distributed as dist

                    dist.all_reduce(value)
                    value = value / self.env.world_size
                value = float(value)
                if not math.isfinite(value):
                    raise FloatingPointError(f"the loss became {value} at step {self.step}: lower --lr")
                if self.env.is_main:
                    _jsonl(self.out / "losses.jsonl", dict(step=self.step, loss=value, lr=lr,
                                                           seconds=round(time.perf_counter() - t0, 4)))
                epoch_done = self.step_in_epoch == self.steps_per_epoch
                if epoch_done:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                finished = self.step >= self.total_steps
                if finished or epoch_done or (args.eval_every and self.step % args.eval_every == 0):
                    self.run_eval()
                if finished or epoch_done:
                    self.save("last")
                if finished or epoch_done:
                    break
                if args.stop_after_steps and self.step >= args.stop_after_steps:
                    self.save("last")
                    self.log(f"stopping after step {self.step} (--stop-after-steps), as if interrupted")
                    return

    def summary(self) -> dict:
        rows = _read_jsonl(self.out / "metrics.jsonl")
        best = next((r for r in rows if r["step"] == self.best_step), None)
        return dict(losses=[r["loss"] for r in _read_jsonl(self.out / "losses.jsonl")], head=self.args.head,
                    last=rows[-1] if rows else None, best=best, step=self.step)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the trainer; returns ``{"losses", "head", "last", "best", "step"}`` (on every process)."""
    env = DistEnv.from_environ()
    try:
        args = resolve_args(argv, env)
    except UsageError as err:
        raise SystemExit(f"train_vlt.py: error: {err}") from None
    trainer = VLTTrainer(args, env)
    try:
        trainer.setup()
    except UsageError as err:
        raise SystemExit(f"train_vlt.py: error: {err}") from None
    trainer.train()
    result = trainer.summary()
    if env.is_main and args.json is not None:
        args.json.write_text(json.dumps(result))
    if env.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
