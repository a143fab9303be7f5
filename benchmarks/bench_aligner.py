"""Speed of the aligner's dynamic convolution: per-query loop vs batched unfused vs fused.

Axis legend: b batch, n queries, c channels, h w space, k kernel size.

Everything runs in one process, interleaved (each round times every variant once, in turn),
and the table reports medians over rounds, so that load on the machine hits all variants
alike. The machine's matmul rate is measured in the same run with one large ``torch.mm``.

    python benchmarks/bench_aligner.py                 # full grid (CPU: ~20-40 min on 2 cores)
    python benchmarks/bench_aligner.py --quick         # n = 24, k = 3, c = 256, 120 x 120 only
    python benchmarks/bench_aligner.py --device cuda --dtype bfloat16

Writes ``benchmarks/results/aligner_<device>.json`` and ``.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from vlaligner import VisionLanguageAligner
from vlaligner.functional import dynamic_conv2d, fuse_dynamic_kernels

RESULTS = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int, warmup: int = 1
) -> Dict[str, float]:
    """Median seconds per call of each function, timed round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def rounds_for(fns: Dict[str, Callable[[], object]], device: torch.device, args) -> int:
    """As many rounds as fit ``--seconds-per-config`` (at least 3, at most ``--rounds``).

    The slowest variant (the per-query loop, at b = 8 and n = 24 over a minute per
    forward+backward on 2 cores) sets the count, so that the full grid stays affordable.
    """
    slowest = max(time_once(fn, device) for fn in fns.values())
    return int(min(args.rounds, max(3, args.seconds_per_config / max(slowest * len(fns), 1e-9))))


