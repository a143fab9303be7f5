"""Draw docs/images/generalized_predictions.png: a trained gRefCOCO model on validation sentences.

Usage (after the generalized demo run of docs/generalized.md)::

    python docs/make_generalized_figure.py --checkpoint runs/gres-demo/best

Picks, in the order of the validation split, the first sentences that name one object, several
objects and none, and draws each with ``vlaligner.viz.save_prediction_grid``: the predicted mask
lit (cyan outline), the ground truth (the union of the referred objects, dashed lime), and in the
title the number of referred objects and the model's no-target probability (above 0.5 the
prediction is empty: "nothing is referred to"). The data set is the
one the checkpoint was trained on (the generalized synthetic set by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PER_KIND = {"one object": 2, "several objects": 3, "no object": 3}


def pick_samples(dataset) -> list:
    """Indices of the first validation sentences of each kind (:data:`PER_KIND` of each)."""
    chosen: dict = {kind: [] for kind in PER_KIND}
    for index, (ref_id, _, _) in enumerate(dataset.samples):
        n = len(dataset._ref_anns[ref_id])
        kind = "no object" if n == 0 else "one object" if n == 1 else "several objects"
        if len(chosen[kind]) < PER_KIND[kind]:
            chosen[kind].append(index)
        if all(len(v) == PER_KIND[k] for k, v in chosen.items()):
            break
    return [i for kind in PER_KIND for i in chosen[kind]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint trained with --dataset grefcoco")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "generalized_predictions.png")
    p.add_argument("--split", default="val")
    p.add_argument("--data-root", type=Path, default=None,
                   help="a gRefCOCO-layout root (default: the data the checkpoint was trained on)")
    args = p.parse_args(argv)

    from vlaligner.data import RefDataset, load_image
    from vlaligner.data.cache import default_cache_dir, ensure_synthetic_set
    from vlaligner.predictor import Predictor
    from vlaligner.viz import save_prediction_grid

    predictor = Predictor.from_pretrained(args.checkpoint, device="cpu")
    if not predictor.has_no_target_head:
        p.error(f"{args.checkpoint} has no no-target head: train it with --dataset grefcoco")
    state = args.checkpoint / "training_state.json"
    trained = json.loads(state.read_text()).get("args", {}) if state.is_file() else {}
    if args.data_root is not None:
        root = args.data_root
    elif trained.get("data_root"):
        root = Path(trained["data_root"])
    else:
        root = ensure_synthetic_set(trained.get("cache_dir") or default_cache_dir(generalized=True),
                                    num_images=int(trained.get("synthetic_images", 800)), generalized=True)
    dataset = RefDataset(root, "grefcoco", "unc", args.split)
    images, preds, targets, titles, ious = [], [], [], [], []
    for index in pick_samples(dataset):
        sample = dataset[index]
        image = np.asarray(load_image(dataset.image_path(index)))
        pred = predictor.predict(image, sample["sentence"])
        target = sample["orig_mask"].numpy().astype(bool)
        n = sample["num_targets"]
        titles.append(f"{sample['sentence']} ({n} obj., p(none) {pred.no_target_probability:.2f})")
        union = np.logical_or(pred.mask, target).sum()
        ious.append(float(np.logical_and(pred.mask, target).sum() / union) if union else 1.0)
        images.append(image)
        preds.append(pred.mask)
        targets.append(target)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_prediction_grid(args.out, images, preds, targets, titles, ious=ious)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
