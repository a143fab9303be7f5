"""Train VLT, or VLT + aligner, on a RefCOCO-layout folder (a synthetic one by default).

Axis legend: b batch, l words, h w space, n queries.

Usage::

    # a few CPU steps of the tiny VLT + aligner on a freshly generated synthetic set
    python adapters/vlt/train_vlt.py --synthetic 12 --data-root /tmp/synth --steps 5
    # the same with VLT's own fixed final kernel, for comparison
    python adapters/vlt/train_vlt.py --synthetic 12 --data-root /tmp/synth --steps 5 --head fixed
    # Swin-B + BERT-base on real RefCOCO (see docs/data.md for the folder layout)
    python adapters/vlt/train_vlt.py --model swin-b --data-root ~/refer_data --img-size 480 \\
        --bert ~/models/bert-base-uncased --batch-size 8 --lr 1e-4 --steps 100000 --device cuda

The loop is VLT's: Adam and binary cross-entropy on the logits against the mask resized
(nearest) to them. It prints one JSON line per step (``step``, ``loss``) and, with
``--json PATH``, writes the losses there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
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

__all__ = ["build_model", "make_loader", "train_steps", "main"]

Tokenizer = Callable[[List[str], int], Tuple[torch.Tensor, torch.Tensor]]


def train_steps(
    model: nn.Module,
    batches: Iterable[Dict[str, Any]],
    *,
    steps: int,
    lr: float = 1e-3,
    device: str = "cpu",
    log: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> List[float]:
    """Run ``steps`` Adam steps of VLT's BCE loss, cycling over ``batches``.

    Args:
        model: VLT or its retrofit: ``forward(images, input_ids, attention_mask) -> (b 1 h w)``.
        batches: dicts with ``image (b 3 H W)``, ``input_ids (b l)``, ``attention_mask (b l)``,
            ``mask (b H W)`` (e.g. a loader over :class:`vlaligner.data.RefDataset`).
        steps: number of optimiser steps (>= 1).
        lr: Adam learning rate (VLT: 1e-3).
        device: where to train.
        log: called with ``{"step", "loss"}`` after each step.

    Returns:
        The loss of each step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: List[float] = []
    for step, batch in enumerate(itertools.islice(_epochs(batches), steps)):
        logits = model(
            batch["image"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )
        loss = vlt_loss(logits, batch["mask"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log({"step": step, "loss": losses[-1]})
    return losses


def _epochs(batches: Iterable[Dict[str, Any]]) -> Iterable[Dict[str, Any]]:
    """Iterate ``batches`` again and again (a fresh pass each time, unlike ``itertools.cycle``,
    which would keep a whole epoch of batches in memory)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches is empty: the data set has fewer samples than one batch")


def make_tokenizer(bert: Optional[str]) -> Tuple[Tokenizer, int]:
    """A ``(sentences, max_length) -> (input_ids, attention_mask)`` tokenizer and its vocabulary size.

    ``bert`` names a local BERT folder with its tokenizer; None uses vlaligner's embedded
    WordPiece vocabulary (no download).
    """
    from vlaligner.models.tokenizer import load_tiny_tokenizer, load_tokenizer, tokenize

    tokenizer = load_tiny_tokenizer() if bert is None else load_tokenizer(bert)
    return (lambda sentences, max_length: tokenize(tokenizer, sentences, max_length)), len(tokenizer)


def make_loader(
    root: Path, *, split: str, img_size: int, max_length: int, batch_size: int,
    tokenizer: Tokenizer, shuffle: bool = True, seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A loader over ``RefDataset(root, "refcoco", "unc", split)`` with ``collate_ref_batch``."""
    from vlaligner.data import RefDataset, collate_ref_batch

    dataset = RefDataset(
        root, "refcoco", "unc", split, tokenizer=tokenizer, img_size=img_size, max_length=max_length,
        augment=False,
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_ref_batch, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def build_model(
    *, model: str, head: str, img_size: int, vocab_size: int, num_queries: int, kernel_size: int,
    use_estimator: bool, bert: Optional[str] = None, pretrained: bool = False,
) -> nn.Module:
    """The VLT host (``tiny`` or ``swin-b``), retrofitted unless ``head="fixed"``."""
    if model == "tiny":
        host: VLT = build_vlt_tiny(img_size=img_size, vocab_size=vocab_size)
    elif model == "swin-b":
        host = build_vlt_swin_b(img_size=img_size, bert=bert, pretrained=pretrained)
    else:
        raise ValueError(f"model must be 'tiny' or 'swin-b', got {model!r}")
    return retrofit_vlt(
        host, head=head, num_queries=num_queries, kernel_size=kernel_size, use_estimator=use_estimator
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train VLT or VLT + Vision-Language Aligner.")
    parser.add_argument("--data-root", type=Path, required=True, help="RefCOCO-layout folder")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="first write a synthetic set of N images (>= 4) into --data-root")
    parser.add_argument("--model", default="tiny", choices=("tiny", "swin-b"))
    parser.add_argument("--bert", default=None, help="local BERT folder (swin-b): weights + tokenizer")
    parser.add_argument("--pretrained", action="store_true", help="ImageNet Swin-B weights via timm")
    parser.add_argument("--head", default="aligner", choices=HEADS)
    parser.add_argument("--num-queries", type=int, default=24)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--no-estimator", action="store_true")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=17)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write {'losses': [...]} here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[float]:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    if args.synthetic:
        from vlaligner.data import generate_synthetic_refcoco

        generate_synthetic_refcoco(args.data_root, num_images=args.synthetic, seed=args.seed)
    tokenizer, vocab_size = make_tokenizer(args.bert)
    loader = make_loader(
        args.data_root, split="train", img_size=args.img_size, max_length=args.max_length,
        batch_size=args.batch_size, tokenizer=tokenizer, seed=args.seed,
    )
    model = build_model(
        model=args.model, head=args.head, img_size=args.img_size, vocab_size=vocab_size,
        num_queries=args.num_queries, kernel_size=args.kernel_size,
        use_estimator=not args.no_estimator, bert=args.bert, pretrained=args.pretrained,
    )
    losses = train_steps(
        model, loader, steps=args.steps, lr=args.lr, device=args.device,
        log=lambda record: print(json.dumps(record), flush=True),
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"losses": losses, "head": args.head}))
    return losses


if __name__ == "__main__":
    main()
