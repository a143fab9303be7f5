"""The GPU measurements of issue 16, prepared as one script for a short loan of a GPU machine.

Axes: b batch, n queries, c channels, h w space, k kernel size, S input side.

Steps (each writes its own JSON into ``benchmarks/results/``, so a step that runs out of
time leaves the earlier ones):

1. ``tests``: the CUDA tests (``pytest -q -m "not slow" -k cuda``), their summary line.
2. ``dynconv``: every ``dynamic_conv2d`` method (taps, grouped, and einsum for k = 1) on CUDA
   over n in {1, 8, 24}, k in {1, 3}, float32 / bfloat16, c = 256, 120 x 120, batch 32,
   forward; CUDA-event median. The row also gives the time of reading the features once
   at the card's bandwidth (``--bandwidth`` GB/s) so the fused kernel (n = 1) can be judged
   against the goal "within 2x of reading its features once". ``auto`` should be set from
   this table (``vlaligner.functional._choose_method``).
3. ``model``: the whole Swin-B + BERT-base EAVL at 480 (random weights, n = 24) in bfloat16
   autocast: batch 1 eager, ``torch.compile``, ``torch.compile(mode="reduce-overhead")``
   (CUDA graphs), batch 64 throughput (compiled), and one AMP training step (bf16 autocast,
   AdamW, batch ``--train-batch``). Goals: batch 1 >= 100 FPS compiled, >= 25 FPS eager,
   batch 64 >= 300 img/s.

    python benchmarks/gpu_suite.py                       # all steps (~8-10 min on an H100/H200)
    python benchmarks/gpu_suite.py --steps dynconv model --quick

Nothing here runs without CUDA: the script stops with a message. The numbers it writes are
the only GPU numbers the docs may quote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def cuda_time(fn: Callable[[], object], runs: int, warmup: int = 3) -> List[float]:
    """Milliseconds per call of ``fn`` from CUDA events (one synchronisation per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _stats(ms: List[float]) -> Dict[str, float]:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def _write(name: str, payload: Dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:]), **payload}
    (RESULTS / f"gpu_{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2), flush=True)


def step_tests() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-k", "cuda", "tests"],
        cwd=ROOT, capture_output=True, text=True,
    )
    lines = done.stdout.strip().splitlines()
    _write("tests", {"returncode": done.returncode, "summary": lines[-1] if lines else "", "tail": lines[-30:]})


def step_dynconv(quick: bool, bandwidth_gbs: float) -> None:
    from vlaligner.functional import _METHODS, dynamic_conv2d

    b, c, h, w = (8 if quick else 32), 256, 120, 120
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        feats = torch.randn(b, c, h, w, device="cuda", dtype=dtype)
        read_ms = feats.numel() * feats.element_size() / (bandwidth_gbs * 1e9) * 1e3
        for k in (1, 3):
            for n in (1, 8, 24):
                weight = torch.randn(b, n, c, k, k, device="cuda", dtype=dtype)
                bias = torch.randn(b, n, device="cuda", dtype=dtype)
                for method in sorted(_METHODS):
                    if method == "einsum" and k != 1:
                        continue
                    with torch.inference_mode():
                        ms = cuda_time(lambda: dynamic_conv2d(feats, weight, bias, method=method), 10 if quick else 50)
                    rows.append({"dtype": str(dtype).replace("torch.", ""), "b": b, "c": c, "hw": h, "k": k,
                                 "n": n, "method": method, **_stats(ms), "read_features_once_ms": read_ms})
    _write("dynconv", {"bandwidth_gbs": bandwidth_gbs, "rows": rows})


def step_model(quick: bool, train_batch: int) -> None:
    from vlaligner.models import build_eavl_swin_b

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = build_eavl_swin_b(pretrained=False).cuda().eval()
    runs = 10 if quick else 50
    results: Dict[str, Dict] = {}

    def inputs(batch: int):
        image = torch.randn(batch, 3, 480, 480, device="cuda")
        ids, mask = model.tokenize(["the man in the red shirt on the left"] * batch)
        return image, ids.cuda(), mask.cuda()

    def timed(name: str, fn, batch: int, n: int = runs) -> None:
        try:
            ms = cuda_time(fn, n)
        except Exception as error:  # record, and go on with the next row
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        else:
            results[name] = {**_stats(ms), "batch": batch, "per_s": batch * 1e3 / statistics.median(ms)}
        print(name, results[name], flush=True)

    def save() -> None:  # after every row: a step cut short by a time limit keeps its rows
        results["peak memory GiB"] = {"value": torch.cuda.max_memory_allocated() / 2**30}
        _write("model", {"img_size": 480, "dtype": "bfloat16", "results": results})

    # Eager rows first, compiled rows last (compiling Swin-B takes a minute or more).
    one = inputs(1)
    many = inputs(8 if quick else 64)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        timed("batch 1 eager", lambda: model(*one), 1)
        timed(f"batch {many[0].shape[0]} eager", lambda: model(*many), many[0].shape[0], max(5, runs // 5))
    save()
    # One AMP training step: bf16 autocast forward + loss, backward, AdamW.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    train = inputs(train_batch)
    target = (torch.rand(train_batch, 1, 120, 120, device="cuda") > 0.5).float()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(*train).logits
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        optimizer.step()

    timed(f"AMP training step, batch {train_batch}", step, train_batch, max(5, runs // 5))
    del optimizer
    model.eval()
    save()
    compiled = torch.compile(model)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        start = time.perf_counter()
        compiled(*one)
        results["compile seconds (default)"] = {"seconds": time.perf_counter() - start}
        timed("batch 1 compiled", lambda: compiled(*one), 1)
        save()
        timed(f"batch {many[0].shape[0]} compiled", lambda: compiled(*many), many[0].shape[0], max(5, runs // 5))
        save()
    graphs = torch.compile(model, mode="reduce-overhead")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        timed("batch 1 compiled + CUDA graphs", lambda: graphs(*one), 1)
    save()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", default=["tests", "dynconv", "model"],
                        choices=["tests", "dynconv", "model"])
    parser.add_argument("--quick", action="store_true", help="fewer runs and smaller batches")
    parser.add_argument("--bandwidth", type=float, default=3000.0, metavar="GB/s",
                        help="memory bandwidth for the read-once reference; default 3000 (H100 SXM ~3350)")
    parser.add_argument("--train-batch", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite.py needs CUDA; nothing measured (the GPU rows stay 'not measured')")
        return 1
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {platform.python_version()}, "
          f"pid {os.getpid()}", flush=True)
    for name in args.steps:
        start = time.perf_counter()
        if name == "tests":
            step_tests()
        elif name == "dynconv":
            step_dynconv(args.quick, args.bandwidth)
        else:
            step_model(args.quick, args.train_batch)
        print(f"step {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
