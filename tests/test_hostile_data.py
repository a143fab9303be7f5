"""Hostile data folders: RefDataset validates at build time, check_data lists every problem (issue 13).

Table-driven. Each case copies a small synthetic RefCOCO folder, breaks it in one way,
and states the outcome: the right result, or an error of the expected type whose message
names the file and the ref / sentence / annotation ids. No case may change a file of the
folder (hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest

from vlaligner.cli import main
from vlaligner.data import RefDataset, UnsafePickleError, check_data, generate_synthetic_refcoco

REFS = Path("refcoco") / "refs(unc).p"
INST = Path("refcoco") / "instances.json"
IMG_DIR = Path("images") / "mscoco" / "images" / "train2014"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "data"
    generate_synthetic_refcoco(root, num_images=6, image_size=64)
    return root


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(pristine, target)
    return target


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _refs(root):
    return pickle.loads((root / REFS).read_bytes())


def _set_refs(root, refs):
    (root / REFS).write_bytes(pickle.dumps(refs, protocol=2))


def _inst(root):
    return json.loads((root / INST).read_text())


def _set_inst(root, inst):
    (root / INST).write_text(json.dumps(inst))


def _first(refs, split="train"):
    return next(r for r in refs if r["split"] == split)


def _edit_refs(fn):
    def mutate(root):
        refs = _refs(root)
        fn(refs)
        _set_refs(root, refs)
    return mutate


def _edit_ann(fn):
    def mutate(root):
        ref = _first(_refs(root))
        inst = _inst(root)
        ann = next(a for a in inst["annotations"] if a["id"] == ref["ann_id"])
        fn(ann)
        _set_inst(root, inst)
    return mutate


def _edit_image(fn):
    def mutate(root):
        ref = _first(_refs(root))
        inst = _inst(root)
        fn(next(im for im in inst["images"] if im["id"] == ref["image_id"]))
        _set_inst(root, inst)
    return mutate


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _dup_ref(refs):
    first = _first(refs)
    other = [r for r in refs if r["split"] == "train" and r is not first][0]
    other["ref_id"] = first["ref_id"]


def _all_val_empty(refs):
    for r in refs:
        if r["split"] == "val":
            for s in r["sentences"]:
                s["raw"] = s["sent"] = ""


# (id, mutate(root), split, expected exception, regex of the message)
DATASET_ERRORS = [
    ("ann-without-segmentation", _edit_ann(lambda a: a.pop("segmentation")), "train", ValueError,
     r"instances.json: annotation \d+ \(of ref \d+ \(sentences \[\d+, .*\]\)\) has no 'segmentation'"),
    ("ann-segmentation-str", _edit_ann(lambda a: a.update(segmentation="polygon")), "train", ValueError,
     r"instances.json: annotation \d+ .*neither polygons nor an RLE"),
    ("ann-two-point-polygon", _edit_ann(lambda a: a.update(segmentation=[[1, 2, 3, 4]])), "train", ValueError,
     r"annotation \d+ .*fewer than 3 points"),
    ("ann-on-other-image", _edit_ann(lambda a: a.update(image_id=999)), "train", ValueError,
     r"annotation \d+ is on image 999, but .*refs\(unc\).p says ref \d+"),
    ("ref-to-missing-annotation", _edit_refs(lambda refs: _first(refs).update(ann_id=99999)), "train", ValueError,
     r"refs\(unc\).p: ref \d+ \(sentences \[.*\]\) points to annotation 99999, which .*instances.json does not have"),
    ("ref-to-missing-image", _edit_refs(lambda refs: _first(refs).update(image_id=88888)), "train", ValueError,
     r"refs\(unc\).p: ref \d+ .* points to image 88888"),
    ("ref-without-sentences-key", _edit_refs(lambda refs: _first(refs).pop("sentences")), "train", ValueError,
     r"refs file .*refs\(unc\).p: entry \d+ must be a dict with keys .*; ref_id \d+ has no \['sentences'\]"),
    ("ref-id-not-int", _edit_refs(lambda refs: _first(refs).update(ref_id="seven")), "train", ValueError,
     r"refs\(unc\).p: ref 'seven' \(entry \d+\): ref_id must be an integer id"),
    ("sentence-id-not-int", _edit_refs(lambda refs: _first(refs)["sentences"][0].update(sent_id="abc")), "train", ValueError,
     r"refs\(unc\).p: ref \d+ \(entry \d+\): sentence 0 has sent_id 'abc'"),
    ("sentence-without-text", _edit_refs(lambda refs: _first(refs)["sentences"].__setitem__(0, {"sent_id": 5})), "train", ValueError,
     r"ref \d+ \(entry \d+\): sentence 0 has no 'sent_id' and 'raw'/'sent'"),
    ("duplicate-ref-id", _edit_refs(_dup_ref), "train", ValueError, r"refs\(unc\).p: ref \d+ appears twice"),
    ("all-sentences-empty", _edit_refs(_all_val_empty), "val", ValueError, r"refs\(unc\).p has \d+ refs but no non-empty sentences"),
    ("unsafe-file-name", _edit_image(lambda im: im.update(file_name="../../secret.jpg")), "train", ValueError,
     r"instances.json: image \d+ \(of ref \d+ .*\) has file_name '../../secret.jpg'"),
    ("negative-height", _edit_image(lambda im: im.update(height=-5)), "train", ValueError, r"image \d+ .*has height -5, not a positive integer"),
    ("truncated-instances", lambda root: (root / INST).write_text((root / INST).read_text()[:200]), "train", ValueError,
     r"cannot parse .*instances.json \(truncated or not JSON\?\)"),
    ("instances-a-list", lambda root: (root / INST).write_text("[]"), "train", ValueError, r"instances.json must be a COCO instances dict .*got list"),
    ("annotation-without-id", lambda root: _set_inst(root, {**_inst(root), "annotations": [{"segmentation": []}]}), "train", ValueError,
     r"instances.json: annotations\[0\] must be a dict with an integer 'id'"),
    ("refs-not-a-list", lambda root: _set_refs(root, {"refs": []}), "train", ValueError, r"refs\(unc\).p must hold a list of ref dicts, got dict"),
    ("refs-truncated", lambda root: (root / REFS).write_bytes((root / REFS).read_bytes()[:50]), "train", ValueError, r"cannot read refs file .*refs\(unc\).p as a pickle"),
    ("refs-malicious-pickle", lambda root: (root / REFS).write_bytes(pickle.dumps([_Evil()])), "train", UnsafePickleError, r"refusing to load .*refs\(unc\).p"),
    ("refs-file-missing", lambda root: (root / REFS).unlink(), "train", FileNotFoundError, r"refs file not found: .*refs\(unc\).p"),
    ("image-folder-missing", lambda root: shutil.rmtree(root / IMG_DIR), "train", FileNotFoundError, r"image folder not found"),
]


@pytest.mark.parametrize("name, mutate, split, exc, match", DATASET_ERRORS, ids=[c[0] for c in DATASET_ERRORS])
def test_refdataset_refuses_bad_data_at_build_naming_ids(root, name, mutate, split, exc, match):
    mutate(root)
    before = _hashes(root)
    with pytest.raises(exc, match=match):
        RefDataset(root, "refcoco", "unc", split)
    assert _hashes(root) == before


def test_refdataset_error_suggests_check_data_and_counts(root):
    refs = _refs(root)
    for r in refs:
        if r["split"] == "train":
            r["ann_id"] = 70000 + r["ref_id"]
    _set_refs(root, refs)
    n = sum(r["split"] == "train" for r in refs)
    with pytest.raises(ValueError, match=rf"(?s){n} problem\(s\) in split 'train'.*and {n - 5} more.*vlaligner check-data"):
        RefDataset(root, "refcoco", "unc", "train")


def test_empty_sentences_are_skipped_with_one_warning(root, pristine):
    refs = _refs(root)
    ref = _first(refs)
    ref["sentences"][0]["raw"] = "   "
    ref["sentences"][0]["sent"] = ""
    ref["sentences"][1]["raw"] = ""  # falls back to 'sent', which is non-empty: kept
    _set_refs(root, refs)
    full = len(RefDataset(pristine, "refcoco", "unc", "train"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = RefDataset(root, "refcoco", "unc", "train")
    messages = [str(w.message) for w in caught if "empty sentence" in str(w.message)]
    assert len(messages) == 1
    assert f"skipped 1 empty sentence(s) of split 'train' (ref {ref['ref_id']} sentence {ref['sentences'][0]['sent_id']})" in messages[0]
    assert len(ds) == full - 1
    assert ds.skipped_sentences == [(ref["ref_id"], ref["sentences"][0]["sent_id"])]
    assert all(s.sentence.strip() for s in ds.samples)
    assert (ref["ref_id"], ref["sentences"][1]["sent_id"], ref["sentences"][1]["sent"]) in [tuple(s) for s in ds.samples]


def test_clean_folder_loads(root):
    sizes = {s: len(RefDataset(root, "refcoco", "unc", s)) for s in ("train", "val", "testA", "testB")}
    refs = _refs(root)
    for split, size in sizes.items():
        assert size == sum(len(r["sentences"]) for r in refs if r["split"] == split)


# ------------------------------------------------------------------ check_data
def _delete_first_image(root):
    ref = _first(_refs(root))
    name = next(im["file_name"] for im in _inst(root)["images"] if im["id"] == ref["image_id"])
    (root / IMG_DIR / name).unlink()


def _truncate_first_image(root):
    ref = _first(_refs(root))
    name = next(im["file_name"] for im in _inst(root)["images"] if im["id"] == ref["image_id"])
    path = root / IMG_DIR / name
    path.write_bytes(path.read_bytes()[:300])


def _empty_sentence(refs):
    _first(refs, "val")["sentences"][0].update(raw="", sent=" ")


def _several(root):
    _delete_first_image(root)
    _edit_refs(_empty_sentence)(root)
    _edit_refs(lambda refs: _first(refs, "testA").update(ann_id=4242))(root)


# (id, mutate, problem kinds expected (all must appear), regex one problem line must match)
CHECK_CASES = [
    ("clean", lambda root: None, [], None),
    ("missing-image-file", _delete_first_image, ["missing image file"], r"\[missing image file\] .*COCO_train2014_\d+\.jpg: image \d+ of ref\(s\) \[\d+"),
    ("truncated-image-file", _truncate_first_image, ["undecodable image"], r"\[undecodable image\] .*\.jpg: image \d+ of ref\(s\)"),
    ("image-size-mismatch", _edit_image(lambda im: im.update(width=65)), ["image size mismatch"], r"is 64x64 \(w x h\) but instances.json says 65x64"),
    ("empty-sentence", _edit_refs(_empty_sentence), ["empty sentence"], r"\[empty sentence\] .*refs\(unc\).p: ref \d+ sentence \d+ is empty"),
    ("missing-annotation", _edit_refs(lambda refs: _first(refs).update(ann_id=4242)), ["missing annotation"], r"ref \d+ points to annotation 4242"),
    ("ann-without-segmentation", _edit_ann(lambda a: a.pop("segmentation")), ["malformed annotation"], r"annotation \d+ \(of ref \d+\) has no 'segmentation'"),
    ("unknown-split", _edit_refs(lambda refs: _first(refs).update(split="training")), ["unknown split"], r"split 'training', expected one of \['train', 'val', 'testA', 'testB'\]"),
    ("duplicate-ref", _edit_refs(_dup_ref), ["duplicate ref id"], r"appears more than once"),
    ("malformed-ref", _edit_refs(lambda refs: _first(refs).pop("image_id")), ["malformed ref"], r"has no \['image_id'\]"),
    ("empty-split", _edit_refs(lambda refs: [r.update(split="train") for r in refs if r["split"] == "testB"]), ["empty split"], r"split 'testB' has no refs"),
    ("missing-instances", lambda root: (root / INST).unlink(), ["missing file"], r"instances.json: the annotation file of refcoco \(unc\) is missing"),
    ("missing-refs", lambda root: (root / REFS).unlink(), ["missing file"], r"refs\(unc\).p: the refs file"),
    ("unreadable-refs", lambda root: (root / REFS).write_bytes(b"not a pickle"), ["unreadable file"], r"cannot read refs file"),
    ("unreadable-instances", lambda root: (root / INST).write_text("{"), ["unreadable file"], r"cannot parse"),
    ("missing-image-folder", lambda root: shutil.rmtree(root / IMG_DIR), ["missing folder"], r"train2014: the COCO train2014 image folder is missing"),
    ("several-at-once", _several, ["missing image file", "empty sentence", "missing annotation"], None),
]


@pytest.mark.parametrize("name, mutate, kinds, line", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_check_data_finds_every_problem_in_one_pass(root, name, mutate, kinds, line):
    mutate(root)
    before = _hashes(root)
    report = check_data(root, "refcoco", "unc")
    assert _hashes(root) == before
    assert sorted({p.kind for p in report.problems}) == sorted(set(kinds)), report.format()
    assert report.ok == (not kinds)
    text = report.format()
    if line:
        import re

        assert any(re.search(line, str(p)) for p in report.problems), text
    if not kinds:
        assert "OK: no problems found" in text and report.checked_images == 6 and report.checked_masks == len(_refs(root))


def test_check_data_counts_match_refdataset(root):
    report = check_data(root, "refcoco")
    for split in ("train", "val", "testA", "testB"):
        ds = RefDataset(root, "refcoco", "unc", split)
        assert report.counts[split]["sentences"] == len(ds)
        assert report.counts[split]["refs"] == len(ds.refs)
        assert report.counts[split]["images"] == len(ds.images)


def test_check_data_empty_mask_is_a_warning(root):
    _edit_ann(lambda a: a.update(segmentation=[[10, 10, 10, 10, 10, 10]]))(root)
    report = check_data(root, "refcoco")
    assert report.ok and [w.kind for w in report.warnings] == ["empty mask"]


def test_check_data_no_decode_skips_decoding(root):
    _truncate_first_image(root)
    quick = check_data(root, "refcoco", decode=False)
    assert quick.ok and quick.checked_images == 0 and quick.checked_masks == 0
    assert not check_data(root, "refcoco").ok


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset="coco"), r"unknown dataset 'coco'"),
    (dict(dataset="refcoco", split_by="umd"), r"unknown split_by 'umd' for refcoco"),
])
def test_check_data_usage_errors(root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_data(root, **kwargs)


# ------------------------------------------------------------------ the command
@pytest.mark.parametrize("mutate, args, code, out_needles, err_needles", [
    (lambda root: None, [], 0, ["train", "total", "OK: no problems found"], []),
    (_several, [], 1, ["FAILED: 3 problem(s)", "[missing image file]", "[empty sentence]", "[missing annotation]"], []),
    (_several, ["--max-listed", "1", "--no-decode"], 1, ["FAILED: 3 problem(s)"], []),
    (lambda root: None, ["--split-by", "google"], 2, [], ["vlaligner check-data: error: unknown split_by 'google'"]),
    (lambda root: shutil.rmtree(root), [], 2, [], ["vlaligner check-data: error: ROOT", "is not a folder"]),
], ids=["clean", "broken", "broken-quick", "bad-split-by", "missing-root"])
def test_check_data_command(root, capsys, mutate, args, code, out_needles, err_needles):
    mutate(root)
    before = _hashes(root) if root.exists() else {}
    assert main(["check-data", str(root), "--dataset", "refcoco", *args]) == code
    captured = capsys.readouterr()
    for needle in out_needles:
        assert needle in captured.out, captured.out
    for needle in err_needles:
        assert needle in captured.err, captured.err
    if code == 2:
        assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert (_hashes(root) if root.exists() else {}) == before


def test_check_data_command_knows_every_dataset():
    from vlaligner.cli import build_parser
    from vlaligner.data import DATASET_SPLITS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    dataset = next(a for a in sub.choices["check-data"]._actions if a.dest == "dataset")
    assert sorted(dataset.choices) == sorted(DATASET_SPLITS)  # the classic sets and gRefCOCO


# ------------------------------------------------------------------ check_data on gRefCOCO
@pytest.fixture()
def groot(tmp_path):
    from vlaligner.data import generate_synthetic_grefcoco

    return generate_synthetic_grefcoco(tmp_path / "g", num_images=6, seed=0)


def _grefs(groot):
    return json.loads((groot / "grefcoco" / "grefs(unc).json").read_text())


def test_check_data_grefcoco_counts_match_refdataset(groot):
    report = check_data(groot, "grefcoco")
    assert report.ok, report.format()
    refs = _grefs(groot)
    for split in report.counts:
        ds = RefDataset(groot, "grefcoco", "unc", split)
        assert report.counts[split]["sentences"] == len(ds) and report.counts[split]["refs"] == len(ds.refs)
        assert report.counts[split]["no-target"] == sum(1 for r in refs if r["split"] == split and r["ann_id"] == [-1])
    assert sum(c["no-target"] for c in report.counts.values()) > 0
    # every target annotation of every ref is decoded (no-target refs have none)
    assert report.checked_masks == sum(len(r["ann_id"]) for r in refs if r["ann_id"] != [-1])
    assert "no-target" in report.format() and "OK: no problems found" in report.format()


def test_check_data_grefcoco_lists_bad_ann_id_lists(groot):
    refs = _grefs(groot)
    multi = next(r for r in refs if len(r["ann_id"]) > 1)
    multi["ann_id"] = [multi["ann_id"][0], 987654]   # one target that instances.json lacks
    refs[0]["ann_id"] = [-1, refs[0]["ann_id"][0]] if refs[0]["ann_id"] != [-1] else [-1, 5]  # -1 beside ids
    (groot / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    report = check_data(groot, "grefcoco")
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["malformed ref", "missing annotation"], report.format()
    text = report.format()
    assert "987654" in text and "mixes -1 (no target)" in text


def test_check_data_command_grefcoco(groot, capsys):
    from vlaligner.cli import main as cli_main

    assert cli_main(["check-data", str(groot), "--dataset", "grefcoco"]) == 0
    out = capsys.readouterr().out
    assert "check-data: grefcoco (unc)" in out and "no-target" in out and "OK: no problems found" in out
