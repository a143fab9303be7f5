"""Validation IoU of checkpoints by the position or size word their sentences use.

Axis legend: H W original image size.

A model's mIoU hides *which* sentences it fails. This script scores every validation sentence
as the evaluation does (logits upsampled to the input, resized to the original image, threshold
0.5; :func:`vlaligner.metrics.iou_from_counts`) and groups the sentences by the first position
or size word they contain ("left", "top", "big", ...; "none" for sentences without one, e.g.
"the red circle"), one column pair (mIoU, Pr@0.5) per checkpoint::

    python benchmarks/iou_by_phrase.py runs/tiny-0/best runs/tiny-2/best
    python benchmarks/iou_by_phrase.py runs/x/best --data-root data --dataset refcoco --split testA

Pr@0.5 per group is the share of sentences whose mask overlaps the truth with IoU >= 0.5 (the
right object found); mIoU mixes that with how well the mask follows the object. A group far
below the others (docs/training.md: a seed whose "top" / "bottom" sentences score 32 %
against 68-70 % for the rest) names what the model has not learned.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Position words, then size words, in the order a sentence's group is looked up (the
#: synthetic set's modifiers and the common RefCOCO ones).
POSITION_WORDS = ("left", "right", "top", "bottom", "middle", "center", "front", "back", "behind",
                  "upper", "lower", "near", "far", "closest")
SIZE_WORDS = ("big", "bigger", "biggest", "large", "larger", "largest", "small", "smaller", "smallest",
              "tall", "short")
NO_WORD = "none"


def phrase_group(sentence: str) -> str:
    """The first position word of ``sentence``, else its first size word, else ``"none"``.

    Words are matched whole and case-insensitively ("leftmost" is not "left").
    """
    if not isinstance(sentence, str):
        raise TypeError(f"sentence must be a str, got {type(sentence).__name__}")
    words = re.findall(r"[a-z]+", sentence.lower())
    for vocabulary in (POSITION_WORDS, SIZE_WORDS):
        found = [w for w in words if w in vocabulary]
        if found:
            return found[0]
    return NO_WORD


def group_scores(sentences: Sequence[str], ious: Sequence[float]) -> Dict[str, Tuple[int, float, float]]:
    """``{group: (sentences, mIoU %, Pr@0.5 %)}`` over the groups of :func:`phrase_group`, plus
    ``"all"``; groups sorted by name, ``"all"`` last."""
    if len(sentences) != len(ious):
        raise ValueError(f"one IoU per sentence: got {len(sentences)} sentences and {len(ious)} IoUs")
    by_group: Dict[str, List[float]] = defaultdict(list)
    for sentence, iou in zip(sentences, ious):
        if not 0.0 <= float(iou) <= 1.0:
            raise ValueError(f"an IoU must be in [0, 1], got {iou} for {sentence!r}")
        by_group[phrase_group(sentence)].append(float(iou))
        by_group["all"].append(float(iou))

    def score(values: List[float]) -> Tuple[int, float, float]:
        return len(values), 100 * sum(values) / len(values), 100 * sum(v >= 0.5 for v in values) / len(values)

    names = sorted(k for k in by_group if k != "all")
    return {**{k: score(by_group[k]) for k in names}, **({"all": score(by_group["all"])} if by_group else {})}


@torch.no_grad()
def sentence_ious(checkpoint: Path, root: Path, dataset: str, split_by: str, split: str,
                  batch_size: int = 32) -> Tuple[List[str], List[float]]:
    """Every sentence of ``split`` and the IoU of the checkpoint's mask, at the original size."""
    from vlaligner.data import RefDataset, collate_ref_batch
    from vlaligner.metrics import intersection_union, iou_from_counts
    from vlaligner.models import EAVL
    from vlaligner.training.evaluation import predict_masks

    model = EAVL.from_pretrained(checkpoint).eval()
    data = RefDataset(root, dataset, split_by, split, tokenizer=model.tokenize, img_size=model.img_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_ref_batch)
    sentences: List[str] = []
    ious: List[float] = []
    for batch in loader:
        for pred, truth, sentence in zip(predict_masks(model, batch, device="cpu"), batch["orig_mask"],
                                         batch["sentence"]):
            truth = torch.as_tensor(truth).bool()
            ious.append(float(iou_from_counts(*intersection_union(pred[None], truth[None]))[0]))
            sentences.append(sentence)
    return sentences, ious


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+", help="EAVL checkpoint folders (e.g. runs/x/best)")
    p.add_argument("--data-root", type=Path, default=None, help="refer layout (default: the synthetic set)")
    p.add_argument("--dataset", default="refcoco")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--split", default="val")
    p.add_argument("--synthetic-images", type=int, default=800)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    for checkpoint in args.checkpoints:
        if not (checkpoint / "config.json").is_file():
            p.error(f"{checkpoint} is not an EAVL checkpoint folder (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from vlaligner.data.cache import default_cache_dir, ensure_synthetic_set

    root = args.data_root
    if root is None:
        root = ensure_synthetic_set(default_cache_dir(), num_images=args.synthetic_images, log=print)
    tables = []
    for checkpoint in args.checkpoints:
        sentences, ious = sentence_ious(checkpoint, root, args.dataset, args.split_by, args.split)
        tables.append(group_scores(sentences, ious))
    groups = [g for g in tables[0] if g != "all"] + ["all"]
    print(f"{args.dataset} {args.split}: IoU by the position / size word of the sentence (percent)")
    print("| word | sentences | " + " | ".join(f"{c} mIoU | {c} Pr@0.5" for c in args.checkpoints) + " |")
    print("|---|---|" + "---|---|" * len(args.checkpoints))
    for group in groups:
        cells = [f"{t[group][1]:.1f} | {t[group][2]:.1f}" for t in tables]
        print(f"| {group} | {tables[0][group][0]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