def matmul_rate(device: torch.device, dtype: torch.dtype, rounds: int) -> float:
    """GFLOP/s of one large square ``torch.mm`` (the machine's practical peak)."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = interleaved_medians({"mm": lambda: torch.mm(a, b)}, device, rounds, warmup=2)["mm"]
    return 2 * size**3 / seconds / 1e9


def loop_conv(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference: one ``F.conv2d`` per sample and per query."""
    k = weight.shape[-1]
    rows = []
    for i in range(weight.shape[0]):
        rows.append(torch.cat([
            F.conv2d(features[i : i + 1], weight[i, j : j + 1], bias[i, j : j + 1], padding=k // 2)
            for j in range(weight.shape[1])
        ], dim=1))
    return torch.cat(rows)


def op_variants(features, weight, bias, scores, backward: bool) -> Dict[str, Callable[[], object]]:
    """The op in its forms: n masks ``(b n h w)`` by loop or batched, or the fused ``(b 1 h w)``."""

    def run(fn):
        def call():
            out = fn()
            if backward:
                out.sum().backward()
            return out
        return call

    variants = {
        "loop": run(lambda: loop_conv(features, weight, bias)),
        "unfused": run(lambda: dynamic_conv2d(features, weight, bias)),
        "unfused_taps": run(lambda: dynamic_conv2d(features, weight, bias, method="taps")),
        "unfused_grouped": run(lambda: dynamic_conv2d(features, weight, bias, method="grouped")),
        "fused": run(lambda: dynamic_conv2d(features, *fuse_dynamic_kernels(weight, bias, scores))),
        "fused_grouped": run(
            lambda: dynamic_conv2d(features, *fuse_dynamic_kernels(weight, bias, scores), method="grouped")
        ),
    }
    if weight.shape[-1] != 1:
        return variants
    # For 1x1 kernels every method is a plain matmul; keep the table short.
    for name in ("unfused_taps", "unfused_grouped", "fused_grouped"):
        del variants[name]
    return variants


def bench_ops(args, device, dtype, mm_gflops) -> List[dict]:
    rows = []
    grid = itertools.product(args.kernel_sizes, args.queries, args.batches, args.sizes, (False, True))
    for k, n, b, size, backward in grid:
        c = args.channels
        need_grad = backward
        features = torch.randn(b, c, size, size, device=device, dtype=dtype, requires_grad=need_grad)
        weight = (torch.randn(b, n, c, k, k, device=device, dtype=dtype) / (c * k * k) ** 0.5).requires_grad_(need_grad)
        bias = torch.randn(b, n, device=device, dtype=dtype, requires_grad=need_grad)
        scores = torch.randn(b, n, device=device, dtype=dtype).softmax(-1).requires_grad_(need_grad)
        variants = op_variants(features, weight, bias, scores, backward)
        if args.skip_loop_above and b * n > args.skip_loop_above:
            variants.pop("loop")
        medians = interleaved_medians(variants, device, rounds_for(variants, device, args))
        pass_factor = 3 if backward else 1
        flops = {
            "loop": 2 * b * n * c * k * k * size * size * pass_factor,
            "unfused": 2 * b * n * c * k * k * size * size * pass_factor,
            "fused": 2 * b * c * k * k * size * size * pass_factor,
        }
        for name, seconds in medians.items():
            kind = name.split("_")[0]
            gflops = flops[kind] / seconds / 1e9
            rows.append({
                "k": k, "n": n, "b": b, "c": c, "hw": size, "pass": "fwd+bwd" if backward else "fwd",
                "variant": name, "ms": seconds * 1e3, "gflops": gflops,
                "share_of_mm": gflops / mm_gflops,
                "speedup_vs_loop": (medians["loop"] / seconds) if "loop" in medians else None,
            })
        print(format_row_group(rows[-len(medians):]), flush=True)
    return rows


def bench_aligner_module(args, device, dtype) -> List[dict]:
    """``VisionLanguageAligner`` fused call vs the same call with ``return_query_masks=True``."""
    rows = []
    for n, b, size in itertools.product(args.queries, args.batches, args.sizes):
        aligner = VisionLanguageAligner(
            in_channels=args.channels, query_dim=args.channels, kernel_size=3, num_heads=8
        ).to(device=device, dtype=dtype).eval()
        features = torch.randn(b, args.channels, size, size, device=device, dtype=dtype)
        queries = torch.randn(b, n, args.channels, device=device, dtype=dtype)
        with torch.inference_mode():
            medians = interleaved_medians({
                "fused": lambda: aligner(features, queries),
                "with_query_masks": lambda: aligner(features, queries, return_query_masks=True),
            }, device, args.rounds)
        row = {
            "n": n, "b": b, "c": args.channels, "hw": size, "k": 3,
            "fused_ms": medians["fused"] * 1e3, "with_query_masks_ms": medians["with_query_masks"] * 1e3,
            "ratio": medians["with_query_masks"] / medians["fused"],
        }
        rows.append(row)
        print(f"aligner n={n:>2} b={b} {size}x{size}: fused {row['fused_ms']:.2f} ms, "
              f"with query masks {row['with_query_masks_ms']:.2f} ms, ratio {row['ratio']:.1f}x", flush=True)
    return rows


def format_row_group(rows: List[dict]) -> str:
    head = rows[0]
    parts = [f"k={head['k']} n={head['n']:>2} b={head['b']} {head['hw']}x{head['hw']} {head['pass']:>7}:"]
    for r in rows:
        speed = f" x{r['speedup_vs_loop']:.1f}" if r["speedup_vs_loop"] else ""
        parts.append(f"{r['variant']} {r['ms']:.2f}ms {100 * r['share_of_mm']:.0f}%mm{speed}")
    return " | ".join(parts)


def markdown(op_rows, aligner_rows, meta) -> str:
    lines = [
        f"# Aligner op benchmark ({meta['device']}, {meta['dtype']})", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; threads {meta['threads']}; "
        f"matmul rate (one {meta['mm_size']} torch.mm): {meta['mm_gflops']:.1f} GFLOP/s", "",
        "Times are medians of interleaved rounds. `loop`: one `F.conv2d` per sample and query; "
        "`unfused`: `dynamic_conv2d` with its automatic method (`_taps`, `_grouped`: forced), "
        "n masks; `fused`: `fuse_dynamic_kernels` + one `dynamic_conv2d`, the aggregated mask. "
        "GFLOP/s counts the useful multiply-adds of each variant (n kernels for loop/unfused, "
        "one for fused); `% mm` is that rate over the matmul rate; `vs loop` is the loop's time "
        "over the variant's.", "",
        "| k | n | b | h=w | pass | variant | ms | GFLOP/s | % mm | vs loop |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in op_rows:
        vs = f"{r['speedup_vs_loop']:.1f}x" if r["speedup_vs_loop"] else "-"
        lines.append(
            f"| {r['k']} | {r['n']} | {r['b']} | {r['hw']} | {r['pass']} | {r['variant']} | "
            f"{r['ms']:.2f} | {r['gflops']:.1f} | {100 * r['share_of_mm']:.0f}% | {vs} |"
        )
    lines += ["", "## VisionLanguageAligner: fused call vs `return_query_masks=True` (k = 3)", "",
              "| n | b | h=w | fused ms | with query masks ms | ratio |", "|---|---|---|---|---|---|"]
    for r in aligner_rows:
        lines.append(f"| {r['n']} | {r['b']} | {r['hw']} | {r['fused_ms']:.2f} | "
                     f"{r['with_query_masks_ms']:.2f} | {r['ratio']:.1f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8, 24])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 120])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per configuration")
    parser.add_argument("--seconds-per-config", type=float, default=20.0,
                        help="time budget that sets the rounds of one configuration (>= 3 rounds)")
    parser.add_argument("--skip-loop-above", type=int, default=0,
                        help="skip the per-query loop when b*n exceeds this (0: never skip)")
    parser.add_argument("--quick", action="store_true", help="only n = 24, k = 3, c = 256, 120 x 120, b in {1, 8}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a machine where other processes "
                             "run, 1 thread gives stable numbers: idle OpenMP threads spin-wait on a busy core")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.kernel_sizes, args.queries, args.sizes = [3], [24], [120]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    mm_gflops = matmul_rate(device, dtype, rounds=args.rounds)
    print(f"matmul rate: {mm_gflops:.1f} GFLOP/s ({device}, {dtype}, {torch.get_num_threads()} threads)")
    op_rows = bench_ops(args, device, dtype, mm_gflops)
    aligner_rows = bench_aligner_module(args, device, dtype)
    meta = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "mm_size": 2048 if device.type == "cpu" else 8192, "mm_gflops": mm_gflops,
        "command": "python benchmarks/bench_aligner.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    text = markdown(op_rows, aligner_rows, meta)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        threads = f"_{torch.get_num_threads()}threads" if device.type == "cpu" else ""
        stem = RESULTS / f"aligner_{device.type}_{args.dtype}{threads}{'_quick' if args.quick else ''}"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "ops": op_rows, "aligner": aligner_rows}, indent=2))
        stem.with_suffix(".md").write_text(text)
        print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
