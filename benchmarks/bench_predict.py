"""Prediction throughput on the CPU: one-at-a-time ``predict`` vs ``predict_batch``, and
onnxruntime vs PyTorch eager on the same exported model.

Axes: b image-sentence pairs per forward, S the model's input side, l tokens (17).

The tiny EAVL (random weights; cost does not depend on them) at its own ``--img-size``. Two
measurements, each a median over interleaved rounds (every variant once per round, so other
load on the machine hits all alike), warm-up excluded, one thread by default:

1. ``Predictor``: ``--images`` images of 320 x 240 with one sentence each, as
   ``predict(image, text)`` in a loop and as one ``predict_batch`` call (``--batch-size``
   pairs per forward); images per second, pre- and post-processing included.
2. ONNX (``--onnx``, needs the ``export`` extra): the model exported by
   ``vlaligner.export.export_onnx`` and run by onnxruntime (CPU provider, the same thread
   count) against PyTorch eager ``model(image, input_ids, attention_mask)`` under
   ``torch.inference_mode``, at batch 1 and ``--batch-size``; the ratio is PyTorch time /
   onnxruntime time (above 1: onnxruntime is faster).

    python benchmarks/bench_predict.py --onnx
    python benchmarks/bench_predict.py --images 32 --batch-size 8 --rounds 5

Writes ``benchmarks/results/predict_cpu_<img size>px_<threads>threads.json`` and ``.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlaligner.models import build_eavl_tiny  # noqa: E402
from vlaligner.predictor import Predictor  # noqa: E402


def _interleaved(variants: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _summary(seconds: List[float], items: int) -> Dict[str, float]:
    med = statistics.median(seconds)
    return {"median_s": med, "min_s": min(seconds), "max_s": max(seconds), "items_per_s": items / med}


def bench_predictor(model, images: int, batch_size: int, rounds: int) -> Dict[str, Dict[str, float]]:
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(images)]
    texts = ["the red square on the left"] * images
    predictor = Predictor(model, batch_size=batch_size)

    def one_at_a_time():
        for pic, text in zip(pics, texts):
            predictor.predict(pic, text)

    def batched():
        predictor.predict_batch(pics, texts)

    times = _interleaved({"predict (loop)": one_at_a_time, "predict_batch": batched}, rounds)
    return {name: _summary(t, images) for name, t in times.items()}


def bench_onnx(model, batch_size: int, rounds: int, threads: int, onnx_file=None) -> Dict[str, Dict[str, float]]:
    from vlaligner.export import check_export_matches, example_inputs, export_onnx, onnx_session, run_onnx

    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_file is None:
            path = export_onnx(model, Path(tmp) / "tiny.onnx")
        else:  # a file exported earlier from the same model (same seed): checked before timing
            path = Path(onnx_file)
        results["max |difference| vs PyTorch"] = {"value": check_export_matches(model, path)}
        session = onnx_session(path, threads=threads)
        for b in sorted({1, batch_size}):
            image, input_ids, attention_mask = example_inputs(model, batch_size=b)

            def eager():
                with torch.inference_mode():
                    model(image, input_ids, attention_mask)

            def ort():
                run_onnx(session, image, input_ids, attention_mask)

            times = _interleaved({"pytorch eager": eager, "onnxruntime": ort}, rounds * 4, warmup=2)
            for name, t in times.items():
                results[f"{name}, batch {b}"] = _summary(t, b)
            results[f"ratio, batch {b}"] = {
                "pytorch_over_onnxruntime": statistics.median(times["pytorch eager"])
                / statistics.median(times["onnxruntime"])
            }
    return results


def _markdown(meta: Dict, predictor: Dict, onnx: Dict) -> str:
    lines = [
        f"# Prediction throughput (cpu, float32, {meta['threads']} thread(s))",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; load average at start {meta['load']}",
        "",
        f"Tiny EAVL (random weights) at {meta['img_size']} x {meta['img_size']}, sentences of 17 tokens. "
        "Times: median (min-max) over interleaved rounds, warm-up excluded.",
        "",
        f"## Predictor: {meta['images']} images of 320 x 240, one sentence each, batch size {meta['batch_size']}",
        "",
        "| variant | seconds for all images | images / s |",
        "|---|---|---|",
    ]
    for name, r in predictor.items():
        lines.append(f"| {name} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['items_per_s']:.1f} |")
    if onnx:
        lines += ["", "## onnxruntime vs PyTorch eager (model forward only)", "",
                  "| variant | ms per call | samples / s |", "|---|---|---|"]
        for name, r in onnx.items():
            if "median_s" in r:
                lines.append(
                    f"| {name} | {1e3 * r['median_s']:.2f} ({1e3 * r['min_s']:.2f}-{1e3 * r['max_s']:.2f}) "
                    f"| {r['items_per_s']:.1f} |"
                )
        for name, r in onnx.items():
            if "value" in r:
                lines.append(f"\n{name}: {r['value']:.2e}")
        for name, r in onnx.items():
            if "pytorch_over_onnxruntime" in r:
                lines.append(f"\n{name}: PyTorch time / onnxruntime time = **{r['pytorch_over_onnxruntime']:.2f}**")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--onnx", action="store_true", help="also time onnxruntime vs PyTorch eager")
    parser.add_argument("--onnx-file", default=None, metavar="PATH",
                        help="time this exported file (of the same seed-0 tiny model) instead of exporting")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=args.img_size).eval()
    meta = {
        "command": "python benchmarks/bench_predict.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible",
        "torch": torch.__version__,
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "threads": args.threads,
        "img_size": args.img_size,
        "images": args.images,
        "batch_size": args.batch_size,
    }
    predictor = bench_predictor(model, args.images, args.batch_size, args.rounds)
    onnx = bench_onnx(model, args.batch_size, args.rounds, args.threads, args.onnx_file) if args.onnx else {}
    text = _markdown(meta, predictor, onnx)
    print(text)
    if not args.no_write:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"predict_cpu_{args.img_size}px_{args.threads}threads"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "predictor": predictor, "onnx": onnx}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
