"""The paper's Table V at small scale: each host with its own head and with the aligner.

Axis legend: b batch, l words, h w logit grid, S input size.

For every host (``vlt``: the PyTorch re-implementation of VLT in ``adapters/vlt``, tiny
configuration; ``cris``: the CRIS replica of ``tests/hosts/cris_host.py``, widened a little)
and every head (``fixed``: the host's own final kernel; ``aligner``: the retrofit), the
project's trainer (``vlaligner.training.Trainer``, the loop of ``examples/train_eavl.py`` and
``adapters/vlt/train_vlt.py``, with the ``adam-poly`` recipe) trains the model on the synthetic RefCOCO-layout set with the host's own loss (BCE with
logits; by default plus a soft Dice term, the same for both heads, as short runs on BCE alone
predict background everywhere: measured, mIoU 0.00 for VLT after 300 steps), the same
data order, the same number of steps and the same seeds, then evaluates the final model on
the validation split (oIoU, mIoU, Pr@X at the original image size, ``vlaligner.evaluate_masks``).
The tables report mean and spread (sample standard deviation and min-max) over the seeds.

Designed for a scarce CPU: one configuration (host, head, seed) at the defaults (96 px,
300 steps of batch 8, one thread) takes a few minutes. Every finished run is kept as JSON
in ``--output-dir``; a rerun with the same settings reuses it, so an interrupted sweep
continues where it stopped. The tables are rewritten after every run::

    nice -n 10 python benchmarks/retrofit.py                         # 2 hosts x 2 heads x 3 seeds
    python benchmarks/retrofit.py --hosts vlt --seeds 0 --steps 5 --results-name retrofit_smoke
    python benchmarks/retrofit.py --device cuda --img-size 192 --steps 3000 --batch-size 32 \\
        --threads 8 --results-name retrofit_gpu

Results: ``benchmarks/results/<results-name>.md`` and ``.json`` (with the command).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.machine_info import describe_machine  # noqa: E402
RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("mIoU", "oIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9")
HOSTS = ("vlt", "cris")
HEADS = ("fixed", "aligner")
HOST_NAMES = {
    "vlt": "VLT (PyTorch re-implementation, tiny Swin + 1-layer BERT)",
    "cris": "CRIS (test replica: toy CLIP, FPN neck, 1-layer decoder, CRIS's Projector)",
}


# ------------------------------------------------------------------------------------ hosts
def load_cris_replica():
    """``tests/hosts/cris_host.py`` as a module (CI's CRIS stand-in; no upstream code)."""
    path = ROOT / "tests" / "hosts" / "cris_host.py"
    spec = importlib.util.spec_from_file_location("vlaligner_bench_cris_host", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cris_logits(cris: nn.Module, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # CRIS reads padding from the ids (0 = padding, BERT's [PAD] too); attention_mask agrees.
    # predict() is CRIS's forward with gradients in both modes (its training forward returns the
    # prediction detached with its own BCE), so the same loss and Dice apply to both heads.
    return cris.predict(images, input_ids * (attention_mask > 0))[0]


def build_host(host: str, head: str, *, img_size: int, max_length: int, num_queries: int):
    """The host ``vlt`` or ``cris`` with ``head`` ``fixed`` (its own kernel) or ``aligner``,
    as a :class:`adapters.trainable.HostSegmenter` that the project's ``Trainer`` trains."""
    from adapters.trainable import HostSegmenter
    from vlaligner.models.tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    config = dict(host=host, head=head, img_size=img_size, max_length=max_length, num_queries=num_queries,
                  vocab_size=len(tokenizer))
    if host == "vlt":
        from adapters.vlt import build_vlt_tiny, retrofit_vlt

        vlt = build_vlt_tiny(img_size=img_size, vocab_size=len(tokenizer), max_length=max_length)
        model = retrofit_vlt(vlt, head=head, num_queries=num_queries)
        logits = lambda m, images, ids, mask: m(images, ids, mask)  # noqa: E731
    elif host == "cris":
        from adapters.cris import retrofit_cris

        replica = load_cris_replica()
        cfg = replica.tiny_cfg(
            input_size=img_size, word_len=max_length, vocab_size=len(tokenizer), word_dim=128, vis_dim=64,
            fpn_in=[32, 64, 128], fpn_out=[32, 64, 128], num_head=4, dim_ffn=128,
        )
        cris, _ = replica.build_segmenter(cfg)
        grid = img_size // 16
        model = retrofit_cris(cris, head=head, num_queries=num_queries, grid_size=(grid, grid), query_dim=cfg.vis_dim)
        logits = _cris_logits
    else:
        raise ValueError(f"host must be one of {HOSTS}, got {host!r}")
    return HostSegmenter(model, logits=logits, tokenizer=tokenizer, max_length=max_length, img_size=img_size,
                         name=host, config=config)


# ------------------------------------------------------------------------------------ one run
def trainer_argv(args: argparse.Namespace, seed: int, output_dir: Path) -> List[str]:
    """The training command line of one run: the ``adam-poly`` recipe (Adam, poly 0.9 per step,
    no warm-up) at ``--lr`` plus ``--dice-weight`` Dice, the final model evaluated once."""
    argv = [
        "--model", "tiny", "--recipe", "adam-poly", "--lr", str(args.lr), "--dice-weight", str(args.dice_weight),
        "--cache-dir", str(args.cache_dir), "--synthetic-images", str(args.synthetic_images),
        "--img-size", str(args.img_size), "--max-length", str(args.max_length),
        "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--epochs", "1000000",
        "--eval-every", str(args.steps), "--seed", str(seed), "--device", args.device,
        "--threads", str(args.threads), "--num-workers", str(args.num_workers),
        "--output-dir", str(output_dir), "--overwrite", "--no-progress", "--log-every", "100",
    ]
    if args.val_samples:
        argv += ["--val-samples", str(args.val_samples)]
    return argv


def run_config(args: argparse.Namespace, host: str, head: str, seed: int) -> dict:
    """Train (host, head) with ``seed`` through the project's ``Trainer`` and return the final
    model's validation metrics (read back from the run's ``metrics.jsonl``)."""
    from vlaligner.fileio import read_jsonl
    from vlaligner.training import DistEnv, Trainer
    from vlaligner.training.options import resolve_train_args

    output_dir = args.output_dir / f"{host}-{head}-seed{seed}"
    train_args = resolve_train_args(trainer_argv(args, seed, output_dir), DistEnv(), prog="retrofit.py")
    trainer = Trainer(
        train_args, DistEnv(),
        model_factory=lambda a: build_host(host, head, img_size=a.img_size, max_length=a.max_length,
                                           num_queries=args.num_queries),
    )
    t0 = time.perf_counter()
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    total_s = time.perf_counter() - t0
    losses = [row["loss"] for row in read_jsonl(output_dir / "losses.jsonl")]
    final = read_jsonl(output_dir / "metrics.jsonl")[-1]
    if final["step"] != args.steps:
        raise RuntimeError(f"{host}/{head}/seed {seed}: the last evaluation is at step {final['step']}, not {args.steps}")
    tail = losses[-20:]
    return dict(
        host=host, head=head, seed=seed, metrics=final["metrics"], params=sum(p.numel() for p in trainer.model.parameters()),
        steps=len(losses), first_loss=losses[0], final_loss=sum(tail) / len(tail), train_s=round(total_s, 1),
        total_s=round(total_s, 1), run_dir=str(output_dir),
    )


# ------------------------------------------------------------------------------------ tables
def aggregate(records: List[dict]) -> Dict[str, dict]:
    """Per (host, head): mean, sample std, min and max of each metric over the seeds."""
    groups: Dict[str, List[dict]] = {}
    for record in records:
        groups.setdefault(f"{record['host']}/{record['head']}", []).append(record)
    summary = {}
    for key, rows in groups.items():
        entry: Dict[str, Any] = {"seeds": sorted(r["seed"] for r in rows), "params": rows[0]["params"]}
        for metric in METRICS:
            values = [r["metrics"][metric] for r in rows]
            entry[metric] = dict(
                mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), values=values,
            )
        entry["minutes"] = statistics.fmean(r["total_s"] for r in rows) / 60
        summary[key] = entry
    return summary


def reading(summary: Dict[str, dict], hosts: List[str]) -> List[str]:
    """One sentence per host: the aligner's mIoU / oIoU change against the seed spread."""
    lines = []
    for host in hosts:
        fixed, aligned = summary.get(f"{host}/fixed"), summary.get(f"{host}/aligner")
        if not fixed or not aligned:
            lines.append(f"- {host}: incomplete (fixed: {bool(fixed)}, aligner: {bool(aligned)}).")
            continue
        parts = []
        for metric in ("mIoU", "oIoU"):
            a, f = aligned[metric], fixed[metric]
            diff = a["mean"] - f["mean"]
            spread = max(a["std"], f["std"])
            overlap = not (a["min"] > f["max"] or f["min"] > a["max"])
            if len(aligned["seeds"]) < 2 or len(fixed["seeds"]) < 2:
                verdict = "one seed only: no spread to compare with"
            elif abs(diff) > 2 * spread and not overlap:
                verdict = f"exceeds the seed spread (2 x std = {2 * spread:.2f}, ranges do not overlap)"
            else:
                verdict = f"within the seed spread (2 x std = {2 * spread:.2f}{', ranges overlap' if overlap else ''})"
            parts.append(f"{metric} {diff:+.2f} ({verdict})")
        lines.append(f"- {host}: aligner - fixed: " + "; ".join(parts) + ".")
    return lines


def markdown(summary: Dict[str, dict], meta: dict) -> str:
    seeds = meta["seeds"]
    out = [
        "# Retrofit at small scale (paper table V)", "",
        f"Command: `{meta['command']}`  ",
        f"Setting: synthetic RefCOCO-layout set ({meta['synthetic_images']} images, generation seed 0), "
        f"input {meta['img_size']} px, {meta['steps']} Adam steps of batch {meta['batch_size']} (lr {meta['lr']}, "
        f"poly decay 0.9), each host's own loss (BCE with logits) + {meta['dice_weight']} x soft Dice for both heads, aligner with n = {meta['num_queries']} "
        f"queries, {meta['threads']} thread(s), device {meta['device']}, seeds {seeds}. Same data, data order, "
        f"steps and seeds for both heads of a host. Metrics (percent) of the final model on `val` "
        f"({meta['val_samples']} sentences) at the original image size.  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; load average at start {meta['loadavg']}.", "",
        "mean ± sample std over the seeds [min, max]:", "",
        "| host | head | params (M) | mIoU | oIoU | Pr@0.5 | Pr@0.7 | Pr@0.9 | seeds | min / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for host in meta["hosts"]:
        for head in HEADS:
            entry = summary.get(f"{host}/{head}")
            if entry is None:
                out.append(f"| {host} | {head} | - | not run yet | | | | | | |")
                continue
            cells = []
            for metric in METRICS:
                m = entry[metric]
                cell = f"{m['mean']:.2f} ± {m['std']:.2f}"
                if metric in ("mIoU", "oIoU"):
                    cell += f" [{m['min']:.2f}, {m['max']:.2f}]"
                cells.append(cell)
            out.append(
                f"| {host} | {head} | {entry['params'] / 1e6:.3f} | " + " | ".join(cells)
                + f" | {','.join(map(str, entry['seeds']))} | {entry['minutes']:.1f} |"
            )
    out += ["", "Hosts: " + "; ".join(f"`{h}`: {HOST_NAMES[h]}" for h in meta["hosts"]) + ".", "",
            "## Reading (generated from the numbers above)", ""]
    out += reading(summary, meta["hosts"])
    complete = all(
        summary.get(f"{h}/{head}") and len(summary[f"{h}/{head}"]["seeds"]) == len(seeds)
        for h in meta["hosts"] for head in HEADS
    )
    if not complete:
        out += ["", f"**Partial results**: not every (host, head, seed) has finished. To finish, run "
                f"the same command again (finished runs in `{meta['output_dir']}` are reused)."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=HOSTS)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--img-size", type=int, default=96, help="a multiple of 32")
    p.add_argument("--max-length", type=int, default=16, help="tokens per sentence")
    p.add_argument("--num-queries", type=int, default=8, help="n of the aligner")
    p.add_argument("--dice-weight", type=float, default=1.0,
                   help="add this times a soft Dice loss to each host's BCE, for both heads (0: BCE only)")
    p.add_argument("--synthetic-images", type=int, default=800)
    p.add_argument("--cache-dir", type=Path, default=None, help="synthetic set folder (default: the package's cache)")
    p.add_argument("--val-samples", type=int, default=0, help="evaluate on the first N val sentences (0: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "retrofit")
    p.add_argument("--results-name", default="retrofit")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the tables go (default benchmarks/results)")
    p.add_argument("--rerun", action="store_true", help="ignore finished runs in --output-dir")
    args = p.parse_args(argv)
    if args.img_size < 32 or args.img_size % 32:
        p.error(f"--img-size must be a positive multiple of 32, got {args.img_size}")
    for name in ("steps", "batch_size", "num_queries", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    torch.set_num_threads(args.threads)
    from vlaligner.data import default_cache_dir

    args.cache_dir = args.cache_dir or default_cache_dir()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("hosts", "heads", "seeds", "output_dir", "results_name", "results_dir", "rerun", "num_workers")}
    settings["loop"] = "vlaligner.training.Trainer"  # records of the earlier hand-written loop are not reused
    meta = dict(
        command="python benchmarks/retrofit.py " + " ".join(shlex.quote(a) for a in raw),
        hosts=args.hosts, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        img_size=args.img_size, num_queries=args.num_queries, dice_weight=args.dice_weight, synthetic_images=args.synthetic_images,
        threads=args.threads, device=args.device, machine=describe_machine(), torch=torch.__version__,
        loadavg="%.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "n/a",
        output_dir=str(args.output_dir), val_samples=None,
    )
    records: List[dict] = []
    args.results_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seeds outermost: a partial sweep has every configuration early
        for host in args.hosts:
            for head in args.heads:
                path = args.output_dir / f"{host}-{head}-seed{seed}.json"
                record = None
                if path.is_file() and not args.rerun:
                    saved = json.loads(path.read_text())
                    if saved.get("settings") == settings:
                        record = saved
                if record is None:
                    print(f"[retrofit] {host} / {head} / seed {seed} ...", flush=True)
                    record = run_config(args, host, head, seed)
                    record["settings"] = settings
                    tmp = path.with_suffix(".json.tmp")
                    tmp.write_text(json.dumps(record, indent=1))
                    os.replace(tmp, path)
                print(f"[retrofit] {host} / {head} / seed {seed}: mIoU {record['metrics']['mIoU']:.2f} "
                      f"oIoU {record['metrics']['oIoU']:.2f} ({record['total_s'] / 60:.1f} min)", flush=True)
                records.append(record)
                meta["val_samples"] = record["metrics"].get("num_samples")
                summary = aggregate(records)
                (args.results_dir / f"{args.results_name}.md").write_text(markdown(summary, meta))
                (args.results_dir / f"{args.results_name}.json").write_text(
                    json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1)
                )
    print((args.results_dir / f"{args.results_name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
