"""Whole-model cost of EAVL (paper table VI): parameters, GFLOPs and batch-1 latency.

Axis legend: b batch (1 here), n queries, l words (17), c channels, h w space, H W input size.

For each model size (the paper's Swin-B + BERT-base at 480 x 480, and the tiny CPU model),
three heads are compared on the same random-initialised network (``pretrained=False``:
nothing is downloaded; cost does not depend on the weights):

- ``fixed``: the table-III baseline, one learned k x k kernel (``head="fixed"``);
- ``aligner (unfused)``: the aligner asked for its n per-query masks
  (``return_query_masks=True``), i.e. what a plain implementation of Eq. 14 computes;
- ``aligner (fused)``: the aligner's normal call, one convolution with the score-weighted
  kernel whatever n.

Parameters and FLOPs come from :func:`vlaligner.models.model_report`
(``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs; the paper's
"GFLOPs", like fvcore's, count multiply-adds, so compare them with the GMACs column).
Latency is the median over interleaved rounds (each round times every variant once, in turn,
so that load on the machine hits all alike), warm-up excluded, under ``torch.inference_mode``;
the head alone (its inputs captured from the model) is timed the same way, since the whole
model's time hides the head's. CPU always (one thread by default: on the shared 2-core
development machine two threads gave the tiny model 41-1088 ms per forward, one thread
25-34 ms); CUDA too when a GPU is visible, under ``torch.autocast`` in ``--cuda-dtype``
(bfloat16 by default).

    python benchmarks/bench_model.py                               # tiny + swin-b (CPU: ~6-10 min)
    python benchmarks/bench_model.py --sizes tiny --runs 30
    python benchmarks/bench_model.py --sizes swin-b --devices cuda --runs 50

Writes ``benchmarks/results/model_<device>_<dtype>[_<sizes>].json`` and ``.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

# Reuse the lead's timer (same synchronisation) from the sibling script.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_aligner import time_once  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: Paper, table VI (EAVL, Swin-B + BERT-base, 480 x 480); its GFLOPs count multiply-adds.
PAPER = {"params_m": 202.11, "gmacs": 131.01, "fps": 8.78}

#: size name -> (builder name in vlaligner.models.BUILDERS, builder kwargs, default rounds).
SIZES: Dict[str, tuple] = {
    "tiny": ("eavl_tiny", {}, 20),
    "swin-b": ("eavl_swin_b", {"pretrained": False, "img_size": 480}, 5),
}
VARIANTS = ("fixed", "aligner (unfused)", "aligner (fused)")
SENTENCE = "the man in the red shirt on the left"


def interleaved_samples(
    fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int, warmup: int
) -> Dict[str, List[float]]:
    """Seconds per call of each function over ``rounds`` round-robin rounds (as bench_aligner's
    ``interleaved_medians``, keeping every sample so that the spread can be reported)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, device))
    return samples


def summary_ms(values: List[float]) -> Dict[str, float]:
    """Median, min and max of a list of seconds, in milliseconds."""
    return {"median": statistics.median(values) * 1e3, "min": min(values) * 1e3, "max": max(values) * 1e3}


def kernel_steps(fixed_head, aligner_head, fixed_in, aligner_in) -> Dict[str, Callable[[], object]]:
    """What differs between the heads: everything after their (identical) up-projection.

    fixed: the learned k x k convolution. Aligner: queries -> kernels, the estimator's
    scores, then the fused dynamic convolution, plus (unfused) the n per-query masks, as
    ``VisionLanguageAligner.forward`` does with ``return_query_masks=True``.
    """
    from vlaligner.functional import dynamic_conv2d, fuse_dynamic_kernels, split_dynamic_params

    from vlaligner.mask_generator import append_coordinates

    fixed_projected = fixed_head.projection(fixed_in[0])
    if fixed_head.append_coords:
        fixed_projected = append_coordinates(fixed_projected)
    generator = aligner_head.mask_generator
    projected = generator.projection(aligner_in[0])
    if generator.append_coords:
        projected = append_coordinates(projected)
    queries = aligner_in[1]

    def aligner_step(unfused: bool):
        weight, bias = split_dynamic_params(generator.param_proj(queries), generator.kernel_channels,
                                            generator.kernel_size)
        scores = aligner_head.scores(queries)
        logits = dynamic_conv2d(projected, *fuse_dynamic_kernels(weight, bias, scores))
        masks = dynamic_conv2d(projected, weight, bias) if unfused else None
        return logits, masks

    return {
        "fixed": lambda: fixed_head.classifier(fixed_projected),
        "aligner (unfused)": lambda: aligner_step(True),
        "aligner (fused)": lambda: aligner_step(False),
    }


