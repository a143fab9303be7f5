"""Tests of vlaligner.data: the refer-layout loader, transforms and collate.

Axis legend: b batch, c channels, h w space (input size), H W space (original), l words.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from vlaligner.data import (
    DATASET_SPLITS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RefDataset,
    SampleCacheTooLarge,
    UnsafePickleError,
    collate_ref_batch,
    decode_segmentation,
    generate_synthetic_refcoco,
    hflip_sample,
    load_image,
    load_refs,
    preprocess_image,
    resize_mask,
    sample_cache_bytes,
    swap_left_right,
)

torch.set_num_threads(1)
# pycocotools 2.0.x trips numpy 2's copy-keyword deprecation inside its own code.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")
UNC_SPLITS = ("train", "val", "testA", "testB")


def toy_tokenizer(sentences: list, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-level stand-in for EAVL.tokenize: ids (b l), mask (b l), padded to max_length."""
    ids = torch.zeros(len(sentences), max_length, dtype=torch.long)
    att = torch.zeros(len(sentences), max_length, dtype=torch.long)
    for i, s in enumerate(sentences):
        for j, w in enumerate(s.lower().split()[:max_length]):
            ids[i, j] = 1 + sum(map(ord, w)) % 997
            att[i, j] = 1
    return ids, att


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return generate_synthetic_refcoco(root, num_images=16, seed=1)


def _copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _coco_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """annToMask as in the COCO API: polygons -> frPyObjects -> merge -> decode."""
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
    return mask_utils.decode(rle).astype(bool)


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("split", UNC_SPLITS)
def test_every_split_loads(synth_root: Path, split: str) -> None:
    ds = RefDataset(synth_root, "refcoco", "unc", split, tokenizer=toy_tokenizer, img_size=64)
    assert len(ds) > 0
    assert len(ds) == len(ds.samples) == sum(len(r["sentences"]) for r in ds.refs.values())
    assert all(ds.refs[r]["split"] == split for r, _, _ in ds.samples)
    item = ds[len(ds) - 1]
    h, w = item["orig_size"].tolist()
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["input_ids"].shape == (17,) and item["input_ids"].dtype == torch.long
    assert item["attention_mask"].shape == (17,) and item["attention_mask"].dtype == torch.long
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    assert item["orig_mask"].shape == (h, w) and item["orig_mask"].dtype == torch.bool
    assert item["orig_size"].dtype == torch.long
    for key in ("ref_id", "ann_id", "sent_id", "image_id"):
        assert type(item[key]) is int
    assert isinstance(item["sentence"], str) and item["sentence"]
    assert item["file_name"] == f"COCO_train2014_{item['image_id']:012d}.jpg"
    assert (synth_root / "images/mscoco/images/train2014" / item["file_name"]).is_file()


def test_splits_are_disjoint_by_image(synth_root: Path) -> None:
    images = {s: set(RefDataset(synth_root, "refcoco", "unc", s).images) for s in UNC_SPLITS}
    for a in UNC_SPLITS:
        for b in UNC_SPLITS:
            if a < b:
                assert not images[a] & images[b]


def test_no_tokenizer_omits_ids_and_repr(synth_root: Path) -> None:
    ds = RefDataset(synth_root, "refcoco", "unc", "val", img_size=32)
    item = ds[0]
    assert "input_ids" not in item and "attention_mask" not in item
    assert ds.max_length == 17
    text = repr(ds)
    assert "split='val'" in text and f"sentences={len(ds)}" in text and "img_size=32" in text
    assert item["sentence"] == ds.samples[0].sentence


