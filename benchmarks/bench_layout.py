"""What the channels-last layout buys a training step on CPU: both layouts, side by side.

Axis legend: b batch, S input side.

Times forward + BCE + Dice (at the input size) + backward + AdamW of a tiny EAVL with its
weights and images in the default (NCHW) layout and channels-last (NHWC), interleaved in one
process, in CPU seconds and wall seconds per step. The trainer keeps models channels-last on
CPU by default (``--[no-]channels-last``)::

    python benchmarks/bench_layout.py                       # the default tiny model, 160 px, batch 16
    python benchmarks/bench_layout.py --threads 2 --model-kwargs '{"backbone": "resnet18", ...}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAYOUTS = ("plain", "channels-last")


def step_seconds(
    *, model_kwargs: Dict[str, Any], rounds: int, steps: int, img_size: int, batch_size: int, seed: int = 0
) -> Dict[str, List[Tuple[float, float]]]:
    """``{layout: [(CPU s, wall s) per step, one per round]}``, the layouts interleaved.

    Both layouts train copies of one initial model on the same batch.
    """
    from vlaligner.losses import mask_bce_loss, soft_dice_loss
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(seed)
    plain = build_eavl_tiny(img_size=img_size, **model_kwargs).train()
    ids, mask = plain.tokenize(["the red circle on the left"] * batch_size)
    images = torch.randn(batch_size, 3, img_size, img_size)
    target = torch.rand(batch_size, img_size, img_size) > 0.9
    nhwc = build_eavl_tiny(img_size=img_size, **model_kwargs).train()
    nhwc.load_state_dict(plain.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    runs = {
        "plain": (plain, images, torch.optim.AdamW(plain.parameters(), lr=1e-4)),
        "channels-last": (nhwc, images.contiguous(memory_format=torch.channels_last),
                          torch.optim.AdamW(nhwc.parameters(), lr=1e-4)),
    }

    def step(layout: str) -> None:
        model, x, optimizer = runs[layout]
        logits = model(x, ids, mask).logits
        loss = mask_bce_loss(logits, target, upsample_logits=True) + soft_dice_loss(
            logits, target, upsample_logits=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for layout in LAYOUTS:  # warm-up: oneDNN picks its kernels on the first calls
        step(layout)
    out: Dict[str, List[Tuple[float, float]]] = {layout: [] for layout in LAYOUTS}
    for _ in range(rounds):
        for layout in LAYOUTS:
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(steps):
                step(layout)
            out[layout].append(((time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="training steps per round and layout")
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="build_eavl_tiny keyword arguments (JSON)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        p.error(f"--rounds, --steps and --threads must be >= 1, got {args.rounds}, {args.steps}, {args.threads}")
    if not isinstance(args.model_kwargs, dict):
        p.error(f"--model-kwargs must be a JSON object, got {type(args.model_kwargs).__name__}")
    torch.set_num_threads(args.threads)
    times = step_seconds(model_kwargs=args.model_kwargs, rounds=args.rounds, steps=args.steps,
                         img_size=args.img_size, batch_size=args.batch_size)
    print(f"tiny EAVL {json.dumps(args.model_kwargs)}, {args.img_size} px, batch {args.batch_size}, "
          f"{args.threads} thread(s), seconds per training step (median of {args.rounds} rounds of {args.steps})")
    print("| layout | CPU s | wall s |")
    print("|---|---|---|")
    medians = {}
    for layout in LAYOUTS:
        cpu = statistics.median(t[0] for t in times[layout])
        wall = statistics.median(t[1] for t in times[layout])
        medians[layout] = (cpu, wall)
        print(f"| {layout} | {cpu:.3f} | {wall:.3f} |")
    print(f"ratio (channels-last / plain): CPU {medians['channels-last'][0] / medians['plain'][0]:.2f}, "
          f"wall {medians['channels-last'][1] / medians['plain'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
