"""Tests of the synthetic RefCOCO-layout generator (vlaligner.data.synthetic).

Axis legend: H W space of a generated image, c colour channels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlaligner.data import RefDataset, decode_segmentation, generate_synthetic_refcoco, load_refs
from vlaligner.data.synthetic import COLOURS, SHAPES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")
REPO = Path(__file__).resolve().parents[1]
IMAGE_DIR = Path("images/mscoco/images/train2014")
MODIFIERS = ("left", "right", "top", "bottom", "middle", "big", "small")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_refcoco(tmp_path_factory.mktemp("s"), num_images=20, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_splits(synth: Path) -> None:
    assert (synth / "refcoco/refs(unc).p").is_file() and (synth / "refcoco/instances.json").is_file()
    refs = load_refs(synth / "refcoco/refs(unc).p")
    inst = json.loads((synth / "refcoco/instances.json").read_text())
    assert len(inst["images"]) == 20
    split_images: dict[str, set] = {}
    for r in refs:
        split_images.setdefault(r["split"], set()).add(r["image_id"])
        assert len(r["sentences"]) >= 1 and r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        assert len({s["sent"] for s in r["sentences"]}) == len(r["sentences"])
    assert set(split_images) == {"train", "val", "testA", "testB"}
    assert sum(len(v) for v in split_images.values()) == 20  # each image in exactly one split
    assert sum(len(r["sentences"]) for r in refs) >= 2 * len(refs) * 0.8  # mostly 2-3 sentences per ref
    for im in inst["images"]:
        path = synth / IMAGE_DIR / im["file_name"]
        assert im["file_name"] == f"COCO_train2014_{im['id']:012d}.jpg"
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (im["width"], im["height"])
        assert 160 <= im["height"] <= 256 and 160 <= im["width"] <= 256
    assert any(im["height"] != im["width"] for im in inst["images"])
    assert {c["name"] for c in inst["categories"]} == set(SHAPES)


def test_scenes_are_clean_and_have_distractors(synth: Path) -> None:
    inst = json.loads((synth / "refcoco/instances.json").read_text())
    refs = load_refs(synth / "refcoco/refs(unc).p")
    imgs = {im["id"]: im for im in inst["images"]}
    per_image: dict[int, list] = {}
    for a in inst["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    for image_id, anns in per_image.items():
        assert 2 <= len(anns) <= 5
        short = min(imgs[image_id]["height"], imgs[image_id]["width"])
        for a in anns:
            assert 0.1 * short <= max(a["bbox"][2], a["bbox"][3]) <= 0.45 * short
    # Most refs have another object sharing a shape or a colour (colour read from pixels).
    attrs = _object_attributes(synth)
    shared = 0
    for r in refs:
        me = attrs[r["ann_id"]]
        others = [attrs[a["id"]] for a in per_image[r["image_id"]] if a["id"] != r["ann_id"]]
        shared += any(o["shape"] == me["shape"] or o["colour"] == me["colour"] for o in others)
    assert shared / len(refs) > 0.6
    assert any(len(a["segmentation"]) == 2 for a in inst["annotations"])  # multi-part crosses


def _object_attributes(root: Path) -> dict[int, dict]:
    """Shape (category), colour (nearest palette colour of the mean pixel), centroid, area."""
    inst = json.loads((root / "refcoco/instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    imgs = {im["id"]: im for im in inst["images"]}
    palette = {k: np.array(v, dtype=float) for k, v in COLOURS.items()}
    pixels: dict[int, np.ndarray] = {}
    out = {}
    for a in inst["annotations"]:
        im = imgs[a["image_id"]]
        if im["id"] not in pixels:
            pixels[im["id"]] = np.asarray(Image.open(root / IMAGE_DIR / im["file_name"]).convert("RGB"), dtype=float)
        m = decode_segmentation(a["segmentation"], im["height"], im["width"])
        mean = pixels[im["id"]][m].mean(axis=0)
        colour = min(palette, key=lambda k: float(((palette[k] - mean) ** 2).sum()))
        assert float(np.sqrt(((palette[colour] - mean) ** 2).sum())) < 40, "object colour drifted"
        ys, xs = np.nonzero(m)
        out[a["id"]] = dict(
            image_id=a["image_id"], shape=cats[a["category_id"]], colour=colour, x=xs.mean(), y=ys.mean(), area=m.sum()
        )
    return out


def _parse(sentence: str) -> tuple:
    words = sentence.split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    mods = [w for w in words if w in MODIFIERS]
    assert len(mods) <= 1, sentence
    return colour, shape, (mods[0] if mods else None)


def test_every_sentence_names_exactly_its_object(synth: Path) -> None:
    attrs = _object_attributes(synth)
    refs = load_refs(synth / "refcoco/refs(unc).p")
    checked = 0
    for r in refs:
        me = attrs[r["ann_id"]]
        scene = [v for v in attrs.values() if v["image_id"] == r["image_id"]]
        for s in r["sentences"]:
            colour, shape, mod = _parse(s["sent"])
            assert colour in (None, me["colour"]) and shape in (None, me["shape"]), s["sent"]
            group = [o for o in scene if colour in (None, o["colour"]) and shape in (None, o["shape"])]
            others = [o for o in group if o is not me]
            if mod is None:
                assert colour or shape
                assert not others, f"{s['sent']!r} matches {len(group)} objects"
            else:
                assert others, f"{s['sent']!r}: a modifier needs something to compare with"
                key = {"left": "x", "right": "x", "top": "y", "bottom": "y", "big": "area", "small": "area", "middle": "x"}[mod]
                if mod in ("left", "top", "small"):
                    assert all(me[key] < o[key] for o in others), s["sent"]
                elif mod in ("right", "bottom", "big"):
                    assert all(me[key] > o[key] for o in others), s["sent"]
                else:
                    assert len(group) == 3 and sorted(o["x"] for o in group)[1] == me["x"], s["sent"]
            checked += 1
    assert checked == sum(len(r["sentences"]) for r in refs)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = _files(generate_synthetic_refcoco(tmp_path / "a", num_images=8, seed=11))
    b = _files(generate_synthetic_refcoco(tmp_path / "b", num_images=8, seed=11))
    c = _files(generate_synthetic_refcoco(tmp_path / "c", num_images=8, seed=12))
    assert a.keys() == b.keys() and len(a) == 8 + 2
    assert a == b  # same bytes: refs, annotations and every image
    assert a["refcoco/refs(unc).p"] != c["refcoco/refs(unc).p"]
    assert a["refcoco/instances.json"] != c["refcoco/instances.json"]


def test_fixed_image_size_and_argument_errors(tmp_path: Path) -> None:
    root = generate_synthetic_refcoco(tmp_path / "s", num_images=4, seed=0, image_size=(96, 128), max_objects=3)
    inst = json.loads((root / "refcoco/instances.json").read_text())
    assert {(im["height"], im["width"]) for im in inst["images"]} == {(96, 128)}
    for split in ("train", "val", "testA", "testB"):
        assert len(RefDataset(root, "refcoco", "unc", split, img_size=32)) > 0
    with pytest.raises(ValueError, match=r"num_images must be an int >= 4 .* got 3"):
        generate_synthetic_refcoco(tmp_path / "x", num_images=3)
    with pytest.raises(ValueError, match="need 2 <= min_objects <= max_objects <= 5"):
        generate_synthetic_refcoco(tmp_path / "x", num_images=4, max_objects=6)
    with pytest.raises(ValueError, match="image_size must be None, an int >= 64"):
        generate_synthetic_refcoco(tmp_path / "x", num_images=4, image_size=(10, 10))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "vlaligner.data.synthetic", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli(tmp_path: Path) -> None:
    res = _run_cli(str(tmp_path / "cli"), "--images", "6", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "6/6 images" in res.stderr  # progress indication
    assert "RuntimeWarning" not in res.stderr
    assert f"wrote {tmp_path / 'cli'}" in res.stdout and "train:" in res.stdout
    same = generate_synthetic_refcoco(tmp_path / "fn", num_images=6, seed=3)
    assert _files(tmp_path / "cli") == _files(same)
    for split in ("train", "val", "testA", "testB"):
        assert len(RefDataset(tmp_path / "cli", "refcoco", "unc", split, img_size=32)) > 0


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlaligner.data.synthetic import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "bad"), "--images", "2", "--quiet"])
    assert exit_info.value.code == 2
    assert "num_images must be an int >= 4" in capsys.readouterr().err
    assert main([str(tmp_path / "q"), "--images", "4", "--image-size", "80", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "testB:" in captured.out
    with Image.open(next((tmp_path / "q" / IMAGE_DIR).glob("*.jpg"))) as img:
        assert img.size == (80, 80)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "q"), "--image-size", "1", "2", "3"])
    assert "--image-size takes one or two ints" in capsys.readouterr().err
