"""Tests of the gRefCOCO loader (RefDataset(..., "grefcoco", ...)) on a small hand-made folder,
and of the generalized synthetic set (sentences checked against their own scene).

Axis legend: b batch, h w space (input size), H W space (original image).
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlaligner.data import (
    DATASET_SPLITS,
    RefDataset,
    collate_ref_batch,
    decode_segmentation,
    generate_synthetic_grefcoco,
    generate_synthetic_refcoco,
    missing_data_files,
    target_ann_ids,
)
from vlaligner.data.synthetic import COLOURS, SHAPES

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")
REPO = Path(__file__).resolve().parents[1]
H, W = 30, 40


def _rect(x0: int, y0: int, x1: int, y1: int) -> list:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


ANNS = [
    {"id": 11, "image_id": 1, "category_id": 1, "segmentation": _rect(2, 2, 12, 10), "iscrowd": 0},
    {"id": 12, "image_id": 1, "category_id": 1, "segmentation": _rect(20, 4, 30, 20), "iscrowd": 0},
    {"id": 13, "image_id": 1, "category_id": 2, "segmentation": _rect(5, 18, 15, 28), "iscrowd": 1},
    # a valid box plus a degenerate 2-point polygon, which ReLA's loader drops
    {"id": 21, "image_id": 2, "category_id": 2, "segmentation": _rect(1, 1, 9, 9) + [[20, 20, 25, 25]], "iscrowd": 0},
]
REFS = [
    # single target, ann_id as a one-element list
    {"ref_id": 0, "image_id": 1, "split": "train", "ann_id": [11], "sentences": [{"sent_id": 0, "raw": "the left box"}]},
    # multi target: the union of two objects
    {"ref_id": 1, "image_id": 1, "split": "train", "ann_id": [11, 12],
     "sentences": [{"sent_id": 1, "raw": "both boxes"}, {"sent_id": 2, "sent": "the two boxes"}]},
    # no target, as gRefCOCO writes it
    {"ref_id": 2, "image_id": 1, "split": "train", "ann_id": [-1], "sentences": [{"sent_id": 3, "raw": "the dog"}]},
    # an empty annotation list: no target too
    {"ref_id": 3, "image_id": 2, "split": "train", "ann_id": [], "sentences": [{"sent_id": 4, "raw": "the cat"}]},
    # a bare int (RefCOCO style) is one target
    {"ref_id": 4, "image_id": 2, "split": "train", "ann_id": 21, "sentences": [{"sent_id": 5, "raw": "the box"}]},
    # a crowd annotation beside a real one: skipped, as ReLA's loader does
    {"ref_id": 5, "image_id": 1, "split": "train", "ann_id": [12, 13], "sentences": [{"sent_id": 6, "raw": "right box and crowd"}]},
    {"ref_id": 6, "image_id": 2, "split": "val", "ann_id": [21], "sentences": [{"sent_id": 7, "raw": "val box"}]},
]


def _make_root(root: Path, *, image_subdir: str = "images/train2014", refs=REFS, fmt: str = "json") -> Path:
    data = root / "grefcoco"
    data.mkdir(parents=True)
    images = [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": H, "width": W},
    ]
    (data / "instances.json").write_text(json.dumps({"images": images, "annotations": ANNS, "categories": []}))
    if fmt == "json":
        (data / "grefs(unc).json").write_text(json.dumps(refs))
    else:
        (data / "grefs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    img_dir = root / image_subdir
    img_dir.mkdir(parents=True)
    for im in images:
        Image.fromarray(np.full((H, W, 3), 128, dtype=np.uint8)).save(img_dir / im["file_name"])
    return root


def _ann_mask(ann_id: int) -> np.ndarray:
    ann = next(a for a in ANNS if a["id"] == ann_id)
    return decode_segmentation([p for p in ann["segmentation"] if len(p) >= 6], H, W)


@pytest.fixture()
def gref_root(tmp_path: Path) -> Path:
    return _make_root(tmp_path / "data")


def test_target_ann_ids() -> None:
    assert target_ann_ids([-1]) == [] and target_ann_ids([]) == [] and target_ann_ids(-1) == []
    assert target_ann_ids(7) == [7] and target_ann_ids([3, 4]) == [3, 4]
    with pytest.raises(ValueError, match=r"mixes -1 \(no target\) with annotation ids"):
        target_ann_ids([-1, 4], where="ref 9")
    with pytest.raises(ValueError, match="ref 9: ann_id must hold integer annotation ids"):
        target_ann_ids(["4"], where="ref 9")


def test_single_multi_and_no_target_samples(gref_root: Path) -> None:
    assert DATASET_SPLITS["grefcoco"] == {"unc": ("train", "val", "testA", "testB")}
    ds = RefDataset(gref_root, "grefcoco", "unc", "train", img_size=32)
    assert ds.max_length == 20 and ds.image_dir == gref_root / "images/train2014"
    assert len(ds) == 7  # one sample per sentence
    by_sentence = {ds[i]["sentence"]: ds[i] for i in range(len(ds))}
    single, multi, dog, cat, box, crowd = (
        by_sentence[k] for k in ("the left box", "both boxes", "the dog", "the cat", "the box", "right box and crowd")
    )
    assert not single["no_target"] and single["ann_ids"] == [11] and single["num_targets"] == 1
    assert torch.equal(single["orig_mask"], torch.from_numpy(_ann_mask(11)))
    # Multi target: the union of both objects, pixel for pixel.
    union = _ann_mask(11) | _ann_mask(12)
    assert multi["ann_ids"] == [11, 12] and multi["num_targets"] == 2 and multi["ann_id"] == 11
    assert torch.equal(multi["orig_mask"], torch.from_numpy(union))
    assert multi["orig_mask"].sum() == int(_ann_mask(11).sum() + _ann_mask(12).sum())  # disjoint boxes
    assert by_sentence["the two boxes"]["orig_mask"].equal(multi["orig_mask"])  # 'sent' when no 'raw'
    # No target, both spellings: an empty mask, ann_id -1.
    for nt in (dog, cat):
        assert nt["no_target"] is True and nt["ann_ids"] == [] and nt["ann_id"] == -1 and nt["num_targets"] == 0
        assert not nt["orig_mask"].any() and nt["mask"].sum() == 0 and nt["mask"].shape == (32, 32)
    assert box["ann_ids"] == [21] and box["orig_mask"].sum() == int(_ann_mask(21).sum())
    assert torch.equal(box["orig_mask"], torch.from_numpy(decode_segmentation(_rect(1, 1, 9, 9), H, W)))
    # The crowd region is not part of the target.
    assert crowd["ann_ids"] == [12] and torch.equal(crowd["orig_mask"], torch.from_numpy(_ann_mask(12)))
    assert np.array_equal(ds.ref_mask(1), union) and ds.ref_ann_ids(2) == []


def test_collate_carries_the_flags(gref_root: Path) -> None:
    ds = RefDataset(gref_root, "grefcoco", "unc", "train", img_size=32)
    batch = collate_ref_batch([ds[i] for i in range(len(ds))])
    assert batch["no_target"].dtype == torch.bool
    assert batch["no_target"].tolist() == [False, False, False, True, True, False, False]
    assert batch["num_targets"].tolist() == [1, 2, 2, 0, 0, 1, 1]
    assert batch["ann_ids"] == [[11], [11, 12], [11, 12], [], [], [21], [12]]
    assert batch["mask"].shape == (7, 32, 32)
    assert batch["mask"][batch["no_target"]].sum() == 0


def test_pickle_is_preferred_and_refcoco_image_folder_works(tmp_path: Path) -> None:
    # ReLA's grefer.py reads grefs(unc).p when it exists.
    root = _make_root(tmp_path / "p", image_subdir="images/mscoco/images/train2014", refs=REFS[:2], fmt="p")
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(REFS))
    ds = RefDataset(root, "grefcoco", "unc", "train")
    assert ds.refs_file.name == "grefs(unc).p" and len(ds) == 3
    assert ds.image_dir == root / "images/mscoco/images/train2014"
    assert ds[0]["image"].shape == (3, 480, 480)


def test_classic_samples_are_never_no_target(tmp_path: Path) -> None:
    root = generate_synthetic_refcoco(tmp_path / "s", num_images=4, seed=0)
    ds = RefDataset(root, "refcoco", "unc", "train", img_size=32)
    item = ds[0]
    assert item["no_target"] is False and "ann_ids" not in item and item["mask"].sum() > 0


def test_missing_data_files(tmp_path: Path) -> None:
    root = _make_root(tmp_path / "m")
    assert missing_data_files(root, "grefcoco", "unc") == []
    (root / "grefcoco" / "grefs(unc).json").unlink()
    shutil.rmtree(root / "images")
    missing = missing_data_files(root, "grefcoco", "unc")
    assert missing == [
        f"{root}/grefcoco/grefs(unc).json or {root}/grefcoco/grefs(unc).p",
        f"{root}/images/train2014 or {root}/images/mscoco/images/train2014",
    ]
    assert missing_data_files(root, "refcoco", "unc") == [
        f"{root}/refcoco/refs(unc).p", f"{root}/refcoco/instances.json", f"{root}/images/mscoco/images/train2014",
    ]


def test_errors(tmp_path: Path) -> None:
    root = _make_root(tmp_path / "a")
    (root / "grefcoco" / "grefs(unc).json").unlink()
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*grefs\(unc\)\.json; expected .*grefs\(unc\)\.p"):
        RefDataset(root, "grefcoco", "unc", "train")
    root = _make_root(tmp_path / "b")
    shutil.rmtree(root / "images")
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*images/train2014 or .*images/mscoco/images/train2014"):
        RefDataset(root, "grefcoco", "unc", "train")
    mixed = [dict(REFS[0], ann_id=[-1, 11])]
    with pytest.raises(ValueError, match=r"grefs\(unc\)\.json: ref 0: ann_id \[-1, 11\] mixes -1"):
        RefDataset(_make_root(tmp_path / "c", refs=mixed), "grefcoco", "unc", "train")
    crowd_only = [dict(REFS[0], ann_id=[13])]
    with pytest.raises(ValueError, match="ref 0 refers only to crowd annotations"):
        RefDataset(_make_root(tmp_path / "d", refs=crowd_only), "grefcoco", "unc", "train")
    missing = [dict(REFS[0], ann_id=[99])]
    with pytest.raises(ValueError, match=r"points to annotation 99, which"):
        RefDataset(_make_root(tmp_path / "e", refs=missing), "grefcoco", "unc", "train")
    root = _make_root(tmp_path / "f")
    (root / "grefcoco" / "grefs(unc).json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read refs file .* as JSON"):
        RefDataset(root, "grefcoco", "unc", "train")
    with pytest.raises(ValueError, match=r"unknown split 'test' for grefcoco \(unc\)"):
        RefDataset(root, "grefcoco", "unc", "test")


# ----------------------------------------------------------------- generalized synthetic set
@pytest.fixture(scope="module")
def gsynth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_grefcoco(tmp_path_factory.mktemp("g"), num_images=40, seed=3)


_PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}
_QUANT = ("all", "every", "both", "two", "three", "four", "five")
_HALF = {"left": ("x", "<"), "right": ("x", ">"), "top": ("y", "<"), "bottom": ("y", ">")}


def _interpret(text: str, objs: list[dict], h: int, w: int) -> set:
    """The objects a synthetic sentence names, read from its words (independent of the generator).

    ``objs``: annotation dicts with ``attributes`` (colour, shape, centre) and ``mask``.
    Plural / quantified phrases name every object with the attributes (in the named half of
    the image, if any); singular phrases must single out one object (by attributes, then a
    relative position or size among the objects that share them).
    """
    if " and " in text:
        out: set = set()
        for part in text.split(" and "):
            found = _interpret(part, objs, h, w)
            assert len(found) == 1, f"part {part!r} of {text!r} names {len(found)} objects"
            out |= found
        return out
    words = text.split()
    colour = next((x for x in words if x in COLOURS), None)
    shape = next((x for x in words if x in SHAPES), None)
    plural_shape = next((_PLURAL[x] for x in words if x in _PLURAL), None)
    plural = plural_shape is not None or any(x in _QUANT for x in words) or any(x in ("shapes", "objects") for x in words)
    shape = shape or plural_shape
    group = [
        i for i, o in enumerate(objs)
        if (colour is None or o["attributes"]["colour"] == colour) and (shape is None or o["attributes"]["shape"] == shape)
    ]
    mods = [x for x in words if x in ("left", "right", "top", "bottom", "middle", "big", "small")]
    if plural:
        if mods:
            axis, side = _HALF[mods[0]]
            k, line = (0, w / 2) if axis == "x" else (1, h / 2)
            group = [i for i in group if (objs[i]["attributes"]["centre"][k] < line) == (side == "<")]
        return set(group)
    if not mods:
        return set(group) if len(group) <= 1 else set()  # ambiguous singular: names nobody
    assert len(group) >= 2, f"{text!r}: a modifier on a group of {len(group)}"
    mod = mods[0]
    cx = {i: objs[i]["attributes"]["centre"][0] for i in group}
    cy = {i: objs[i]["attributes"]["centre"][1] for i in group}
    area = {i: int(objs[i]["mask"].sum()) for i in group}
    pick = {
        "left": lambda: min(group, key=cx.get), "right": lambda: max(group, key=cx.get),
        "top": lambda: min(group, key=cy.get), "bottom": lambda: max(group, key=cy.get),
        "big": lambda: max(group, key=area.get), "small": lambda: min(group, key=area.get),
        "middle": lambda: sorted(group, key=cx.get)[1],
    }[mod]
    return {pick()}


def _scenes(root: Path) -> tuple[dict, dict]:
    """``({image_id: (h, w)}, {image_id: [annotation dicts with their decoded (H W) "mask"]})``."""
    inst = json.loads((root / "grefcoco/instances.json").read_text())
    size = {im["id"]: (im["height"], im["width"]) for im in inst["images"]}
    per_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        h, w = size[a["image_id"]]
        per_image.setdefault(a["image_id"], []).append(dict(a, mask=decode_segmentation(a["segmentation"], h, w)))
    return size, per_image


def test_generalized_layout_and_proportions(gsynth: Path) -> None:
    assert (gsynth / "grefcoco/grefs(unc).json").is_file() and (gsynth / "grefcoco/instances.json").is_file()
    assert (gsynth / "images/train2014").is_dir()
    refs = json.loads((gsynth / "grefcoco/grefs(unc).json").read_text())
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    kinds = {"single": 0, "multi": 0, "no_target": 0}
    for r in refs:
        assert isinstance(r["ann_id"], list) and r["ann_id"]
        kind = "no_target" if r["ann_id"] == [-1] else ("multi" if len(r["ann_id"]) > 1 else "single")
        assert r["no_target"] == (kind == "no_target")
        kinds[kind] += len(r["sentences"])
    total = sum(kinds.values())
    assert 0.04 <= kinds["no_target"] / total <= 0.2  # gRefCOCO: about 10 %
    assert 0.2 <= kinds["multi"] / total <= 0.5  # a sizeable share
    texts = [s["sent"] for r in refs for s in r["sentences"]]
    assert any(t.startswith("all ") for t in texts) and any(" and " in t for t in texts)
    assert any(re.match(r"(every|all) (shape|object)s? (on the|at the) ", t) for t in texts)
    assert any(t.startswith(("the two ", "both ")) for t in texts)
    ds = RefDataset(gsynth, "grefcoco", "unc", "train", img_size=32)
    assert sum(bool(ds[i]["no_target"]) for i in range(len(ds))) > 0


def test_generalized_sentences_match_their_scene(gsynth: Path) -> None:
    refs = json.loads((gsynth / "grefcoco/grefs(unc).json").read_text())
    size, per_image = _scenes(gsynth)
    checked = {"single": 0, "multi": 0, "no_target": 0}
    for r in refs:
        objs = per_image[r["image_id"]]
        h, w = size[r["image_id"]]
        expected = set() if r["ann_id"] == [-1] else {next(i for i, o in enumerate(objs) if o["id"] == a) for a in r["ann_id"]}
        for s in r["sentences"]:
            assert _interpret(s["sent"], objs, h, w) == expected, (s["sent"], r["ann_id"])
        kind = "no_target" if not expected else ("multi" if len(expected) > 1 else "single")
        checked[kind] += 1
    assert all(v > 5 for v in checked.values()), checked


def test_generalized_is_deterministic(tmp_path: Path) -> None:
    a = generate_synthetic_grefcoco(tmp_path / "a", num_images=5, seed=4)
    b = generate_synthetic_grefcoco(tmp_path / "b", num_images=5, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="fractions must map each of"):
        generate_synthetic_grefcoco(tmp_path / "c", num_images=4, fractions={"multi": 1.0})


def test_generalized_command_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlaligner.cli import main

    assert main(["synth", str(tmp_path / "cli"), "--images", "4", "--seed", "2", "--generalized"]) == 0
    assert "grefcoco" in capsys.readouterr().out
    assert (tmp_path / "cli/grefcoco/grefs(unc).json").is_file()
    run = subprocess.run(
        [sys.executable, "-m", "vlaligner.data.synthetic", str(tmp_path / "mod"), "--images", "4", "--seed", "2",
         "--generalized", "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "no_target" in run.stdout and "'grefcoco'" in run.stdout
    for name in ("grefcoco/grefs(unc).json", "grefcoco/instances.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "mod" / name).read_bytes()


def test_flipped_generalized_samples_keep_their_meaning(gsynth: Path) -> None:
    """The training flip (scratch-small's) on the generalized set: the swapped sentence names
    exactly the same objects in the mirrored scene (by the independent reader above), and the
    no-target flag, the target count and the union mask follow."""
    size, per_image = _scenes(gsynth)
    plain = RefDataset(gsynth, "grefcoco", "unc", "train", img_size=32)
    aug = RefDataset(gsynth, "grefcoco", "unc", "train", img_size=32, augment=True)
    aug.set_augment_seed(0)
    flipped = {"no_target": 0, "multi": 0, "left/right": 0}
    for i in range(len(plain)):
        a, b = plain[i], aug[i]
        assert (b["no_target"], b["num_targets"], b["ann_ids"]) == (a["no_target"], a["num_targets"], a["ann_ids"])
        if torch.equal(b["image"], a["image"]):
            assert b["sentence"] == a["sentence"] and torch.equal(b["orig_mask"], a["orig_mask"])
            continue
        assert torch.equal(b["image"], a["image"].flip(-1)) and torch.equal(b["orig_mask"], a["orig_mask"].flip(-1))
        objs = per_image[b["image_id"]]
        h, w = size[b["image_id"]]
        mirrored = [
            dict(o, attributes=dict(o["attributes"], centre=[w - o["attributes"]["centre"][0], o["attributes"]["centre"][1]]),
                 mask=o["mask"][:, ::-1])
            for o in objs
        ]
        expected = {k for k, o in enumerate(objs) if o["id"] in b["ann_ids"]}
        assert _interpret(b["sentence"], mirrored, h, w) == expected, (a["sentence"], b["sentence"])
        flipped["no_target"] += bool(b["no_target"])
        flipped["multi"] += b["num_targets"] > 1
        flipped["left/right"] += b["sentence"] != a["sentence"]
    assert all(v > 0 for v in flipped.values()), flipped
