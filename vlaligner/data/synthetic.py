"""A synthetic referring-segmentation set written in the exact RefCOCO (``refer``) layout.

Axis legend: H W space of a generated image, c colour channels (3).

Each image is a clean scene (plain background with a mild gradient and noise) holding 2-5
non-overlapping coloured shapes. Each ref is one object; each of its sentences names exactly
that object by colour / shape, relative position ("left", "right", "top", "bottom",
"middle") or relative size ("big", "small") among the objects that share its colour or
shape. Distractors are drawn to share a shape or a colour with another object, so the
sentence, not the picture alone, decides which object is meant. The "cross" shape is two
overlapping rectangles stored as two polygons, so the loader's summing of polygon parts is
exercised. The pixels of every object are painted from its pycocotools-decoded mask, so
annotation and image agree exactly.

Written files (root = ``out_dir``; load with ``RefDataset(out_dir, "refcoco", "unc", split)``)::

    out_dir/refcoco/refs(unc).p        pickled list of refs, splits train / val / testA / testB
    out_dir/refcoco/instances.json     COCO instances (images, annotations with polygons, categories)
    out_dir/images/mscoco/images/train2014/COCO_train2014_%012d.jpg

Command line: ``python -m vlaligner.data.synthetic OUT --images N --seed S``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

__all__ = ["generate_synthetic_refcoco", "SHAPES", "COLOURS", "main"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Saturated, well separated hues so that a small model can tell them apart after JPEG.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
SPLIT_FRACTIONS = {"val": 0.1, "testA": 0.1, "testB": 0.1}  # the rest is train
# Object side as a fraction of the image's shorter side, by number of objects (upper bound).
_MAX_SIDE = {2: 0.40, 3: 0.36, 4: 0.32, 5: 0.28}
_MIN_SIDE = 0.15
_SIZE_RATIO = 1.8  # area ratio for "big" / "small" to be unambiguous
_POS_MARGIN = 0.15  # centre distance (fraction of the image side) for "left" / "top" / ...
_VARIED_SIDES = (192, 224, 256)


@dataclass
class _Obj:
    shape: str
    colour: str
    cx: float
    cy: float
    side: float
    angle: float
    parts: Optional[list] = None  # list of flat polygons
    mask: Optional[np.ndarray] = None
    area: float = 0.0


def _polygon_parts(shape: str, cx: float, cy: float, side: float, angle: float) -> list[list[float]]:
    """Flat COCO polygons ``[x0, y0, x1, y1, ...]`` of one shape (two parts for "cross")."""
    r = side / 2.0

    def rot(points: Sequence[tuple[float, float]]) -> list[float]:
        c, s = math.cos(angle), math.sin(angle)
        flat: list[float] = []
        for x, y in points:
            flat += [round(cx + c * x - s * y, 2), round(cy + s * x + c * y, 2)]
        return flat

    if shape == "circle":
        return [rot([(r * math.cos(2 * math.pi * k / 40), r * math.sin(2 * math.pi * k / 40)) for k in range(40)])]
    if shape == "square":
        a = 0.85 * r
        return [rot([(-a, -a), (a, -a), (a, a), (-a, a)])]
    if shape == "triangle":
        # Upright triangle filling the bounding square's width, centred on its box.
        return [rot([(0.0, -r), (r, 0.8 * r), (-r, 0.8 * r)])]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            t = -math.pi / 2 + math.pi * k / 5
            pts.append((rad * math.cos(t), rad * math.sin(t) + 0.1 * r))
        return [rot(pts)]
    if shape == "cross":
        w = r / 3.0
        # Two overlapping bars: one object, two polygons (the loader must take their union).
        return [rot([(-r, -w), (r, -w), (r, w), (-r, w)]), rot([(-w, -r), (w, -r), (w, r), (-w, r)])]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _choose_size(rng: np.random.Generator, image_size: Union[None, int, tuple[int, int]]) -> tuple[int, int]:
    if image_size is None:
        side = int(rng.choice(_VARIED_SIDES))
        if rng.random() < 0.5:
            return side, side
        other = max(160, int(round(side * rng.uniform(0.7, 0.95) / 8.0)) * 8)
        return (side, other) if rng.random() < 0.5 else (other, side)
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def _scene_attributes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """Shapes and colours where most objects share a shape or a colour with another."""
    attrs = [(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))]
    for _ in range(n - 1):
        base_shape, base_colour = attrs[int(rng.integers(len(attrs)))]
        u = rng.random()
        if u < 0.4:  # same shape, other colour
            colour = str(rng.choice([c for c in COLOURS if c != base_colour]))
            attrs.append((base_shape, colour))
        elif u < 0.8:  # same colour, other shape
            shape = str(rng.choice([s for s in SHAPES if s != base_shape]))
            attrs.append((shape, base_colour))
        elif u < 0.9:  # a twin: only size or position can tell them apart
            attrs.append((base_shape, base_colour))
        else:
            attrs.append((str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))))
    return attrs


def _place(rng: np.random.Generator, attrs: list[tuple[str, str]], h: int, w: int) -> Optional[list[_Obj]]:
    """Non-overlapping placement by rejection; None when the scene does not fit."""
    short = min(h, w)
    hi = _MAX_SIDE[len(attrs)]
    gap = 0.04 * short
    objs: list[_Obj] = []
    for shape, colour in attrs:
        side = rng.uniform(_MIN_SIDE, hi) * short
        for _ in range(60):
            cx = rng.uniform(side / 2 + 2, w - side / 2 - 2)
            cy = rng.uniform(side / 2 + 2, h - side / 2 - 2)
            if all(
                abs(cx - o.cx) > (side + o.side) / 2 + gap or abs(cy - o.cy) > (side + o.side) / 2 + gap
                for o in objs
            ):
                break
        else:
            return None
        angle = rng.uniform(-0.17, 0.17) if shape in ("square", "triangle", "star") else 0.0
        objs.append(_Obj(shape, colour, cx, cy, side, angle))
    return objs


def _modifier_holds(mod: str, t: _Obj, group: list[_Obj], h: int, w: int) -> bool:
    others = [o for o in group if o is not t]
    mx, my = _POS_MARGIN * w, _POS_MARGIN * h
    if mod == "left":
        return all(t.cx + mx <= o.cx for o in others)
    if mod == "right":
        return all(t.cx - mx >= o.cx for o in others)
    if mod == "top":
        return all(t.cy + my <= o.cy for o in others)
    if mod == "bottom":
        return all(t.cy - my >= o.cy for o in others)
    if mod == "middle":
        if len(group) != 3:
            return False
        xs = sorted(group, key=lambda o: o.cx)
        return xs[1] is t and xs[1].cx - xs[0].cx >= mx and xs[2].cx - xs[1].cx >= mx
    if mod == "big":
        return all(t.area >= _SIZE_RATIO * o.area for o in others)
    if mod == "small":
        return all(t.area * _SIZE_RATIO <= o.area for o in others)
    raise AssertionError(mod)


_MODIFIERS = ("left", "right", "top", "bottom", "middle", "big", "small")


def _descriptions(objs: list[_Obj], t: _Obj, h: int, w: int) -> list[tuple[Optional[str], Optional[str], Optional[str]]]:
    """Every (colour, shape, modifier) description that singles out ``t`` in the scene."""
    out = []
    for use_colour in (True, False):
        for use_shape in (True, False):
            group = [
                o
                for o in objs
                if (not use_colour or o.colour == t.colour) and (not use_shape or o.shape == t.shape)
            ]
            colour = t.colour if use_colour else None
            shape = t.shape if use_shape else None
            if len(group) == 1 and (use_colour or use_shape):
                out.append((colour, shape, None))
            if len(group) >= 2:
                for mod in _MODIFIERS:
                    if _modifier_holds(mod, t, group, h, w):
                        out.append((colour, shape, mod))
    return out


def _phrase(rng: np.random.Generator, colour: Optional[str], shape: Optional[str], mod: Optional[str]) -> str:
    """Surface text of a description, with a little variation in word order."""
    det = "the " if rng.random() < 0.6 else ""
    if shape is None:
        noun = str(rng.choice(["shape", "object", "one"])) if colour else str(rng.choice(["shape", "object"]))
    else:
        noun = shape
    np_ = f"{colour} {noun}" if colour else noun
    if mod is None:
        return f"{det}{np_}"
    if mod in ("big", "small"):
        return f"{det}{mod} {np_}"
    if rng.random() < 0.5:
        return f"{det}{mod} {np_}"
    prep = {"left": "on the", "right": "on the", "top": "at the", "bottom": "at the", "middle": "in the"}[mod]
    return f"{det}{np_} {prep} {mod}"


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    grey = rng.uniform(70, 190)
    base = grey + rng.uniform(-12, 12, size=3)
    gx, gy = rng.uniform(-18, 18, size=2)
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :, None]
    img = base[None, None, :].astype(np.float32) + gx * xs + gy * ys
    return img + rng.normal(0.0, 3.0, size=(h, w, 3)).astype(np.float32)


def _split_names(rng: np.random.Generator, n: int) -> list[str]:
    counts = {k: max(1, int(round(f * n))) for k, f in SPLIT_FRACTIONS.items()}
    n_train = n - sum(counts.values())
    names = ["train"] * n_train + [k for k, c in counts.items() for _ in range(c)]
    order = rng.permutation(n)
    return [names[int(i)] for i in order]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate_synthetic_refcoco(
    out_dir: Union[str, os.PathLike],
    *,
    num_images: int = 200,
    seed: int = 0,
    image_size: Union[None, int, tuple[int, int]] = None,
    min_objects: int = 2,
    max_objects: int = 5,
    max_refs_per_image: int = 3,
    jpeg_quality: int = 92,
    progress: bool = False,
) -> Path:
    """Write a synthetic referring set in the RefCOCO layout and return ``out_dir``.

    Deterministic for a seed (same images, polygons, sentences and file bytes). Files that
    already exist at the written paths are overwritten.

    Args:
        out_dir: output root; pass it to ``RefDataset(out_dir, "refcoco", "unc", split)``.
        num_images: number of images (>= 4, so that train / val / testA / testB are all
            non-empty; splits are by image, 70 / 10 / 10 / 10 %).
        seed: random seed.
        image_size: None for varied sizes (sides 160-256, about half non-square), an int
            for square images, or ``(H, W)``.
        min_objects, max_objects: objects per image (2..5).
        max_refs_per_image: objects per image that get sentences (RefCOCO has ~2.8).
        jpeg_quality: JPEG quality of the images.
        progress: print progress to stderr.

    Returns:
        ``Path(out_dir)``.
    """
    from pycocotools import mask as mask_utils  # the [data] extra; imported where used

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 4:
        raise ValueError(f"num_images must be an int >= 4 (one image per split at least), got {num_images!r}")
    if not (2 <= min_objects <= max_objects <= 5):
        raise ValueError(
            f"need 2 <= min_objects <= max_objects <= 5, got min_objects={min_objects}, max_objects={max_objects}"
        )
    if max_refs_per_image < 1:
        raise ValueError(f"max_refs_per_image must be >= 1, got {max_refs_per_image}")
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any((not isinstance(s, int)) or s < 64 for s in hw):
            raise ValueError(f"image_size must be None, an int >= 64 or (H, W) ints >= 64, got {image_size!r}")

    out = Path(out_dir)
    data_dir = out / "refcoco"
    image_dir = out / "images" / "mscoco" / "images" / "train2014"
    data_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    splits = _split_names(rng, num_images)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations, refs = [], [], []
    ann_id, ref_id, sent_id = 1, 0, 0
    start = time.monotonic()
    step = max(1, num_images // 20)

    for index in range(num_images):
        image_id = index + 1
        h, w = _choose_size(rng, image_size)
        attempts = 0
        while True:
            attempts += 1
            # Crowded scenes that keep failing to fit fall back to the fewest objects.
            n = int(rng.integers(min_objects, max_objects + 1)) if attempts < 20 else min_objects
            objs = _place(rng, _scene_attributes(rng, n), h, w)
            if objs is None:
                continue
            for o in objs:
                o.parts = _polygon_parts(o.shape, o.cx, o.cy, o.side, o.angle)
                rle = mask_utils.merge(mask_utils.frPyObjects(o.parts, h, w))
                o.mask = mask_utils.decode(rle).astype(bool)
                o.area = float(o.mask.sum())
            options = [_descriptions(objs, o, h, w) for o in objs]
            if any(options):
                break

        canvas = _background(rng, h, w)
        for o in objs:
            fill = np.asarray(COLOURS[o.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
            canvas[o.mask] = fill + rng.normal(0.0, 3.0, size=(int(o.mask.sum()), 3))
        pixels = np.clip(canvas, 0, 255).round().astype(np.uint8)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, format="JPEG", quality=jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})

        obj_ann_ids = []
        for o in objs:
            ys, xs = np.nonzero(o.mask)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_id[o.shape],
                    "segmentation": o.parts,
                    "area": o.area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
            obj_ann_ids.append(ann_id)
            ann_id += 1

        candidates = [i for i in rng.permutation(len(objs)).tolist() if options[i]]
        for i in candidates[:max_refs_per_image]:
            opts = options[i]
            k = min(len(opts), int(rng.integers(2, 4)))
            chosen = rng.choice(len(opts), size=k, replace=False)
            texts: list[str] = []
            for j in chosen.tolist():
                text = _phrase(rng, *opts[j])
                if text not in texts:
                    texts.append(text)
            sentences = []
            for text in texts:
                sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append(
                {
                    "image_id": image_id,
                    "split": splits[index],
                    "sentences": sentences,
                    "file_name": f"COCO_train2014_{image_id:012d}_{obj_ann_ids[i]}.jpg",
                    "category_id": cat_id[objs[i].shape],
                    "ann_id": obj_ann_ids[i],
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "ref_id": ref_id,
                }
            )
            ref_id += 1
        if progress and ((index + 1) % step == 0 or index + 1 == num_images):
            elapsed = time.monotonic() - start
            print(f"\rsynthetic RefCOCO: {index + 1}/{num_images} images ({elapsed:.1f} s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)

    instances = {
        "info": {"description": f"vlaligner synthetic RefCOCO (seed {seed})", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    _write_atomic(data_dir / "instances.json", json.dumps(instances, separators=(",", ":")).encode("utf-8"))
    # Protocol 2 is what the official (Python 2) files use; any refer reader can load it.
    _write_atomic(data_dir / "refs(unc).p", pickle.dumps(refs, protocol=2))
    return out


def _summary(out: Path) -> str:
    from .refer import load_refs

    refs = load_refs(out / "refcoco" / "refs(unc).p")
    per_split: dict[str, list[int]] = {}
    for r in refs:
        c = per_split.setdefault(r["split"], [0, 0])
        c[0] += 1
        c[1] += len(r["sentences"])
    parts = ", ".join(f"{k}: {v[0]} refs / {v[1]} sentences" for k, v in per_split.items())
    return f"wrote {out} ({parts}); load it with RefDataset({str(out)!r}, 'refcoco', 'unc', 'train')"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point: ``python -m vlaligner.data.synthetic OUT --images N --seed S``."""
    parser = argparse.ArgumentParser(
        prog="python -m vlaligner.data.synthetic",
        description="Write a synthetic referring segmentation set in the RefCOCO (refer) layout.",
    )
    parser.add_argument("out", type=Path, help="output root (pass it to RefDataset as root)")
    parser.add_argument("--images", type=int, default=200, help="number of images (>= 4; default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="one int (square) or H W; default: varied sizes 160-256 px",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    size: Union[None, int, tuple[int, int]] = None
    if args.image_size is not None:
        if len(args.image_size) == 1:
            size = args.image_size[0]
        elif len(args.image_size) == 2:
            size = (args.image_size[0], args.image_size[1])
        else:
            parser.error(f"--image-size takes one or two ints, got {args.image_size}")
    try:
        out = generate_synthetic_refcoco(
            args.out, num_images=args.images, seed=args.seed, image_size=size, progress=not args.quiet
        )
    except ValueError as err:
        parser.error(str(err))
    print(_summary(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