def test_image_is_plain_resize_normalised(synth_root: Path) -> None:
    ds = RefDataset(synth_root, "refcoco", "unc", "val", img_size=48)
    item = ds[0]
    raw = load_image(ds.image_path(0))
    ref = np.asarray(raw.resize((48, 48), Image.BILINEAR), dtype=np.float32) / 255.0
    ref = (ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_masks_equal_pycocotools(synth_root: Path) -> None:
    instances = json.loads((synth_root / "refcoco/instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    imgs = {i["id"]: i for i in instances["images"]}
    ds = RefDataset(synth_root, "refcoco", "unc", "train", img_size=40)
    seen = set()
    for index, (ref_id, _, _) in enumerate(ds.samples):
        if ref_id in seen:
            continue
        seen.add(ref_id)
        ref = ds.refs[ref_id]
        info = imgs[ref["image_id"]]
        expected = _coco_mask(anns[ref["ann_id"]], info["height"], info["width"])
        assert expected.any()
        np.testing.assert_array_equal(ds.ref_mask(ref_id), expected)
        if len(seen) <= 6:
            item = ds[index]
            np.testing.assert_array_equal(item["orig_mask"].numpy(), expected)
            np.testing.assert_array_equal(item["mask"].numpy(), resize_mask(expected, 40).numpy().astype(np.float32))
    assert len(seen) == len(ds.refs)


def test_multi_part_annotation_is_union(synth_root: Path) -> None:
    instances = json.loads((synth_root / "refcoco/instances.json").read_text())
    crosses = [a for a in instances["annotations"] if len(a["segmentation"]) > 1]
    assert crosses, "the synthetic set must contain multi-polygon objects"
    imgs = {i["id"]: i for i in instances["images"]}
    ann = crosses[0]
    h, w = imgs[ann["image_id"]]["height"], imgs[ann["image_id"]]["width"]
    parts = [mask_utils.decode(mask_utils.frPyObjects([p], h, w))[:, :, 0].astype(bool) for p in ann["segmentation"]]
    union = decode_segmentation(ann["segmentation"], h, w)
    np.testing.assert_array_equal(union, np.logical_or.reduce(parts))
    assert (parts[0] & parts[1]).any(), "the two bars overlap: overlap pixels must stay foreground"
    assert union.sum() > max(p.sum() for p in parts)


def test_overlapping_polygons_hand_made() -> None:
    a = [1.0, 1.0, 7.0, 1.0, 7.0, 7.0, 1.0, 7.0]
    b = [4.0, 4.0, 10.0, 4.0, 10.0, 10.0, 4.0, 10.0]
    m = decode_segmentation([a, b], 12, 12)
    ma = decode_segmentation([a], 12, 12)
    mb = decode_segmentation([b], 12, 12)
    assert m.dtype == bool and m.shape == (12, 12)
    assert (ma & mb).sum() > 0
    assert m.sum() == ma.sum() + mb.sum() - (ma & mb).sum()
    # RLE input (compressed and uncompressed) decodes too.
    rle = mask_utils.encode(np.asfortranarray(ma.astype(np.uint8)))
    np.testing.assert_array_equal(decode_segmentation(rle, 12, 12), ma)
    with pytest.raises(ValueError, match="list of polygons or an RLE dict"):
        decode_segmentation("nope", 12, 12)


@pytest.fixture(scope="module")
def refcocog_root(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set re-labelled as G-Ref (umd: train/val/test, google: train/val)."""
    root = tmp_path_factory.mktemp("gref")
    os.symlink(synth_root / "images", root / "images")
    (root / "refcocog").mkdir()
    shutil.copy(synth_root / "refcoco/instances.json", root / "refcocog/instances.json")
    refs = load_refs(synth_root / "refcoco/refs(unc).p")
    umd = [dict(r, split={"testA": "test", "testB": "test"}.get(r["split"], r["split"])) for r in refs]
    google = [dict(r, split="val" if r["split"] != "train" else "train") for r in refs]
    (root / "refcocog/refs(umd).p").write_bytes(pickle.dumps(umd, protocol=2))
    (root / "refcocog/refs(google).p").write_bytes(pickle.dumps(google, protocol=2))
    return root


@pytest.mark.parametrize(
    "split_by,split", [("umd", "train"), ("umd", "val"), ("umd", "test"), ("google", "train"), ("google", "val")]
)
def test_refcocog_splits_and_max_length(refcocog_root: Path, split_by: str, split: str) -> None:
    ds = RefDataset(refcocog_root, "refcocog", split_by, split, tokenizer=toy_tokenizer, img_size=32)
    assert ds.max_length == 22
    assert ds[0]["input_ids"].shape == (22,)
    custom = RefDataset(refcocog_root, "refcocog", split_by, split, tokenizer=toy_tokenizer, img_size=32, max_length=9)
    assert custom[0]["input_ids"].shape == (9,)


# ---------------------------------------------------------------------------- errors
def test_error_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data root not found: .*nowhere.*expected refcoco/"):
        RefDataset(tmp_path / "nowhere", "refcoco", "unc", "val")


def test_error_missing_dataset_folder(synth_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data set folder not found: .*refcoco\+.*present .*\['refcoco'\]"):
        RefDataset(synth_root, "refcoco+", "unc", "val")


def test_error_missing_refs_file(refcocog_root: Path, tmp_path: Path) -> None:
    root = _copy_root(refcocog_root, tmp_path / "r")
    (root / "refcocog/refs(google).p").unlink()
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*refs\(google\)\.p.*found \['refs\(umd\)\.p'\]"):
        RefDataset(root, "refcocog", "google", "val")


def test_error_missing_instances(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "refcoco").mkdir(parents=True)
    shutil.copy(synth_root / "refcoco/refs(unc).p", root / "refcoco/refs(unc).p")
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*instances\.json"):
        RefDataset(root, "refcoco", "unc", "val")


def test_error_missing_image_folder(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    shutil.copytree(synth_root / "refcoco", root / "refcoco")
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*images/mscoco/images/train2014"):
        RefDataset(root, "refcoco", "unc", "val")


def test_error_missing_image(synth_root: Path, tmp_path: Path) -> None:
    root = _copy_root(synth_root, tmp_path / "r")
    ds = RefDataset(root, "refcoco", "unc", "val", img_size=32)
    path = ds.image_path(0)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"image file not found: .*{path.name}"):
        ds[0]


def test_error_corrupt_image(synth_root: Path, tmp_path: Path) -> None:
    root = _copy_root(synth_root, tmp_path / "r")
    ds = RefDataset(root, "refcoco", "unc", "val", img_size=32)
    path = ds.image_path(0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated JPEG
    with pytest.raises(ValueError, match=f"corrupt or unreadable image file .*{path.name}"):
        ds[0]
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=f"corrupt or unreadable image file .*{path.name}"):
        ds[0]


def test_error_image_size_mismatch(synth_root: Path, tmp_path: Path) -> None:
    root = _copy_root(synth_root, tmp_path / "r")
    ds = RefDataset(root, "refcoco", "unc", "val", img_size=32)
    path = ds.image_path(0)
    Image.new("RGB", (17, 13)).save(path, format="JPEG")
    with pytest.raises(ValueError, match=f"image .*{path.name} is 17x13 .* says"):
        ds[0]


@pytest.mark.parametrize(
    "dataset,split_by,split,match",
    [
        ("refcoco", "unc", "test", r"unknown split 'test' for refcoco \(unc\); expected one of \['train', 'val', 'testA', 'testB'\]"),
        ("refcocog", "umd", "testA", r"unknown split 'testA' for refcocog \(umd\); expected one of \['train', 'val', 'test'\]"),
        ("refcocog", "google", "test", r"unknown split 'test' for refcocog \(google\); expected one of \['train', 'val'\]"),
        ("refcoco", "umd", "val", r"unknown split_by 'umd' for refcoco; expected one of \['unc'\]"),
        ("coco", "unc", "val", r"unknown dataset 'coco'; expected one of \['refcoco', 'refcoco\+', 'refcocog', 'grefcoco'\]"),
    ],
)
def test_error_unknown_names(synth_root: Path, dataset: str, split_by: str, split: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RefDataset(synth_root, dataset, split_by, split)


def test_error_empty_split(synth_root: Path, tmp_path: Path) -> None:
    root = _copy_root(synth_root, tmp_path / "r")
    refs = [r for r in load_refs(root / "refcoco/refs(unc).p") if r["split"] != "testB"]
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"split 'testB' of refcoco \(unc\) is empty: .*refs per split in the file: \{.*'train': \d+"):
        RefDataset(root, "refcoco", "unc", "testB")
    assert len(RefDataset(root, "refcoco", "unc", "testA")) > 0


def test_error_unsafe_file_name(synth_root: Path, tmp_path: Path) -> None:
    root = _copy_root(synth_root, tmp_path / "r")
    inst = json.loads((root / "refcoco/instances.json").read_text())
    for im in inst["images"]:
        im["file_name"] = "../../../etc/passwd"
    (root / "refcoco/instances.json").write_text(json.dumps(inst))
    with pytest.raises(ValueError, match=r"file_name '\.\./\.\./\.\./etc/passwd'; only plain file names"):
        RefDataset(root, "refcoco", "unc", "val")


def test_error_bad_arguments(synth_root: Path) -> None:
    with pytest.raises(ValueError, match="img_size must be a positive int, got 0"):
        RefDataset(synth_root, "refcoco", "unc", "val", img_size=0)
    with pytest.raises(ValueError, match="max_length must be a positive int, got -1"):
        RefDataset(synth_root, "refcoco", "unc", "val", max_length=-1)
    with pytest.raises(TypeError, match="tokenizer must be a callable"):
        RefDataset(synth_root, "refcoco", "unc", "val", tokenizer="bert")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="augment must be a bool"):
        RefDataset(synth_root, "refcoco", "unc", "val", augment=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache must be a bool, got str"):
        RefDataset(synth_root, "refcoco", "unc", "val", cache="yes")  # type: ignore[arg-type]
    bad = RefDataset(synth_root, "refcoco", "unc", "val", tokenizer=lambda s, n: torch.zeros(1, n))
    with pytest.raises(TypeError, match=r"tokenizer must return \(input_ids \(b l\), attention_mask \(b l\)\)"):
        bad[0]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the classic pickle exploit
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(synth_root: Path, tmp_path: Path) -> None:
    root = _copy_root(synth_root, tmp_path / "r")
    marker = tmp_path / "pwned"
    refs = load_refs(root / "refcoco/refs(unc).p")
    refs[0]["payload"] = _Exploit(marker)
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refusing to load .*refs\(unc\)\.p: the pickle asks for the global '(posix|os)\.system'"):
        RefDataset(root, "refcoco", "unc", "val")
    assert not marker.exists()
    # Modern protocols use STACK_GLOBAL instead of GLOBAL: refused as well.
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps([_Exploit(marker)], protocol=5))
    with pytest.raises(ValueError, match="refusing to load"):
        load_refs(root / "refcoco/refs(unc).p")
    assert not marker.exists()


def test_refs_file_structure_checked(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="must hold a list of ref dicts, got dict"):
        load_refs(path)
    path.write_bytes(pickle.dumps([{"ref_id": 1}]))
    with pytest.raises(ValueError, match=r"entry 0 must be a dict with keys \['ref_id', 'ann_id'"):
        load_refs(path)
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="cannot read refs file .* as a pickle"):
        load_refs(path)
    # Sets are harmless and allowed.
    path.write_bytes(pickle.dumps([{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "sentences": [], "x": {1}}], protocol=2))
    assert load_refs(path)[0]["x"] == {1}


# ---------------------------------------------------------------------------- transforms
def test_load_image_converts_modes(tmp_path: Path) -> None:
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (10, 12)
    np.testing.assert_array_equal(np.asarray(img)[:, :, 1], grey)
    rgba = np.zeros((5, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # opaque: its colour; transparent elsewhere: white, as a viewer shows it
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(img)[1, 1].tolist() == [255, 255, 255]
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_preprocess_image_inputs() -> None:
    rgb = np.full((20, 30, 3), (255, 0, 128), dtype=np.uint8)
    x = preprocess_image(rgb, (8, 12))
    assert x.shape == (3, 8, 12) and x.dtype == torch.float32
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    assert preprocess_image(Image.fromarray(rgb), 16).shape == (3, 16, 16)
    grey = preprocess_image(np.full((9, 9), 100, dtype=np.uint8), 4)
    np.testing.assert_allclose(
        grey[:, 0, 0].numpy(), (100 / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5
    )
    opaque = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=2)
    torch.testing.assert_close(preprocess_image(opaque, 8), preprocess_image(rgb, 8))
    clear = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=2)  # composited on white
    torch.testing.assert_close(preprocess_image(clear, 8), preprocess_image(np.full_like(rgb, 255), 8))
    with pytest.raises(TypeError, match="image array must be uint8 .* got dtype float32"):
        preprocess_image(rgb.astype(np.float32), 8)
    with pytest.raises(ValueError, match=r"image array must have shape \(H W 3\), \(H W 4\) or \(H W\), got \(4, 4, 2\)"):
        preprocess_image(np.zeros((4, 4, 2), np.uint8), 8)
    with pytest.raises(TypeError, match="must be a PIL.Image.Image or a numpy uint8 array, got Tensor"):
        preprocess_image(torch.zeros(3, 4, 4), 8)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"size must be an int or a \(h, w\) pair"):
        preprocess_image(rgb, "big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size must be positive"):
        preprocess_image(rgb, (0, 4))


@pytest.mark.parametrize("src,dst", [((13, 7), (40, 31)), ((50, 64), (17, 9)), ((200, 256), (40, 40)), ((8, 8), (8, 8))])
def test_resize_mask_nearest_by_pixel_centres(src: tuple, dst: tuple) -> None:
    rng = np.random.default_rng(0)
    m = rng.random(src) > 0.5
    out = resize_mask(m, dst)
    assert out.dtype == torch.bool and out.shape == dst
    # Reference: output pixel i samples input pixel floor((i + 0.5) * in / out), exactly.
    rows = [int(np.floor((i + 0.5) * src[0] / dst[0] + 1e-9)) for i in range(dst[0])]
    cols = [int(np.floor((j + 0.5) * src[1] / dst[1] + 1e-9)) for j in range(dst[1])]
    np.testing.assert_array_equal(out.numpy(), m[np.ix_(rows, cols)])
    # PIL's NEAREST is the same rule up to floating-point ties (LAVT resizes with PIL).
    pil = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((dst[1], dst[0]), Image.NEAREST)) > 0
    assert (pil == out.numpy()).mean() > 0.95
    torch.testing.assert_close(resize_mask(torch.from_numpy(m).float(), dst), out)
    assert resize_mask(Image.fromarray(m.astype(np.uint8) * 255), dst).equal(out)
    with pytest.raises(ValueError, match=r"mask must have shape \(H W\), got \(1, \d+, \d+\)"):
        resize_mask(m[None], dst)


def test_swap_left_right() -> None:
    assert swap_left_right("the leftmost man on the Right") == "the rightmost man on the Left"
    assert swap_left_right("LEFT guy, right-hand cup") == "RIGHT guy, left-hand cup"
    assert swap_left_right("bright upright lamp") == "bright upright lamp"
    assert swap_left_right(swap_left_right("left of the right one")) == "left of the right one"


def test_augmentation_flips_with_sentence(synth_root: Path) -> None:
    plain = RefDataset(synth_root, "refcoco", "unc", "train", img_size=40)
    aug = RefDataset(synth_root, "refcoco", "unc", "train", img_size=40, augment=True)
    index = next(i for i, s in enumerate(plain.samples) if " left" in f" {s.sentence}" or " right" in f" {s.sentence}")
    base = plain[index]
    torch.manual_seed(0)
    flipped = kept = 0
    for _ in range(12):
        item = aug[index]
        if item["sentence"] == base["sentence"]:
            kept += 1
            torch.testing.assert_close(item["image"], base["image"])
            torch.testing.assert_close(item["mask"], base["mask"])
        else:
            flipped += 1
            assert item["sentence"] == swap_left_right(base["sentence"])
            assert ("left" in item["sentence"]) != ("left" in base["sentence"])
            torch.testing.assert_close(item["image"], base["image"].flip(-1))
            torch.testing.assert_close(item["mask"], base["mask"].flip(-1))
            torch.testing.assert_close(item["orig_mask"], base["orig_mask"].flip(-1))
    assert flipped > 0 and kept > 0
    img, mask, text = hflip_sample(base["image"], base["mask"], "the left one")
    assert text == "the right one" and torch.equal(mask, base["mask"].flip(-1))


def test_cache_gives_the_same_items_and_never_a_view_of_itself(synth_root: Path) -> None:
    common = dict(tokenizer=toy_tokenizer, img_size=40, augment=True)
    plain = RefDataset(synth_root, "refcoco", "unc", "train", **common)
    cached = RefDataset(synth_root, "refcoco", "unc", "train", cache=True, **common)
    indices = list(range(min(12, len(plain))))
    for epoch in range(3):  # epoch 0 fills the cache, 1 and 2 read it (other flips)
        plain.set_augment_seed(epoch)
        cached.set_augment_seed(epoch)
        for i in indices:
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, b[key]), (epoch, i, key)
                else:
                    assert value == b[key], (epoch, i, key)
    images = {plain.refs[plain.samples[i].ref_id]["image_id"] for i in indices}
    assert len(cached._image_cache) == len(images) and not plain._image_cache
    assert len(cached._token_cache) >= len({plain.samples[i].sentence for i in indices})
    # What a caller does to an item never reaches the cache.
    cached.set_augment_seed(None)
    cached.augment = False
    item = cached[0]
    for key in ("image", "mask", "orig_mask", "input_ids", "attention_mask"):
        item[key].zero_()
    again = cached[0]
    reference = RefDataset(synth_root, "refcoco", "unc", "train", tokenizer=toy_tokenizer, img_size=40)[0]
    for key in ("image", "mask", "orig_mask", "input_ids", "attention_mask"):
        assert torch.equal(again[key], reference[key]), key


def test_sample_cache_bytes_counts_each_kept_tensor() -> None:
    # 2 images of 3 x 10 x 10 float32; 3 refs on 4 x 5 images (bool original + 10 x 10 bool);
    # 4 sentences of 6 int64 ids and 6 int64 attention values.
    assert sample_cache_bytes(2, 10, [(4, 5)] * 3, 4, 6) == 2 * 1200 + 3 * (20 + 100) + 4 * 6 * 16
    assert sample_cache_bytes(0, 10, [], 0, 6) == 0


def test_cache_bytes_is_what_a_full_cache_holds(synth_root: Path) -> None:
    ds = RefDataset(synth_root, "refcoco", "unc", "val", tokenizer=toy_tokenizer, img_size=24, cache=True)
    for i in range(len(ds)):
        ds[i]
    held = sum(t.numel() * t.element_size() for t in ds._image_cache.values())
    held += sum(orig.nbytes + m.numel() * m.element_size() for orig, m in ds._mask_cache.values())
    held += sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in ds._token_cache.values())
    assert held == ds.cache_bytes()


def test_cache_larger_than_free_memory_is_refused(synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlaligner.data.refer as refer

    need = RefDataset(synth_root, "refcoco", "unc", "train", img_size=128).cache_bytes()  # no cache: not checked
    monkeypatch.setattr(refer, "available_memory_bytes", lambda: 2 * need - 1)
    with pytest.raises(SampleCacheTooLarge, match=r"cache=True would keep about \d+\.\d MiB of samples of split "
                       r"'train' \(\d+ images of 3 x 128 x 128 float32 and \d+ masks\), more than 50% of the "
                       r"\d+\.\d MiB free; the cache is for small sets: turn it off"):
        RefDataset(synth_root, "refcoco", "unc", "train", img_size=128, cache=True)
    monkeypatch.setattr(refer, "available_memory_bytes", lambda: 2 * need)
    RefDataset(synth_root, "refcoco", "unc", "train", img_size=128, cache=True)  # exactly half: accepted
    monkeypatch.setattr(refer, "available_memory_bytes", lambda: None)  # unknown: not refused
    RefDataset(synth_root, "refcoco", "unc", "train", img_size=128, cache=True)


def test_available_memory_is_read_from_the_system() -> None:
    from vlaligner.data.memory import available_memory_bytes

    free = available_memory_bytes()
    if os.path.exists("/proc/meminfo"):  # Linux: MemAvailable, at most the machine's memory
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert isinstance(free, int) and 0 < free <= total
    else:
        assert free is None or free > 0


def test_format_bytes() -> None:
    from vlaligner.data.memory import format_bytes

    assert [format_bytes(n) for n in (812, 3.4 * 2**20, 41.25 * 2**30, 2048)] == ["812 B", "3.4 MiB", "41.2 GiB", "2.0 KiB"]


# ---------------------------------------------------------------------------- collate
def test_collate_batch(synth_root: Path) -> None:
    ds = RefDataset(synth_root, "refcoco", "unc", "train", tokenizer=toy_tokenizer, img_size=32)
    samples = [ds[i] for i in range(5)]
    batch = collate_ref_batch(samples)
    assert batch["image"].shape == (5, 3, 32, 32)
    assert batch["mask"].shape == (5, 32, 32)
    assert batch["input_ids"].shape == (5, 17) and batch["attention_mask"].shape == (5, 17)
    assert batch["orig_size"].shape == (5, 2) and batch["orig_size"].dtype == torch.long
    for key in ("ref_id", "ann_id", "sent_id", "image_id"):
        assert batch[key].dtype == torch.long and batch[key].tolist() == [s[key] for s in samples]
    for key in ("orig_mask", "sentence", "file_name"):
        assert isinstance(batch[key], list) and len(batch[key]) == 5
    assert all(torch.equal(a, s["orig_mask"]) for a, s in zip(batch["orig_mask"], samples))


def test_collate_pads_and_errors() -> None:
    a = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1]), "x": torch.zeros(2), "f": 0.5}
    b = {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1]), "x": torch.zeros(3), "f": 1.5}
    batch = collate_ref_batch([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert isinstance(batch["x"], list)  # unequal shapes that are not token ids stay a list
    assert batch["f"].dtype == torch.float32
    with pytest.raises(ValueError, match="cannot collate an empty batch"):
        collate_ref_batch([])
    with pytest.raises(ValueError, match=r"sample 1 has keys \['a'\], but sample 0 has \['b'\]"):
        collate_ref_batch([{"b": 1}, {"a": 1}])
    with pytest.raises(TypeError, match="every sample must be a dict, got list"):
        collate_ref_batch([[1]])


def test_dataloader_with_workers(synth_root: Path) -> None:
    ds = RefDataset(synth_root, "refcoco", "unc", "val", tokenizer=toy_tokenizer, img_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_ref_batch)
    n = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32)
        n += batch["image"].shape[0]
    assert n == len(ds)


def test_public_surface() -> None:
    import vlaligner.data as data

    for name in data.__all__:
        assert getattr(data, name) is not None
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert DATASET_SPLITS["refcocog"] == {"umd": ("train", "val", "test"), "google": ("train", "val")}