def build(size: str, head: str, *, kernel_size: int, seed: int) -> torch.nn.Module:
    """One random-initialised EAVL of ``size`` with ``head`` ("aligner" or "fixed")."""
    import warnings

    from vlaligner.models import BUILDERS

    builder, kwargs, _ = SIZES[size]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # Without a cached BERT tokenizer the embedded vocabulary is used: the cost is the same.
        warnings.simplefilter("ignore")
        model = BUILDERS[builder](head=head, kernel_size=kernel_size, **kwargs)
    return model.eval()


def capture_head_inputs(model, images, ids, mask) -> tuple:
    """The ``(decoded (b d h w), queries (b n d))`` the model hands to its head."""
    captured: List[tuple] = []
    handle = model.head.register_forward_hook(lambda module, args, out: captured.append(args))
    try:
        model(images, ids, mask)
    finally:
        handle.remove()
    decoded, queries = captured[0][:2]
    return decoded, queries


def bench_size(size: str, args, devices: List[torch.device]) -> List[dict]:
    """Rows (one per device x variant) for one model size."""
    from vlaligner.models import model_report

    t0 = time.perf_counter()
    models = {
        "fixed": build(size, "fixed", kernel_size=args.kernel_size, seed=args.seed),
        "aligner": build(size, "aligner", kernel_size=args.kernel_size, seed=args.seed),
    }
    print(f"[{size}] built in {time.perf_counter() - t0:.1f} s", flush=True)

    # FLOPs and parameters do not depend on the device: count once, in float32 on the CPU.
    t0 = time.perf_counter()
    fixed_report = model_report(models["fixed"], batch_size=1)
    aligner_report = model_report(models["aligner"], batch_size=1, unfused=True)
    print(f"[{size}] FLOPs counted in {time.perf_counter() - t0:.1f} s", flush=True)
    static = {
        "fixed": (fixed_report["params"], fixed_report["gflops"], fixed_report["gflops_by_part"].get("head")),
        "aligner (unfused)": (
            aligner_report["params"], aligner_report["gflops_unfused"],
            aligner_report["gflops_by_part"].get("head", 0.0) + aligner_report["gflops_saved_by_fusion"],
        ),
        "aligner (fused)": (aligner_report["params"], aligner_report["gflops"], aligner_report["gflops_by_part"].get("head")),
    }
    img_size = aligner_report["img_size"]
    aligner, fixed = models["aligner"], models["fixed"]
    rows = []
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.cuda_dtype)
        for model in models.values():
            model.to(device)
        ids, mask = aligner.tokenize([SENTENCE])
        ids, mask = ids.to(device), mask.to(device)
        torch.manual_seed(args.seed)
        images = torch.randn(1, 3, img_size, img_size, device=device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        # A GPU forward takes milliseconds: many more rounds cost nothing there.
        runs = args.runs or (SIZES[size][2] if device.type == "cpu" else 50)
        warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" and size == "swin-b" else 3)
        with torch.inference_mode(), autocast:
            fixed_in = capture_head_inputs(fixed, images, ids, mask)
            aligner_in = capture_head_inputs(aligner, images, ids, mask)
            whole: Dict[str, Callable[[], Any]] = {
                "fixed": lambda: fixed(images, ids, mask),
                "aligner (unfused)": lambda: aligner(images, ids, mask, return_query_masks=True),
                "aligner (fused)": lambda: aligner(images, ids, mask),
            }
            head: Dict[str, Callable[[], Any]] = {
                "fixed": lambda: fixed.head(*fixed_in),
                "aligner (unfused)": lambda: aligner.head(*aligner_in, return_query_masks=True),
                "aligner (fused)": lambda: aligner.head(*aligner_in),
            }
            step = kernel_steps(fixed.head, aligner.head, fixed_in, aligner_in)
            t0 = time.perf_counter()
            model_s = interleaved_samples(whole, device, rounds=runs, warmup=warmup)
            head_s = interleaved_samples(head, device, rounds=max(runs, args.head_runs), warmup=warmup)
            step_s = interleaved_samples(step, device, rounds=max(runs, args.head_runs), warmup=warmup)
        print(f"[{size}] {device.type} timed in {time.perf_counter() - t0:.1f} s "
              f"({runs} rounds, {warmup} warm-up)", flush=True)
        for variant in VARIANTS:
            params, gflops, head_gflops = static[variant]
            latency, head_ms, step_ms = summary_ms(model_s[variant]), summary_ms(head_s[variant]), summary_ms(step_s[variant])
            row = {
                "size": size, "builder": SIZES[size][0], "img_size": img_size, "text_length": int(ids.shape[1]),
                "num_queries": aligner.num_queries, "kernel_size": args.kernel_size, "variant": variant,
                "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                "params": params, "gflops": gflops, "gmacs": gflops / 2, "head_gflops": head_gflops,
                "latency_ms": latency["median"], "latency_min_ms": latency["min"], "latency_max_ms": latency["max"],
                "fps": 1e3 / latency["median"],
                "head_ms": head_ms["median"], "head_min_ms": head_ms["min"], "head_max_ms": head_ms["max"],
                "kernel_step_ms": step_ms["median"], "kernel_step_min_ms": step_ms["min"],
                "kernel_step_max_ms": step_ms["max"],
                "rounds": runs, "head_rounds": max(runs, args.head_runs), "warmup": warmup,
                "params_by_part": (fixed_report if variant == "fixed" else aligner_report)["params_by_part"],
            }
            rows.append(row)
            print(format_row(row), flush=True)
    for model in models.values():
        model.to("cpu")
    del models
    return rows


def format_row(r: dict) -> str:
    return (f"{r['size']:>6} {r['device']:>4} {r['dtype']:>8} {r['variant']:<18} "
            f"{r['params'] / 1e6:8.2f} M {r['gflops']:8.2f} GFLOPs {r['gmacs']:8.2f} GMACs "
            f"{r['latency_ms']:9.1f} ms ({r['latency_min_ms']:.1f}-{r['latency_max_ms']:.1f}) {r['fps']:7.3g} FPS "
            f"| head {r['head_ms']:.2f} ms | kernel step {r['kernel_step_ms']:.3f} ms")


def _spread(r: dict, key: str, digits: int) -> str:
    return f"{r[key + '_ms']:.{digits}f} ({r[key + '_min_ms']:.{digits}f}-{r[key + '_max_ms']:.{digits}f})"


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible"


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [
        f"# EAVL model cost ({meta['device']}, {meta['dtype']})", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; threads {meta['threads']}; "
        f"load average at start {meta['loadavg']}", "",
        "Batch 1, sentence of 17 tokens, random weights, `torch.inference_mode`. GFLOPs from "
        "`torch.utils.flop_counter` (2 per multiply-add); GMACs = GFLOPs / 2 is what the paper "
        "(and fvcore) call GFLOPs. Times in ms: median (min-max) of interleaved rounds, warm-up "
        "excluded; FPS = 1 / median latency. Head: the whole head (up-projection included) on the "
        "inputs the model gives it. Kernel step: only what differs between the heads, after their "
        "identical up-projection (fixed conv, or query kernels + scores + dynamic convolution).", "",
        "| Model | Input | Head | Params (M) | GFLOPs | GMACs | Latency (ms) | FPS | Head (ms) | Head GFLOPs | Kernel step (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "EAVL Swin-B + BERT-base" if r["size"] == "swin-b" else "EAVL tiny"
        lines.append(
            f"| {name} (n={r['num_queries']}) | {r['img_size']} | {r['variant']} | {r['params'] / 1e6:.2f} | "
            f"{r['gflops']:.2f} | {r['gmacs']:.2f} | {_spread(r, 'latency', 1)} | {r['fps']:.3g} | "
            f"{_spread(r, 'head', 2)} | {r['head_gflops']:.3f} | {_spread(r, 'kernel_step', 3)} |"
        )
    lines.append(
        f"| EAVL, paper table VI | 480 | aligner | {PAPER['params_m']:.2f} | - | {PAPER['gmacs']:.2f} | "
        f"- | {PAPER['fps']:.2f} (paper's GPU) | - | - | - |"
    )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "swin-b"])
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="default: cpu, plus cuda when a GPU is visible")
    parser.add_argument("--cuda-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="autocast dtype on CUDA (CPU always runs float32)")
    parser.add_argument("--runs", type=int, default=None,
                        help="interleaved rounds per variant (default on CPU 20 for tiny, 5 for swin-b; on CUDA 50)")
    parser.add_argument("--head-runs", type=int, default=30, help="rounds for the head-only timing")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds first (default 3; 1 for swin-b on CPU)")
    parser.add_argument("--kernel-size", type=int, default=3, help="k of the query kernels and of the fixed kernel")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine multi-threaded timings "
                             "swing tenfold with other jobs; 0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    for name in ("runs", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("warmup", "threads") else 1):
            parser.error(f"--{name} must be >= {0 if name in ('warmup', 'threads') else 1}, got {value}")
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda asked for, but no CUDA device is visible")
    return args


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices]
    loadavg = "%.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "n/a"
    rows: List[dict] = []
    for size in args.sizes:
        rows += bench_size(size, args, devices)
    command = "python benchmarks/bench_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for device in devices:
        device_rows = [r for r in rows if r["device"] == device.type]
        dtype = device_rows[0]["dtype"]
        meta = {
            "device": device.type, "dtype": dtype, "machine": machine_description(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": loadavg,
            "command": command.strip(), "paper": PAPER,
        }
        text = markdown(device_rows, meta)
        print(text)
        if not args.no_write:
            RESULTS.mkdir(parents=True, exist_ok=True)
            suffix = "" if sorted(args.sizes) == sorted(SIZES) else "_" + "-".join(args.sizes)
            stem = RESULTS / f"model_{device.type}_{dtype}{suffix}"
            stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": device_rows}, indent=2) + "\n")
            stem.with_suffix(".md").write_text(text)
            print(f"wrote {stem}.json and {stem}.md")
    return rows


if __name__ == "__main__":
    main()
