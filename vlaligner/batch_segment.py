"""``vlaligner segment --image-dir DIR --texts FILE.jsonl --out-dir OUT``: masks for many images.

Axes: H W the original image (masks are written at each image's own size).

Each line of the texts file is a JSON object ``{"image": name, "text": sentence}`` with
``name`` relative to the image folder (the same image may appear on many lines). Line ``i``
(counted from 1) writes ``OUT/<i:05d>_<image stem>.png``, the binary mask (white = object),
and with ``--overlays`` ``OUT/<i:05d>_<image stem>_overlay.png``; ``OUT/predictions.jsonl``
lists every line with its mask file and the mask's share of the image. Every input is checked
before the model loads, and no existing file is ever overwritten (the command stops first,
naming the file).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

__all__ = ["TextLine", "read_texts", "output_paths", "segment_many"]

#: The summary file written into the output folder.
SUMMARY_NAME = "predictions.jsonl"


@dataclass
class TextLine:
    """One line of the texts file: its number (from 1), the image path and the sentence."""

    line: int
    image: Path
    name: str
    text: str


def _usage(message: str) -> Exception:
    from vlaligner.cli import UsageError

    return UsageError(message)


def read_texts(path: Path, image_dir: Path) -> List[TextLine]:
    """Parse and check the texts file; every image must exist under ``image_dir``.

    Raises:
        UsageError: an unreadable file, a line that is not ``{"image": str, "text": str}``,
            an empty sentence, or a missing image; the message names the line.
    """
    if not path.is_file():
        raise _usage(f"--texts {str(path)!r} is not a file (expected JSON lines "
                     f"{{\"image\": name, \"text\": sentence}})")
    if not image_dir.is_dir():
        raise _usage(f"--image-dir {str(image_dir)!r} is not a directory")
    lines: List[TextLine] = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"--texts {path.name} line {number}"
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as err:
                raise _usage(f"{where} is not valid JSON ({err.msg}): {raw.strip()[:80]!r}") from None
            if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(
                item.get("text"), str
            ):
                raise _usage(
                    f"{where} must be an object {{\"image\": name, \"text\": sentence}} with string "
                    f"values, got {raw.strip()[:80]!r}"
                )
            if not item["text"].strip():
                raise _usage(f"{where} has an empty \"text\"; give the words that describe the object")
            image = image_dir / item["image"]
            if not image.is_file():
                raise _usage(f"{where}: image {item['image']!r} not found in {str(image_dir)!r}")
            lines.append(TextLine(line=number, image=image, name=item["image"], text=item["text"]))
    if not lines:
        raise _usage(f"--texts {str(path)!r} holds no lines")
    return lines


def output_paths(lines: Sequence[TextLine], out_dir: Path, overlays: bool) -> Dict[int, List[Path]]:
    """``{line: [mask path(, overlay path)]}`` for each line of the texts file."""
    paths: Dict[int, List[Path]] = {}
    for item in lines:
        stem = Path(item.name).stem
        files = [out_dir / f"{item.line:05d}_{stem}.png"]
        if overlays:
            files.append(out_dir / f"{item.line:05d}_{stem}_overlay.png")
        paths[item.line] = files
    return paths


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # the train extra is not installed: no bar, same results
        return None
    return tqdm(total=total, unit="mask", desc="segment")


def segment_many(args: argparse.Namespace) -> int:
    """Run the batch mode of ``vlaligner segment`` (see the module docstring)."""
    from PIL import Image

    from vlaligner.predictor import Predictor, resolve_checkpoint_dir, resolve_device, resolve_dtype

    image_dir, out_dir = Path(args.image_dir), Path(args.out_dir)
    texts = Path(args.texts)
    lines = read_texts(texts, image_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise _usage(f"--out-dir {str(out_dir)!r} is a file; give a directory")
    paths = output_paths(lines, out_dir, args.overlays)
    targets = [p for files in paths.values() for p in files] + [out_dir / SUMMARY_NAME]
    inputs = {texts.resolve()} | {item.image.resolve() for item in lines}
    clash = [p for p in targets if p.exists() or p.resolve() in inputs]
    if clash:
        raise _usage(
            f"{str(clash[0])!r} exists ({len(clash)} of the output files do); vlaligner never "
            f"overwrites files: choose another --out-dir or move them away"
        )
    try:
        device = resolve_device(args.device)
        resolve_dtype(args.dtype, device)
        checkpoint = resolve_checkpoint_dir(args.checkpoint)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise _usage(str(err)) from None
    try:
        predictor = Predictor.from_pretrained(
            checkpoint, device=device, dtype=args.dtype, threshold=args.threshold,
            compile=args.compile, batch_size=args.batch_size,
        )
    except (ValueError, KeyError, OSError) as err:
        raise _usage(f"cannot load the checkpoint {args.checkpoint!r}: {err}") from None

    # Group the lines by image (first appearance order) so each image is read and encoded once.
    by_image: Dict[Path, List[TextLine]] = {}
    for item in lines:
        by_image.setdefault(item.image, []).append(item)
    groups = list(by_image.items())
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(lines))
    summary = []
    try:
        for start in range(0, len(groups), args.batch_size):
            chunk = groups[start : start + args.batch_size]
            try:
                results = predictor.predict_batch(
                    [str(image) for image, _ in chunk], [[i.text for i in items] for _, items in chunk]
                )
            except (FileNotFoundError, ValueError, TypeError) as err:
                raise _usage(str(err)) from None
            for (image, items), preds in zip(chunk, results):
                rgb = None
                for item, pred in zip(items, preds):
                    mask_path = paths[item.line][0]
                    Image.fromarray(pred.mask.astype("uint8") * 255).save(mask_path)
                    if args.overlays:
                        from vlaligner.predictor import as_rgb_array
                        from vlaligner.viz import save_overlay

                        rgb = as_rgb_array(str(image)) if rgb is None else rgb
                        save_overlay(paths[item.line][1], rgb, pred.mask)
                    summary.append({
                        "line": item.line, "image": item.name, "text": item.text,
                        "mask": mask_path.name, "coverage": round(float(pred.mask.mean()), 6),
                    })
                if bar is not None:
                    bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
        if summary:
            with open(out_dir / SUMMARY_NAME, "x", encoding="utf-8") as handle:
                for row in summary:
                    handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(summary)} masks for {len(groups)} images to {out_dir} (and {SUMMARY_NAME})")
    return 0
