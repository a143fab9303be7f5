"""The training loop: one class that trains any model with EAVL's call signature.

Axis legend: b batch (per process and step), l words, S input size, h w logit grid (S / 4).

``Trainer(args, env, model_factory=...)`` owns a run: model, optimizer and schedule (from
the recipe), loaders, evaluation, checkpoints (``last/`` on every epoch and every
``--save-every-minutes``, ``best/`` on improvement) and the output folder's files. The model
is ``model_factory(args)``: by default the EAVL builder named by ``--model``; any module
``model(images (b 3 S S), input_ids (b l), attention_mask (b l))`` returning an object with
``.logits (b 1 h w)`` and having ``.tokenize(sentences)`` trains the same way (the VLT host of
``adapters/vlt`` and the benchmarks do).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..data.cache import ensure_synthetic_set
from ..fileio import append_jsonl, atomic_write_text, read_jsonl, rewrite_jsonl
from ..gres_eval import BALANCED_KEYS, gres_evaluate
from ..gres_losses import mask_targets_for_no_target, no_target_loss
from ..losses import mask_bce_loss, soft_dice_loss
from ..viz import plot_training_curves, save_prediction_grid
from .checkpoint import jsonable, load_checkpoint, load_model_weights, save_checkpoint
from .distributed import DistEnv, all_gather_objects, barrier, init_distributed, mean_over_processes, unwrap_model
from .evaluation import GRES_KEYS, evaluate, format_metrics_table, predict_masks
from .options import GENERALIZED, UsageError
from .outputs import RunManifest, check_output_dir, setup_logging
from .recipes import RECIPE_FIELDS, resolve_recipe
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .sampler import ShardedSampler, epoch_seed
from .schedule import build_poly_scheduler

__all__ = [
    "Trainer", "build_model", "make_datasets", "make_loader", "param_digest", "selection_key", "Interrupted",
    "NonFiniteLossError",
]

LOG = logging.getLogger("vlaligner.train")
#: Parameter names of the no-target head (generalized sets): a classic checkpoint passed to
#: ``--init-from`` lacks them, and they start fresh.
NO_TARGET_HEAD_PREFIX = "no_target_head."
NUM_PREVIEW = 8  # validation samples drawn in predictions.png


def build_model(args: argparse.Namespace) -> nn.Module:
    """The EAVL model named by ``--model`` with every ablation switch of the command line.

    The recipe's foreground prior (``mask_bias_init``) is passed to the builder unless
    ``--model-kwargs`` sets it.
    """
    from ..models import build_eavl_swin_b, build_eavl_tiny

    kwargs: Dict[str, Any] = dict(args.model_kwargs or {})
    if getattr(args, "mask_bias_init", None) is not None and "mask_bias_init" not in kwargs:
        kwargs["mask_bias_init"] = args.mask_bias_init
    if getattr(args, "dataset", None) in GENERALIZED:
        kwargs.setdefault("no_target", True)
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
    builder = build_eavl_swin_b if args.model == "swin-b" else build_eavl_tiny
    try:
        return builder(pretrained=args.pretrained, **kwargs)
    except ValueError as err:  # the builders' own checks of their arguments, as one line
        raise UsageError(f"--model {args.model}: cannot build the model with these arguments: {err}") from None


def selection_key(metrics: dict, best_metric: str) -> str:
    """The key of one evaluation's ``metrics`` whose value picks ``best/``.

    ``best_metric``, except on a generalized set whose evaluation chose a no-target threshold:
    there gIoU is taken at that threshold (``"gIoU@balanced"``), the one the checkpoint records
    and inference uses, not at 0.5.
    """
    if best_metric == "gIoU" and math.isfinite(metrics.get("gIoU@balanced", math.nan)):
        return "gIoU@balanced"
    if best_metric not in metrics:
        raise KeyError(f"best metric {best_metric!r} is not among the evaluation's metrics {sorted(metrics)}")
    return best_metric


def _cache_note(args: argparse.Namespace) -> str:
    """What the start-up log says about the sample cache (also when the demo's gave way)."""
    if getattr(args, "cache_samples", False):
        return " (kept in memory after their first use)"
    if getattr(args, "demo", False) and args.num_workers > 0:
        return f" (not kept in memory as the demo's are: --num-workers {args.num_workers} loads them in other processes)"
    return ""


def make_datasets(args: argparse.Namespace, model, data_root: Path):
    """Training and validation RefDatasets tokenized by ``model.tokenize`` (optionally cut short)."""
    from ..data import RefDataset, SampleCacheTooLarge

    common = dict(tokenizer=model.tokenize, img_size=args.img_size, max_length=getattr(args, "max_length", None),
                  cache=bool(getattr(args, "cache_samples", False)))
    try:
        train = RefDataset(data_root, args.dataset, args.split_by, args.train_split, augment=args.augment, **common)
        val = RefDataset(data_root, args.dataset, args.split_by, args.val_split, **common)
    except SampleCacheTooLarge as err:
        raise UsageError(f"--cache-samples: {err} (--no-cache-samples)") from None
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


def _base_dataset(dataset):
    """The RefDataset inside (nested) ``Subset`` wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def make_loader(dataset, sampler, batch_size: int, args: argparse.Namespace, device: torch.device, seed: int):
    """A DataLoader over ``sampler`` whose own generator is seeded (a resumed run draws the same)."""
    from ..data import collate_ref_batch

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


def param_digest(model) -> str:
    """SHA-256 over every parameter's bytes, in name order (identical weights <=> same digest)."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap_model(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # TensorBoard is optional: skip silently
        return None
    return SummaryWriter(str(output_dir / "tb"))


#: Options whose change on --resume is worth a warning: the run's identity and its recipe.
RESUME_CHECKED = ("batch_size", "model", "dataset", "seed", "img_size", "recipe") + RECIPE_FIELDS
#: Recipe fields added after runs were saved without them: the value those runs trained with.
_FIELD_DEFAULTS_OF_OLDER_RUNS = {"upsample_logits": False}


def changed_run_args(saved_args: Dict[str, Any], args: argparse.Namespace) -> list:
    """``[(key, now, saved)]`` for the :data:`RESUME_CHECKED` options that differ from a checkpoint's.

    A recipe field the checkpoint predates counts as its older value (a run saved before
    ``upsample_logits`` existed trained with it off, and ``scratch-small`` now turns it on).
    """
    out = []
    for key in RESUME_CHECKED:
        if not hasattr(args, key):
            continue
        if key in saved_args:
            saved = saved_args[key]
        elif key in _FIELD_DEFAULTS_OF_OLDER_RUNS:
            saved = _FIELD_DEFAULTS_OF_OLDER_RUNS[key]
        else:
            continue
        now = jsonable(getattr(args, key))
        if saved != now:
            out.append((key, now, saved))
    return out


class Trainer:
    """One training run: owns the model, optimizer, schedule, loaders and output files."""

    def __init__(
        self,
        args: argparse.Namespace,
        env: DistEnv,
        *,
        model_factory: Optional[Callable[[argparse.Namespace], nn.Module]] = None,
    ) -> None:
        self.args = args
        self.env = env
        self.model_factory = model_factory
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", env.local_rank)
        self.out = Path(args.output_dir)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        #: gRefCOCO-style data: the no-target head, its loss, and the GRES metrics.
        self.generalized = getattr(args, "dataset", None) in GENERALIZED

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        args, env = self.args, self.env
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        init_distributed(env, self.device)
        self.manifest: Optional[RunManifest] = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            check_output_dir(self.out, resume=args.resume, overwrite=args.overwrite or args.demo)
            self.manifest = RunManifest(self.out)
            if not args.resume:
                # A fresh start: nothing of an earlier run may survive (a stale best/ could
                # outlive this run's first evaluation); only that run's own files go.
                self.manifest.remove_own_files()
            self.manifest.add("train.log")
        barrier(env)
        setup_logging(LOG, self.out / "train.log", is_main=env.is_main, rank=env.rank, append=args.resume)
        LOG.info("command: %s", args.command)
        if args.demo:
            LOG.info("embedded demo: synthetic set, tiny model, %s (see docs/training.md)", args.device)
        LOG.info("%s", resolve_recipe(args.model, args.recipe.split("+")[0], {
            k: getattr(args, k) for k in RECIPE_FIELDS
        }).describe())

        if args.data_root is None:
            self.data_root = ensure_synthetic_set(
                args.cache_dir, num_images=args.synthetic_images, seed=0, log=LOG.info,
                generalized=self.generalized,
            )
            LOG.info("data: %ssynthetic set in %s", "generalized " if self.generalized else "", self.data_root)
        else:
            self.data_root = Path(args.data_root)

        seed_everything(args.seed)  # same initial weights on every process
        model = (self.model_factory or build_model)(args)
        if args.img_size is None:
            args.img_size = model.img_size
        if args.init_from is not None:
            # A classic checkpoint may start a generalized run: its no-target head starts fresh.
            fresh = load_model_weights(
                model, args.init_from, fresh_prefixes=(NO_TARGET_HEAD_PREFIX,) if self.generalized else ()
            )
            LOG.info("initialised from %s", args.init_from)
            if fresh:
                LOG.info("%s has no no-target head (a classic checkpoint): %d tensors of it start fresh",
                         args.init_from, len(fresh))
        elif args.model == "swin-b" and not args.pretrained and not args.resume:
            LOG.warning(
                "Swin-B and BERT-base start from random weights; the paper starts from ImageNet Swin-B "
                "and pretrained BERT-base: pass --pretrained (weights from the local timm / Hugging Face caches)"
            )
        self.model = model.to(self.device)
        if getattr(args, "channels_last", None) is None:
            args.channels_last = self.device.type == "cpu"
        if args.channels_last:
            # Same numbers, another layout: oneDNN's convolutions run faster on NHWC (docs/training.md).
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_model: nn.Module = torch.compile(self.model) if args.compile else self.model
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
        opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = build_poly_scheduler(
            self.optimizer, total_steps=self.total_steps, power=args.poly_power, warmup_steps=args.warmup_steps
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")

        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_score = -math.inf
        self.best_step: Optional[int] = None
        self.last_eval_step: Optional[int] = None
        self.last_save_time = time.monotonic()
        if args.resume:
            self._resume()
        # Dropout differs per process (as independent GPUs would), deterministically.
        if not args.resume:
            seed_everything(args.seed + env.rank)

        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = DDP(
                self.forward_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=args.find_unused_parameters,
            )
        else:
            self.ddp = self.forward_model
        self.writer = _tensorboard(self.out) if env.is_main else None
        if self.writer is not None and self.manifest is not None:
            self.manifest.add("tb")
        if env.is_main and self.manifest is not None:
            self.manifest.add("run_config.json")
            atomic_write_text(self.out / "run_config.json", json.dumps(jsonable(vars(args)), indent=1) + "\n")

        n_params = sum(p.numel() for p in model.parameters())
        LOG.info(
            "model %s (%.2f M parameters, input %d), %s: %d train / %d %s samples%s",
            args.model, n_params / 1e6, args.img_size, args.dataset, len(self.train_set), len(self.val_set), args.val_split,
            _cache_note(args),
        )
        LOG.info(
            "global batch %d = %d process(es) x %d accumulation x %d per step; %d steps/epoch, %d steps in all; "
            "device %s%s",
            args.batch_size, env.world_size, args.grad_accum, args.batch_per_step, self.steps_per_epoch,
            self.total_steps, self.device, f", amp {args.amp}" if self.amp_dtype else "",
        )

    def _resume(self) -> None:
        args, env = self.args, self.env
        state = load_checkpoint(self.out / "last")
        try:
            load_model_weights(self.model, state["path"])
        except ValueError as err:  # weights of another model: a usage mistake, not a crash
            raise UsageError(f"--resume: {err}") from None
        self._restore_no_target_threshold(Path(state["path"]))
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
            restore_rng_state(rng[env.rank])
        else:
            LOG.warning(
                "the checkpoint holds RNG states of %d process(es), this run has %d: reseeding from --seed",
                len(rng), env.world_size,
            )
            seed_everything(args.seed + env.rank + self.step)
        for key, now, saved in changed_run_args(state.get("args", {}), args):
            LOG.warning("--%s differs from the checkpoint's (%r vs %r)", key.replace("_", "-"), now, saved)
        if env.is_main:
            for name in ("losses.jsonl", "metrics.jsonl"):
                path = self.out / name
                if path.is_file():  # drop the lines after the checkpoint: they will be redone
                    rewrite_jsonl(path, [r for r in read_jsonl(path) if int(r.get("step", 0)) <= self.step])
        LOG.info("resumed from %s at step %d (epoch %d, step %d of it)", state["path"], self.step, self.epoch + 1, self.step_in_epoch)

    def _save_is_due(self) -> bool:
        """True when --save-every-minutes passed since the last save (decided on rank 0, shared)."""
        minutes = self.args.save_every_minutes
        due = bool(minutes) and time.monotonic() - self.last_save_time >= 60.0 * minutes
        if self.env.distributed:
            flag = torch.tensor([float(due)], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def _epoch_of_step(self) -> int:
        """The 1-based epoch that step ``self.step`` belongs to (the same in resumed runs)."""
        return (max(self.step, 1) - 1) // self.steps_per_epoch + 1

    def _barrier(self) -> None:
        barrier(self.env)

    # ------------------------------------------------------------------ checkpoints
    def save(self, name: str) -> None:
        """Write OUTPUT_DIR/<name> (collective: every process contributes its RNG state)."""
        rng = all_gather_objects(self.env, capture_rng_state())
        self.last_save_time = time.monotonic()
        if not self.env.is_main:
            return
        if self.manifest is not None:
            self.manifest.add(name)
        extra = dict(
            step=self.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            best_score=self.best_score if math.isfinite(self.best_score) else None,
            best_metric=self.args.best_metric, best_step=self.best_step, last_eval_step=self.last_eval_step,
            world_size=self.env.world_size, total_steps=self.total_steps,
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        t0 = time.perf_counter()
        save_checkpoint(
            self.out / name, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, rng_states=rng, args=vars(self.args), extra=extra,
        )
        LOG.info("saved %s at step %d (%.1f s)", self.out / name, self.step, time.perf_counter() - t0)

    # ------------------------------------------------------------------ evaluation
    def run_eval(self) -> dict:
        loader = make_loader(self.val_set, self.val_sampler, self.args.eval_batch_size, self.args, self.device, seed=0)
        t0 = time.perf_counter()
        if self.generalized:
            was_training = self.model.training
            choose = bool(getattr(self.args, "choose_no_target_threshold", True))
            with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
                metrics = gres_evaluate(self.model, loader, device=self.device, choose_no_target_threshold=choose)
            self.model.train(was_training)
            if choose:
                self._record_no_target_threshold(metrics)
        else:
            metrics = evaluate(
                self.model, loader, device=self.device, amp_dtype=self.amp_dtype,
                progress=not self.args.no_progress, description=f"eval {self.args.val_split}",
                query_diversity=True,
            )
        self.last_eval_step = self.step
        picked_by = selection_key(metrics, self.args.best_metric)
        score = metrics[picked_by]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_step = score, self.step
        if self.env.is_main:
            row = dict(step=self.step, epoch=self._epoch_of_step(), split=self.args.val_split, metrics=metrics,
                       time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            self.manifest.add("metrics.jsonl")
            append_jsonl(self.out / "metrics.jsonl", row)
            keys = GRES_KEYS if self.generalized else ("oIoU", "mIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9")
            LOG.info(
                "eval %s at step %d: %s (%d samples, %.1f s)%s", self.args.val_split, self.step,
                " ".join(f"{k} {metrics[k]:.2f}" for k in keys), metrics.get("num_samples", 0),
                time.perf_counter() - t0, f" new best ({picked_by} {score:.2f})" if improved else "",
            )
            if "query_mask_iou" in metrics:
                LOG.info(
                    "query diversity: mask IoU between queries %.3f, score spread %.3f, score entropy %.3f, "
                    "word-attention entropy %.3f, attention distance %.3f",
                    metrics["query_mask_iou"], metrics["score_spread"], metrics["score_entropy"],
                    metrics["attention_entropy"], metrics["attention_distance"],
                )
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(f"{self.args.val_split}/{key}", value, self.step)
        if improved:
            self.save("best")
        return metrics

    def _restore_no_target_threshold(self, directory: Path) -> None:
        """On resume: the threshold last/ recorded (until the next evaluation chooses again)."""
        bare = unwrap_model(self.model)
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if hasattr(bare, "no_target_threshold") and "no_target_threshold" in config:
            bare.no_target_threshold = config["no_target_threshold"]
            bare.no_target_threshold_source = str(config.get("no_target_threshold_source", "recorded"))

    def _record_no_target_threshold(self, metrics: dict) -> None:
        """Give the model the threshold this evaluation chose on val (saved with every checkpoint after it)."""
        bare = unwrap_model(self.model)
        chosen = metrics.get("balanced_threshold", math.nan)
        if not math.isfinite(chosen) or not hasattr(bare, "no_target_threshold"):
            if self.env.is_main:
                LOG.warning("no no-target threshold chosen at step %d: %s needs both no-target and targeted "
                            "samples; the checkpoints keep %.2f", self.step, self.args.val_split,
                            getattr(bare, "no_target_threshold", 0.5))
            return
        bare.no_target_threshold = chosen
        bare.no_target_threshold_source = (
            f"max (N-acc + T-acc) / 2 on {self.args.val_split} at step {self.step}"
        )
        if self.env.is_main:
            LOG.info("no-target threshold chosen on %s: %.2f (gIoU %.2f, N-acc %.2f, T-acc %.2f at it; the eval "
                     "line gives them at 0.5); recorded in the checkpoints", self.args.val_split, chosen, metrics["gIoU@balanced"],
                     metrics["N-acc@balanced"], metrics["T-acc@balanced"])

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """``(b 3 S S)`` images on the run's device, channels-last when the model is."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.args.channels_last else images

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        args, env = self.args, self.env
        per_rank_step = args.batch_per_step * args.grad_accum
        t_start = time.perf_counter()
        start_step = self.step
        while self.step < self.total_steps and self.epoch < args.epochs:
            self.train_sampler.set_epoch(self.epoch, skip=self.step_in_epoch * per_rank_step)
            # Flips drawn as a function of (seed, epoch, sample): exact on resume, whatever the workers.
            _base_dataset(self.train_set).set_augment_seed(epoch_seed(args.seed, self.epoch))
            loader = make_loader(
                self.train_set, self.train_sampler, args.batch_per_step, args, self.device,
                seed=epoch_seed(args.seed, self.epoch) + self.step_in_epoch,
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
                                self._images(batch["image"]),
                                batch["input_ids"].to(self.device, non_blocking=True),
                                batch["attention_mask"].to(self.device, non_blocking=True),
                            )
                        target = batch["mask"].to(self.device, non_blocking=True)
                        if self.generalized:
                            no_target = batch["no_target"].to(self.device)
                            target = mask_targets_for_no_target(target, no_target)
                        upsample = bool(getattr(args, "upsample_logits", False))
                        loss = mask_bce_loss(out.logits.float(), target, upsample_logits=upsample)
                        if args.dice_weight:
                            loss = loss + args.dice_weight * soft_dice_loss(
                                out.logits.float(), target, upsample_logits=upsample
                            )
                        if self.generalized and args.no_target_weight:
                            loss = loss + args.no_target_weight * no_target_loss(
                                out.no_target_logits.float(), no_target, pos_weight=args.no_target_pos_weight
                            )
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

                loss_value = float(mean_over_processes(env, loss_sum / args.grad_accum))
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"the training loss became {loss_value} at step {self.step} (lr {lr:.3g}); likely causes: a "
                        "learning rate too high for this model (lower --lr or add --warmup-steps / --clip-grad), "
                        "fp16 overflow (use --amp bf16), or a NaN in the data; last/ keeps the state of the last save"
                    )
                rate = args.batch_size / max(time.perf_counter() - t0, 1e-9)
                ema_rate = rate if ema_rate is None else 0.9 * ema_rate + 0.1 * rate
                if env.is_main:
                    self.manifest.add("losses.jsonl")
                    append_jsonl(self.out / "losses.jsonl", dict(step=self.step, epoch=self._epoch_of_step(), loss=loss_value, lr=lr))
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
                    if (args.save_every and self.step % args.save_every == 0) or self._save_is_due():
                        self.save("last")
                if args.stop_after_steps is not None and self.step >= args.stop_after_steps and not (epoch_done or finished):
                    LOG.warning("stopping after step %d (--stop-after-steps), as if interrupted", self.step)
                    raise Interrupted()
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
                raise Interrupted()

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Close the log file and TensorBoard writer (also after an error)."""
        from .outputs import close_logging

        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
            self.writer = None
        close_logging(LOG)

    def finish(self) -> dict:
        args, env = self.args, self.env
        if args.debug_param_digest:
            digest = param_digest(self.model)
            self.manifest.add(f"param_digest.rank{env.rank}.txt") if self.manifest is not None else None
            (self.out / f"param_digest.rank{env.rank}.txt").write_text(digest + "\n")
        summary: dict = {}
        if env.is_main:
            self.manifest.add("curves.png", "predictions.png")
            plot_training_curves(self.out / "losses.jsonl", self.out / "metrics.jsonl", self.out / "curves.png",
                                 metric=args.best_metric)
            rows = [r for r in read_jsonl(self.out / "metrics.jsonl") if r.get("split") == args.val_split]
            best = next((r for r in rows if r["step"] == self.best_step), None)
            results = {}
            if rows:
                results[f"{args.val_split} (last, step {rows[-1]['step']})"] = rows[-1]["metrics"]
            if best is not None:
                results[f"{args.val_split} (best, step {best['step']})"] = best["metrics"]
                atomic_write_text(self.out / "best" / "metrics.json", json.dumps({args.val_split: best["metrics"]}, indent=1))
            LOG.info("results:\n%s", format_metrics_table(results, keys=GRES_KEYS if self.generalized else None))
            if self.generalized and any("balanced_threshold" in m for m in results.values()):
                LOG.info("the no-target threshold chosen on %s at each of these evaluations (each checkpoint records "
                         "its own) and the metrics at it:\n%s", args.val_split,
                         format_metrics_table(results, keys=BALANCED_KEYS))
            self.write_predictions()
            LOG.info("curves: %s, predictions: %s", self.out / "curves.png", self.out / "predictions.png")
            summary = {"best": best, "last": rows[-1] if rows else None}
        self._barrier()
        return summary

    def write_predictions(self) -> None:
        """predictions.png: a few validation samples predicted by the best checkpoint."""
        from ..data import collate_ref_batch, load_image

        model = self.model
        best = self.out / "best"
        if (best / "model.safetensors").is_file():
            load_model_weights(model, best)
        n = min(NUM_PREVIEW, len(self.val_set))
        indices = sorted({int(i) for i in np.linspace(0, len(self.val_set) - 1, n)})
        batch = collate_ref_batch([self.val_set[i] for i in indices])
        preds = predict_masks(model, batch, device=self.device, amp_dtype=self.amp_dtype)
        images = [np.asarray(load_image(_image_path(self.val_set, i))) for i in indices]
        targets = [m.numpy() for m in batch["orig_mask"]]
        ious = []
        for p, t in zip(preds, targets):
            union = np.logical_or(p.numpy(), t).sum()
            ious.append(float(np.logical_and(p.numpy(), t).sum() / union) if union else 1.0)
        save_prediction_grid(self.out / "predictions.png", images, [p.numpy() for p in preds], targets,
                                    batch["sentence"], ious=ious)


class Interrupted(Exception):
    """Raised by --stop-after-steps to end the run the way a kill would (no final steps)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf (the message gives the step and likely causes)."""


