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

Generalized mode (:func:`generate_synthetic_grefcoco`, ``--generalized``): the same scenes
with sentences that refer to several objects ("all red shapes", "the two circles", "every
shape on the left") or to none ("the purple star"), written in the gRefCOCO layout
(``grefcoco/grefs(unc).json``, ``grefcoco/instances.json``, ``images/train2014/``).
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

__all__ = [
    "generate_synthetic_refcoco",
    "generate_synthetic_grefcoco",
    "GENERALIZED_FRACTIONS",
    "SHAPES",
    "COLOURS",
    "main",
]

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


def _write_scene(
    rng: np.random.Generator,
    objs: list[_Obj],
    h: int,
    w: int,
    *,
    image_id: int,
    first_ann_id: int,
    image_dir: Path,
    jpeg_quality: int,
    cat_id: dict,
    images: list,
    annotations: list,
    attributes: bool,
) -> list[int]:
    """Paint one scene from its objects' masks, write the JPEG, append the COCO image entry and
    one annotation per object (numbered from ``first_ann_id``); returns the annotation ids.

    ``attributes`` adds each object's colour, shape and centre to its annotation (the
    generalized set checks its sentences against them). The random draws are the same either
    way, so the classic set's bytes do not depend on this function's callers.
    """
    canvas = _background(rng, h, w)
    for o in objs:
        fill = np.asarray(COLOURS[o.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        canvas[o.mask] = fill + rng.normal(0.0, 3.0, size=(int(o.mask.sum()), 3))
    pixels = np.clip(canvas, 0, 255).round().astype(np.uint8)
    file_name = f"COCO_train2014_{image_id:012d}.jpg"
    Image.fromarray(pixels).save(image_dir / file_name, format="JPEG", quality=jpeg_quality)
    images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    ids = []
    for k, o in enumerate(objs):
        ys, xs = np.nonzero(o.mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        entry = {
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": cat_id[o.shape],
            "segmentation": o.parts,
            "area": o.area,
            "bbox": bbox,
            "iscrowd": 0,
        }
        if attributes:
            entry["attributes"] = {"colour": o.colour, "shape": o.shape, "centre": [round(o.cx, 2), round(o.cy, 2)]}
        annotations.append(entry)
        ids.append(first_ann_id + k)
    return ids


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

        obj_ann_ids = _write_scene(
            rng, objs, h, w, image_id=image_id, first_ann_id=ann_id, image_dir=image_dir,
            jpeg_quality=jpeg_quality, cat_id=cat_id, images=images, annotations=annotations,
            attributes=False,
        )
        ann_id += len(obj_ann_ids)

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


# ---------------------------------------------------------------------- generalized (gRefCOCO)
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
# A half-plane phrase ("every shape on the left") holds for the objects whose centre lies in
# that half of the image; it is used only when no centre is within this margin (a fraction
# of the image side) of the dividing line, so that membership is never borderline.
_REGION_MARGIN = 0.08
_REGIONS: dict[str, tuple[str, str]] = {
    "left": ("x", "<"), "right": ("x", ">"), "top": ("y", "<"), "bottom": ("y", ">"),
}
_REGION_PREP = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
#: Default share of refs per kind in the generalized set (gRefCOCO: about 10 % no-target).
GENERALIZED_FRACTIONS: dict[str, float] = {"no_target": 0.10, "multi": 0.35, "single": 0.55}


def _region_members(objs: list[_Obj], region: str, h: int, w: int) -> Optional[list[int]]:
    """Indices of the objects in a half of the image, or None when one is too near the line."""
    axis, side = _REGIONS[region]
    size = w if axis == "x" else h
    line, margin = size / 2.0, _REGION_MARGIN * size
    coords = [o.cx if axis == "x" else o.cy for o in objs]
    if any(abs(c - line) < margin for c in coords):
        return None
    return [i for i, c in enumerate(coords) if (c < line if side == "<" else c > line)]


def _plural_group_phrases(rng: np.random.Generator, colour: Optional[str], shape: Optional[str], n: int) -> list[str]:
    """Ways to name all ``n`` objects of a colour and / or shape (n >= 2, or 0 for none)."""
    noun_pl = _PLURALS[shape] if shape else str(rng.choice(["shapes", "objects"]))
    noun_sg = shape if shape else str(rng.choice(["shape", "object"]))
    adj = f"{colour} " if colour else ""
    out = [f"all {adj}{noun_pl}", f"every {adj}{noun_sg}", f"the {adj}{noun_pl}"]
    if n == 2:
        out.append(f"both {adj}{noun_pl}")
    if n in _COUNT_WORDS:
        out.append(f"the {_COUNT_WORDS[n]} {adj}{noun_pl}")
    return out


def _generalized_candidates(
    rng: np.random.Generator, objs: list[_Obj], h: int, w: int
) -> dict[str, dict[frozenset, list[str]]]:
    """Every expression the generalized set can use in this scene, by kind and target set.

    Returns ``{"single" | "multi" | "no_target": {frozenset(object indices): [texts]}}``;
    the no-target entry is keyed by the empty set.
    """
    kinds: dict[str, dict[frozenset, list[str]]] = {"single": {}, "multi": {}, "no_target": {}}

    def add(kind: str, targets: list[int], text: str) -> None:
        texts = kinds[kind].setdefault(frozenset(targets), [])
        if text not in texts:
            texts.append(text)

    # Single targets: the classic descriptions (colour / shape / relative position or size).
    singles: dict[int, list[str]] = {}
    for i, o in enumerate(objs):
        for desc in _descriptions(objs, o, h, w):
            text = _phrase(rng, *desc)
            singles.setdefault(i, []).append(text)
            add("single", [i], text)
    colours = sorted({o.colour for o in objs})
    shapes = sorted({o.shape for o in objs})
    # Attribute groups: every object of a colour, a shape, or both; all objects.
    groups: list[tuple[Optional[str], Optional[str]]] = [(c, None) for c in COLOURS] + [(None, s) for s in SHAPES]
    groups += [(c, s) for c in colours for s in shapes]
    for colour, shape in groups:
        members = [i for i, o in enumerate(objs) if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]
        if len(members) >= 2:
            for text in _plural_group_phrases(rng, colour, shape, len(members)):
                add("multi", members, text)
        elif not members:
            # A colour, a shape, or a colour-shape pair that no object has.
            for text in _plural_group_phrases(rng, colour, shape, 0)[:1]:
                add("no_target", [], text)
            noun = shape if shape else str(rng.choice(["shape", "object"]))
            add("no_target", [], f"the {colour + ' ' if colour else ''}{noun}")
    if len(objs) >= 2:
        for text in (f"all {rng.choice(['shapes', 'objects'])}", f"every {rng.choice(['shape', 'object'])}"):
            add("multi", list(range(len(objs))), text)
    # Half-plane groups: "every shape on the left"; none there is a no-target sentence.
    for region in _REGIONS:
        members = _region_members(objs, region, h, w)
        if members is None or len(members) == 1:
            continue
        noun_pl = str(rng.choice(["shapes", "objects"]))
        texts = [f"every {noun_pl[:-1]} {_REGION_PREP[region]}", f"all {noun_pl} {_REGION_PREP[region]}"]
        for text in texts:
            add("multi" if members else "no_target", members, text)
    # Two single descriptions joined: "the red circle and the big square".
    described = [i for i in range(len(objs)) if singles.get(i)]
    for a_pos, a in enumerate(described):
        for b in described[a_pos + 1:]:
            for _ in range(2):  # two phrasings of the pair (the same one twice is kept once)
                first, second = (a, b) if rng.random() < 0.5 else (b, a)
                text = f"{rng.choice(singles[first])} and {rng.choice(singles[second])}"
                add("multi", [a, b], text)
    return kinds


def _pick_refs(
    rng: np.random.Generator,
    kinds: dict[str, dict[frozenset, list[str]]],
    num_refs: int,
    fractions: dict[str, float],
) -> list[tuple[str, frozenset, list[str]]]:
    """Choose up to ``num_refs`` distinct target sets, each with 1-3 of its texts.

    An image gets at most one no-target ref (all its no-target sentences share the empty
    target set), with probability ``num_refs * fractions["no_target"]`` (capped at 1), so
    that about that fraction of all refs has no target; the other slots are multi- or
    single-target in the ratio of their fractions, falling back to the other kind when the
    scene has no unused target set of the drawn kind.
    """
    total = sum(fractions.values())
    p_nt = min(1.0, num_refs * fractions["no_target"] / total)
    rest = fractions["multi"] + fractions["single"]
    p_multi = fractions["multi"] / rest if rest > 0 else 0.0
    slots = []
    if kinds["no_target"] and rng.random() < p_nt:
        slots.append("no_target")
    while len(slots) < num_refs:
        slots.append("multi" if rng.random() < p_multi else "single")
    used: set = set()
    chosen = []
    for kind in slots:
        order = [kind] if kind == "no_target" else [kind, "single" if kind == "multi" else "multi"]
        for k in order:
            options = sorted((t for t in kinds[k] if t not in used), key=sorted)
            if options:
                targets = options[int(rng.integers(len(options)))]
                texts = kinds[k][targets]
                n = min(len(texts), int(rng.integers(1, 4)))
                picked = [texts[int(j)] for j in rng.choice(len(texts), size=n, replace=False)]
                used.add(targets)
                chosen.append((k, targets, picked))
                break
    return chosen


def generate_synthetic_grefcoco(
    out_dir: Union[str, os.PathLike],
    *,
    num_images: int = 200,
    seed: int = 0,
    image_size: Union[None, int, tuple[int, int]] = None,
    min_objects: int = 2,
    max_objects: int = 5,
    refs_per_image: int = 4,
    fractions: Optional[dict[str, float]] = None,
    jpeg_quality: int = 92,
    progress: bool = False,
) -> Path:
    """Write a synthetic *generalized* referring set in the gRefCOCO layout; returns ``out_dir``.

    The scenes are drawn as in :func:`generate_synthetic_refcoco`; each ref is one of

    - single target: a classic description ("the red circle", "the left square");
    - multi target: every object of a colour / shape / both ("all red shapes", "the two
      circles", "both blue squares"), every object ("all shapes"), every object in one half
      of the image ("every shape on the left"), or two single descriptions joined by "and";
    - no target (ann_id ``[-1]``): a colour, shape or colour-shape pair that no object has
      ("the purple star", "all green shapes"), or an empty half ("all shapes at the top").

    A ref's kind is drawn with ``fractions`` (default :data:`GENERALIZED_FRACTIONS`: 10 %
    no-target, 35 % multi-target), falling back to another kind when the scene has none.
    Each ref has 1-3 sentences (different phrasings of the same target set). Every
    annotation carries the drawn attributes (``"attributes": {"colour", "shape", "centre"}``).
    Deterministic for a seed.

    Written files (load with ``RefDataset(out_dir, "grefcoco", "unc", split)``)::

        out_dir/grefcoco/grefs(unc).json   out_dir/grefcoco/instances.json
        out_dir/images/train2014/COCO_train2014_%012d.jpg

    Args:
        out_dir, num_images, seed, image_size, min_objects, max_objects, jpeg_quality,
            progress: as :func:`generate_synthetic_refcoco`.
        refs_per_image: refs drawn per image (fewer when the scene runs out of target sets).
        fractions: ``{"no_target": p, "multi": p, "single": p}`` (normalised).
    """
    from pycocotools import mask as mask_utils  # the [data] extra; imported where used

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 4:
        raise ValueError(f"num_images must be an int >= 4 (one image per split at least), got {num_images!r}")
    if not (2 <= min_objects <= max_objects <= 5):
        raise ValueError(
            f"need 2 <= min_objects <= max_objects <= 5, got min_objects={min_objects}, max_objects={max_objects}"
        )
    if isinstance(refs_per_image, bool) or not isinstance(refs_per_image, int) or refs_per_image < 1:
        raise ValueError(f"refs_per_image must be an int >= 1, got {refs_per_image!r}")
    fractions = dict(GENERALIZED_FRACTIONS if fractions is None else fractions)
    if set(fractions) != set(GENERALIZED_FRACTIONS) or any(
        not isinstance(v, (int, float)) or v < 0 for v in fractions.values()
    ) or sum(fractions.values()) <= 0:
        raise ValueError(
            f"fractions must map each of {sorted(GENERALIZED_FRACTIONS)} to a non-negative number "
            f"(not all 0), got {fractions!r}"
        )
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any((not isinstance(s, int)) or s < 64 for s in hw):
            raise ValueError(f"image_size must be None, an int >= 64 or (H, W) ints >= 64, got {image_size!r}")

    out = Path(out_dir)
    data_dir = out / "grefcoco"
    image_dir = out / "images" / "train2014"
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
            n = int(rng.integers(min_objects, max_objects + 1)) if attempts < 20 else min_objects
            objs = _place(rng, _scene_attributes(rng, n), h, w)
            if objs is not None:
                break
        for o in objs:
            o.parts = _polygon_parts(o.shape, o.cx, o.cy, o.side, o.angle)
            rle = mask_utils.merge(mask_utils.frPyObjects(o.parts, h, w))
            o.mask = mask_utils.decode(rle).astype(bool)
            o.area = float(o.mask.sum())

        obj_ann_ids = _write_scene(
            rng, objs, h, w, image_id=image_id, first_ann_id=ann_id, image_dir=image_dir,
            jpeg_quality=jpeg_quality, cat_id=cat_id, images=images, annotations=annotations,
            attributes=True,
        )
        ann_id += len(obj_ann_ids)

        kinds = _generalized_candidates(rng, objs, h, w)
        for kind, targets, texts in _pick_refs(rng, kinds, refs_per_image, fractions):
            members = sorted(targets)
            sentences = []
            for text in texts:
                sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append(
                {
                    "image_id": image_id,
                    "split": splits[index],
                    "sentences": sentences,
                    "file_name": images[-1]["file_name"],
                    "category_id": [cat_id[objs[i].shape] for i in members] if members else [-1],
                    "ann_id": [obj_ann_ids[i] for i in members] if members else [-1],
                    "no_target": not members,
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "ref_id": ref_id,
                }
            )
            ref_id += 1
        if progress and ((index + 1) % step == 0 or index + 1 == num_images):
            elapsed = time.monotonic() - start
            print(f"\rsynthetic gRefCOCO: {index + 1}/{num_images} images ({elapsed:.1f} s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)

    instances = {
        "info": {"description": f"vlaligner synthetic gRefCOCO (seed {seed})", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    _write_atomic(data_dir / "instances.json", json.dumps(instances, separators=(",", ":")).encode("utf-8"))
    _write_atomic(data_dir / "grefs(unc).json", json.dumps(refs, separators=(",", ":")).encode("utf-8"))
    return out


def _summary_generalized(out: Path) -> str:
    from .refer import load_refs_json

    refs = load_refs_json(out / "grefcoco" / "grefs(unc).json")
    sentences = {"single": 0, "multi": 0, "no_target": 0}
    for r in refs:
        ids = r["ann_id"]
        kind = "no_target" if ids == [-1] else ("multi" if len(ids) > 1 else "single")
        sentences[kind] += len(r["sentences"])
    total = max(1, sum(sentences.values()))
    parts = ", ".join(f"{k} {v} ({100.0 * v / total:.0f} %)" for k, v in sentences.items())
    return (
        f"wrote {out} ({len(refs)} refs, {sum(sentences.values())} sentences: {parts}); load it with "
        f"RefDataset({str(out)!r}, 'grefcoco', 'unc', 'train')"
    )


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
    parser.add_argument(
        "--generalized",
        action="store_true",
        help="write a generalized set in the gRefCOCO layout instead (sentences that refer to "
        "several objects or to none; load it as dataset grefcoco)",
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
    generate = generate_synthetic_grefcoco if args.generalized else generate_synthetic_refcoco
    try:
        out = generate(args.out, num_images=args.images, seed=args.seed, image_size=size, progress=not args.quiet)
    except ValueError as err:
        parser.error(str(err))
    print(_summary_generalized(out) if args.generalized else _summary(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
