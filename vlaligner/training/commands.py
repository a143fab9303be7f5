"""The two commands of the training package: ``train`` and ``evaluate``, each a ``main(argv)``.

``examples/train_eavl.py`` and ``examples/evaluate.py`` call these, and so do
``vlaligner train`` and ``vlaligner evaluate`` (which therefore work from a plain
``pip install "vlaligner[all]"``, with no checkout). Exit status: 0 done, 2 a usage mistake
(one line on stderr), 3 stopped by ``--stop-after-steps`` as if killed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from ..fileio import atomic_write_text
from ..gres_eval import BALANCED_KEYS, gres_evaluate
from .distributed import DistEnv, init_distributed
from .evaluation import GRES_KEYS, evaluate, format_metrics_table
from .options import GENERALIZED, OneLineParser, UsageError, build_eval_parser, resolve_eval_args, resolve_train_args
from .sampler import ShardedSampler
from .trainer import LOG, Interrupted, Trainer

__all__ = ["train_main", "evaluate_main", "run_evaluation"]


def train_main(
    argv: Optional[Sequence[str]] = None,
    *,
    prog: str = "train_eavl.py",
    resolve: Optional[Callable[..., argparse.Namespace]] = None,
    model_factory: Optional[Callable[[argparse.Namespace], torch.nn.Module]] = None,
) -> int:
    """Train EAVL (or, with ``resolve`` and ``model_factory``, another model) as the command line says.

    Args:
        resolve: ``resolve(argv, env, prog=prog) -> args``; default :func:`resolve_train_args`.
        model_factory: builds the model from the arguments (default: the EAVL builder of
            ``--model``); see :class:`~vlaligner.training.trainer.Trainer`.
    """
    t0 = time.perf_counter()
    env = DistEnv.from_environ()
    try:
        args = (resolve or resolve_train_args)(argv, env, prog=prog)
    except UsageError as err:
        OneLineParser(prog=prog).error(str(err))  # exits with status 2 and one line
    trainer = Trainer(args, env, model_factory=model_factory)
    try:
        trainer.setup()
        trainer.train()
        trainer.finish()
        if env.is_main:
            LOG.info("done in %.1f min (wall, from start-up); checkpoints in %s (evaluate with "
                     "vlaligner evaluate --checkpoint %s)",
                     (time.perf_counter() - t0) / 60, args.output_dir, args.output_dir / "best")
    except UsageError as err:
        if env.is_main:
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted:
        return 3
    finally:
        trainer.close()
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def run_evaluation(args: argparse.Namespace, env: DistEnv) -> Dict[str, dict]:
    """Evaluate every split of ``args`` (from :func:`resolve_eval_args`); ``{split: metrics}`` in percent."""
    from ..data import RefDataset, collate_ref_batch
    from ..data.cache import ensure_synthetic_set
    from ..models import EAVL

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    init_distributed(env, device)
    if args.data_root is None:
        root = ensure_synthetic_set(args.cache_dir, num_images=args.synthetic_images,
                                    generalized=args.dataset in GENERALIZED,
                                    log=lambda m: print(m, file=sys.stderr) if env.is_main else None)
    else:
        root = args.data_root
    model = EAVL.from_pretrained(args.checkpoint, map_location=device).eval()
    img_size = args.img_size or model.img_size
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    results: Dict[str, dict] = {}
    for split in args.split:
        dataset = RefDataset(root, args.dataset, args.split_by, split, tokenizer=model.tokenize, img_size=img_size)
        sampler = ShardedSampler(len(dataset), num_replicas=env.world_size, rank=env.rank, shuffle=False)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
            collate_fn=collate_ref_batch, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )
        t0 = time.perf_counter()
        if args.dataset in GENERALIZED:
            if model.no_target_head is None:
                raise UsageError(
                    f"--dataset {args.dataset} is evaluated with the GRES metrics, which need a model with a "
                    f"no-target head; {args.checkpoint} has none (train it with --dataset {args.dataset})"
                )
            given = args.no_target_threshold is not None
            no_target_threshold = args.no_target_threshold if given else model.no_target_threshold
            if env.is_main and split == args.split[0]:
                if given:
                    origin = "--no-target-threshold"
                elif model.no_target_threshold_source == "default":
                    origin = "the default: no threshold was chosen for this checkpoint"
                else:
                    origin = f"the checkpoint's: {model.no_target_threshold_source}"
                print(f"no-target threshold {no_target_threshold:g} ({origin})", file=sys.stderr)
            metrics = gres_evaluate(model, loader, device=device, threshold=args.threshold,
                                    no_target_threshold=no_target_threshold,
                                    at_original_size=not args.resized, choose_no_target_threshold=True)
            metrics["no_target_threshold"] = float(no_target_threshold)
        else:
            metrics = evaluate(model, loader, device=device, at_original_size=not args.resized,
                               threshold=args.threshold, amp_dtype=amp_dtype,
                               progress=not args.no_progress, description=f"eval {split}",
                               query_diversity=True)
        if env.is_main:
            print(f"{split}: {metrics['num_samples']} samples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results[split] = {k: v for k, v in metrics.items() if k != "num_samples"}
    return results


def evaluate_main(argv: Optional[Sequence[str]] = None, *, prog: str = "evaluate.py") -> int:
    """Evaluate a checkpoint as the command line says; prints a table, writes ``metrics.json``."""
    env = DistEnv.from_environ()
    parser = build_eval_parser(prog)
    try:
        args = resolve_eval_args(argv, prog=prog)
    except UsageError as err:
        parser.error(str(err))
    try:
        try:
            # refuse a foreign --output before evaluating, on every process (else the others
            # would wait in the evaluation's all-reduce for one that has returned)
            merge_metrics_file(args.output, {})
            results = run_evaluation(args, env)
        except UsageError as err:
            if env.is_main:
                print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        if env.is_main:
            convention = "input size (LAVT)" if args.resized else "original size"
            print(f"{args.checkpoint} on {args.dataset} ({args.split_by}), compared at the {convention}, percent:")
            if args.dataset in GENERALIZED:
                print(format_metrics_table(results, keys=GRES_KEYS))
                threshold = next(iter(results.values()))["no_target_threshold"]
                print(f"(at the no-target threshold {threshold:g}.) Each split's own balanced threshold, the one "
                      "that maximises (N-acc + T-acc) / 2 there (choose it on val, then pass it with "
                      "--no-target-threshold for the other splits):")
                print(format_metrics_table(results, keys=BALANCED_KEYS))
            else:
                print(format_metrics_table(results))
            diversity = {s: m for s, m in results.items() if "query_mask_iou" in m}
            if diversity:
                print(format_diversity_table(diversity))
            try:
                merged = merge_metrics_file(args.output, results)
            except UsageError as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
                return 2
            args.output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.output, json.dumps(merged, indent=1) + "\n")
            kept = sorted(set(merged) - set(results))
            print(f"wrote {args.output}" + (f" (kept its earlier splits: {', '.join(kept)})" if kept else ""))
    finally:
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def merge_metrics_file(path: Path, results: Dict[str, dict]) -> Dict[str, dict]:
    """``results`` merged into the metrics file at ``path`` (``{split: {metric: value}}``).

    The splits just evaluated replace theirs; the file's other splits stay (so evaluating
    ``train`` does not erase the ``val`` numbers training wrote into ``best/metrics.json``).
    A file there that is not such a metrics file is never overwritten: ``UsageError``.
    """
    if not path.exists():
        return dict(results)
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--output {path} exists and is not a metrics file ({err}); "
                         "pass another --output") from None
    if not isinstance(old, dict) or not all(isinstance(v, dict) for v in old.values()):
        raise UsageError(f"--output {path} exists and is not a metrics file (expected a JSON object "
                         f"{{split: {{metric: value}}}}, got {type(old).__name__}); pass another --output")
    return {**old, **results}


def format_diversity_table(results: Dict[str, dict]) -> str:
    """The query-diversity columns of :func:`evaluate` as a plain-text table."""
    from .evaluation import DIVERSITY_KEYS

    width = max([5] + [len(s) for s in results])
    header = f"{'split':<{width}} " + " ".join(f"{k:>18}" for k in DIVERSITY_KEYS)
    lines = ["query diversity (see docs/training.md):", header, "-" * len(header)]
    for split, metrics in results.items():
        lines.append(f"{split:<{width}} " + " ".join(f"{metrics.get(k, float('nan')):18.3f}" for k in DIVERSITY_KEYS))
    return "\n".join(lines)
