"""What taking the loss at the input size costs: one training step, both ways, side by side.

Axis legend: b batch, S input side.

Times forward + loss + backward + AdamW of the tiny model at the demo size (``DEMO_MODEL_KWARGS``,
128 x 128, batch 16, BCE + Dice as the ``demo`` recipe) with ``upsample_logits=False`` (the
target resized nearest to the stride-4 logits, CRIS's) and ``True`` (the logits upsampled
bilinearly to the input size), interleaved in one process, one thread, in CPU seconds::

    python benchmarks/bench_loss.py                 # 3 rounds of 5 steps each way
    python benchmarks/bench_loss.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def step_seconds(*, rounds: int, steps: int, img_size: int, batch_size: int, seed: int = 0) -> Dict[bool, List[float]]:
    """CPU seconds per training step ``{upsample_logits: [per round]}``, the two interleaved."""
    from vlaligner.losses import mask_bce_loss, soft_dice_loss
    from vlaligner.models import build_eavl_tiny
    from vlaligner.training.options import DEMO_MODEL_KWARGS

    torch.manual_seed(seed)
    model = build_eavl_tiny(img_size=img_size, **DEMO_MODEL_KWARGS).train()
    images = torch.randn(batch_size, 3, img_size, img_size)
    ids, mask = model.tokenize(["the red circle on the left"] * batch_size)
    target = torch.rand(batch_size, img_size, img_size) > 0.9
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(upsample: bool) -> None:
        logits = model(images, ids, mask).logits
        loss = mask_bce_loss(logits, target, upsample_logits=upsample) + soft_dice_loss(
            logits, target, upsample_logits=upsample
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for upsample in (False, True):  # warm-up
        step(upsample)
    out: Dict[bool, List[float]] = {False: [], True: []}
    for _ in range(rounds):
        for upsample in (False, True):
            start = time.process_time()
            for _ in range(steps):
                step(upsample)
            out[upsample].append((time.process_time() - start) / steps)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="training steps per round and way")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error(f"--rounds and --steps must be >= 1, got {args.rounds}, {args.steps}")
    torch.set_num_threads(1)
    times = step_seconds(rounds=args.rounds, steps=args.steps, img_size=args.img_size, batch_size=args.batch_size)
    print(f"tiny at the demo size, {args.img_size} px, batch {args.batch_size}, one thread, CPU s per step "
          f"(median of {args.rounds} rounds of {args.steps})")
    print("| loss taken | median | min |")
    print("|---|---|---|")
    for upsample, label in ((False, "on the logits' grid (nearest target)"), (True, "at the input size")):
        print(f"| {label} | {statistics.median(times[upsample]):.3f} | {min(times[upsample]):.3f} |")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"ratio (input size / logits' grid): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
