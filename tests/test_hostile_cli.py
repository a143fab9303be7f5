"""Hostile images, checkpoint folders and command lines (issue 13).

Table-driven. Each case states the outcome: the right result (checked against a
reference), or an error of the expected type whose message names the offending file or
argument (for the CLI: one line on stderr, exit status 2, no traceback). No case may change
a file the user owns (hashed before and after).

Axes: H W image space, n queries.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlaligner.cli import main
from vlaligner.data import load_image, pil_to_rgb
from vlaligner.predictor import Predictor, as_rgb_array

IMG = 64


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_eavl_tiny(img_size=IMG, num_queries=3).save_pretrained(directory)
    return directory


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_pretrained(checkpoint)


def _rgb(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ====================================================================== image modes
GREY = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10


def _rgba(alpha):
    arr = np.zeros((4, 6, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, alpha
    return arr


def _blend(colour, alpha):  # colour over white, as a viewer shows it
    return np.round(colour * alpha / 255 + 255 * (1 - alpha / 255))


# (id, PIL image, expected (H W 3) uint8 array)
MODE_CASES = [
    ("I;16-is-scaled-not-clipped", Image.fromarray(GREY.astype(np.uint16) * 257), np.repeat(GREY[..., None], 3, 2)),
    ("I-16-bit-range", Image.fromarray(GREY.astype(np.int32) * 257), np.repeat(GREY[..., None], 3, 2)),
    ("F-unit-range", Image.fromarray(GREY.astype(np.float32) / 255), np.repeat(GREY[..., None], 3, 2)),
    ("F-wide-range-stretched", Image.fromarray(GREY.astype(np.float32) * 100 - 5000), np.repeat(np.round((GREY.astype(float) - GREY.min()) * 255 / (GREY.max() - GREY.min()))[..., None], 3, 2)),
    ("L", Image.fromarray(GREY), np.repeat(GREY[..., None], 3, 2)),
    ("1", Image.fromarray(GREY > 100).convert("1"), np.repeat(((GREY > 100) * 255)[..., None], 3, 2)),
    ("P-palette-expanded", Image.fromarray(_rgb(4, 6)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), None),
    ("RGBA-transparent-is-white", Image.fromarray(_rgba(0)), np.full((4, 6, 3), 255)),
    ("RGBA-opaque-keeps-colour", Image.fromarray(_rgba(255)), np.broadcast_to([200, 0, 0], (4, 6, 3))),
    ("RGBA-half-blended", Image.fromarray(_rgba(128)), np.broadcast_to([_blend(200, 128), _blend(0, 128), _blend(0, 128)], (4, 6, 3))),
    ("LA-transparent-is-white", Image.merge("LA", [Image.fromarray(GREY), Image.new("L", (6, 4), 0)]), np.full((4, 6, 3), 255)),
    ("PA-transparent-is-white", Image.merge("LA", [Image.fromarray(GREY), Image.new("L", (6, 4), 0)]).convert("RGBA").convert("PA"), np.full((4, 6, 3), 255)),
    ("CMYK-cyan", Image.new("CMYK", (6, 4), (255, 0, 0, 0)), np.broadcast_to([0, 255, 255], (4, 6, 3))),
]


@pytest.mark.parametrize("name, image, expected", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_becomes_the_picture_a_viewer_shows(name, image, expected):
    out = as_rgb_array(image)
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    if expected is None:  # palette: the palette colours, expanded
        expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(out, np.asarray(expected, dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(pil_to_rgb(image)), out)  # one rule for data and predictor


def test_palette_with_transparency_and_rgba_array_match_the_file(tmp_path):
    arr = _rgba(0)
    arr[0, 0, 3] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    from_file = np.asarray(load_image(tmp_path / "a.png"))
    np.testing.assert_array_equal(as_rgb_array(arr), from_file)
    assert from_file[0, 0].tolist() == [200, 0, 0] and from_file[1, 1].tolist() == [255, 255, 255]
    pal = Image.fromarray(arr).convert("P")  # RGBA -> P keeps a transparent index
    pal.save(tmp_path / "p.png", transparency=pal.getpixel((1, 1)))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "p.png"))[1, 1], [255, 255, 255])


def test_16_bit_png_equals_its_8_bit_picture(predictor, tmp_path):
    grey = _rgb(37, 53)[..., 0]
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(grey).save(tmp_path / "flat.png")
    np.testing.assert_array_equal(as_rgb_array(tmp_path / "deep.png"), as_rgb_array(tmp_path / "flat.png"))
    a = predictor.predict(tmp_path / "deep.png", "the square").probability
    np.testing.assert_allclose(a, predictor.predict(tmp_path / "flat.png", "the square").probability, atol=1e-6)


# ====================================================================== EXIF
def _exif_photo(path: Path, orientation: int = 6) -> np.ndarray:
    """A 20 x 30 (H x W) JPEG with an EXIF orientation tag; red band on the stored left."""
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)  # red band on the stored left
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    return rgb


@pytest.mark.parametrize("orientation, shape", [(1, (20, 30)), (3, (20, 30)), (6, (30, 20)), (8, (30, 20))])
def test_predictor_reader_applies_exif_and_data_loader_keeps_stored_grid(tmp_path, orientation, shape):
    path = tmp_path / "photo.jpg"
    _exif_photo(path, orientation)
    before = _sha(path)
    upright = as_rgb_array(path)
    assert upright.shape[:2] == shape
    assert as_rgb_array(path, exif_transpose=False).shape[:2] == (20, 30)
    assert load_image(path).size == (30, 20)  # RefDataset's reader: stored grid (COCO polygons)
    if orientation == 6:  # rotated 90 degrees clockwise for display: the red band is on top
        assert upright[2, 10, 0] > 200 and upright[-3, 10, 0] < 60
    assert _sha(path) == before


def test_predictor_exif_switch(predictor, checkpoint, tmp_path):
    path = tmp_path / "photo.jpg"
    _exif_photo(path, 6)
    assert predictor.predict(path, "the red band").mask.shape == (30, 20)
    stored = Predictor.from_pretrained(checkpoint, exif_transpose=False)
    assert stored.predict(path, "the red band").mask.shape == (20, 30)
    with pytest.raises(TypeError, match="exif_transpose must be a bool, got str"):
        Predictor.from_pretrained(checkpoint, exif_transpose="no")


# ====================================================================== bombs and broken files
def test_decompression_bomb_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for reader in (load_image, as_rgb_array):
        with pytest.raises(ValueError, match=r"bomb.png is too large to decode safely \(a decompression bomb\?\)"):
            reader(path)


@pytest.mark.parametrize("make, exc, match", [
    (lambda p: p.write_bytes(b""), ValueError, r"corrupt or unreadable image file .*x.png"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20), ValueError, r"corrupt or unreadable image file .*x.png"),
    (lambda p: p.mkdir(), ValueError, r"expected an image file, got a directory: .*x.png"),
    (lambda p: None, FileNotFoundError, r"image file not found: .*x.png"),
], ids=["empty-file", "truncated-png", "directory", "missing"])
def test_broken_image_files(tmp_path, make, exc, match):
    make(tmp_path / "x.png")
    with pytest.raises(exc, match=match):
        as_rgb_array(tmp_path / "x.png")


# ====================================================================== checkpoints
def _edit_config(fn):
    def mutate(d: Path):
        config = json.loads((d / "config.json").read_text())
        fn(config)
        (d / "config.json").write_text(json.dumps(config))
    return mutate


def _truncate_weights_keep_hash(d: Path):
    data = (d / "model.safetensors").read_bytes()[:1000]
    (d / "model.safetensors").write_bytes(data)
    _edit_config(lambda c: c.update(weights_sha256=hashlib.sha256(data).hexdigest()))(d)


def _flip_byte(d: Path):
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-10] ^= 1
    (d / "model.safetensors").write_bytes(bytes(data))


# (id, mutate(folder), expected exception, regex of EAVL's message; every message names the
# file at fault, the Predictor's too (its own first check words missing files differently))
CHECKPOINT_CASES = [
    ("missing-hash", _edit_config(lambda c: c.pop("weights_sha256")), ValueError, r"config.json has no valid 'weights_sha256' \(got None\)"),
    ("hash-not-a-hash", _edit_config(lambda c: c.update(weights_sha256=12)), ValueError, r"config.json has no valid 'weights_sha256' \(got 12\)"),
    ("tampered-weights", _flip_byte, ValueError, r"model.safetensors does not match the SHA-256 recorded in .*config.json"),
    ("truncated-weights-rehashed", _truncate_weights_keep_hash, ValueError, r"model.safetensors is not a readable safetensors file"),
    ("truncated-config", lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:40]), ValueError, r"config.json is not valid JSON \(truncated or edited\?\)"),
    ("empty-config", lambda d: (d / "config.json").write_text(""), ValueError, r"config.json is not valid JSON"),
    ("config-a-list", lambda d: (d / "config.json").write_text("[1, 2]"), ValueError, r"config.json must be a JSON object with 'builder' \(str\) and 'kwargs'"),
    ("config-kwargs-a-list", _edit_config(lambda c: c.update(kwargs=[1])), ValueError, r"config.json must be a JSON object"),
    ("unknown-builder", _edit_config(lambda c: c.update(builder="eavl_huge")), ValueError, r"config.json names builder 'eavl_huge', which .* does not know"),
    ("unknown-backbone", _edit_config(lambda c: c["kwargs"].update(backbone="no_such_net")), ValueError, r"config.json: backbone 'no_such_net' is not a model this timm .* knows"),
    ("unknown-kwarg", _edit_config(lambda c: c["kwargs"].update(wings=2)), ValueError, r"config.json: builder 'eavl_tiny' does not accept the recorded arguments \['wings'\]"),
    ("asks-to-download", _edit_config(lambda c: c["kwargs"].update(pretrained=True)), ValueError, r"config.json: kwargs must not hold 'pretrained' \(from_pretrained never downloads"),
    ("future-format", _edit_config(lambda c: c.update(format_version=99)), ValueError, r"config.json has format_version 99"),
    ("no-weights", lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, r"has no model.safetensors"),
    ("pickle-instead", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), ValueError, r"holds pickle files \['pytorch_model.bin'\] but no model.safetensors: vlaligner never loads pickles"),
    ("no-tokenizer", lambda d: shutil.rmtree(d / "tokenizer"), FileNotFoundError, r"has no tokenizer/ folder"),
    ("no-text-config", lambda d: (d / "text_config" / "config.json").unlink(), FileNotFoundError, r"text_config has no config.json"),
    ("no-config", lambda d: (d / "config.json").unlink(), FileNotFoundError, r"has no config.json"),
]


@pytest.mark.parametrize("name, mutate, exc, match", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_load_paths_refuse_damaged_folders(ckpt_copy, name, mutate, exc, match):
    from vlaligner.models import EAVL

    mutate(ckpt_copy)
    before = _tree(ckpt_copy)
    for load in (EAVL.check_pretrained, EAVL.from_pretrained):
        with pytest.raises(exc, match=match):
            load(ckpt_copy)
    named = re.search(r"(config\.json|model\.safetensors|tokenizer|text_config)", match).group(1).replace("\\", "")
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(named)):
        Predictor.from_pretrained(ckpt_copy)
    assert _tree(ckpt_copy) == before


def test_diverged_weights_are_refused(tmp_path):
    from vlaligner.models import EAVL, build_eavl_tiny

    model = build_eavl_tiny(img_size=IMG, num_queries=3)
    with torch.no_grad():
        model.head.estimator.score.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")  # hash recorded: the file is intact, its values are not
    with pytest.raises(ValueError, match=r"model.safetensors: 1 tensor\(s\) hold NaN or inf values, first: \['head.estimator.score.weight'\]"):
        EAVL.from_pretrained(tmp_path / "nan")


def test_checkpoint_path_is_a_file(checkpoint):
    from vlaligner.models import EAVL

    with pytest.raises(FileNotFoundError, match=r"model.safetensors' is a file, not a folder"):
        EAVL.from_pretrained(checkpoint / "model.safetensors")


def test_from_pretrained_never_reaches_the_network(checkpoint, monkeypatch):
    from vlaligner.models import EAVL

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = EAVL.from_pretrained(checkpoint)
    assert model.num_queries == 3


# ====================================================================== the segment / info commands
@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "user" / "photo.png"
    path.parent.mkdir()
    Image.fromarray(_rgb()).save(path)
    (path.parent / "notes.txt").write_text("mine")
    return path


def _seg(checkpoint, image, out, *extra):
    return ["segment", "--checkpoint", str(checkpoint), "--image", str(image), "--text", "the dog", "--out", str(out), *extra]


def _bomb(photo, monkeypatch, ckpt):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)


# (id, argv(checkpoint, photo, ckpt_copy), prepare(photo, monkeypatch, ckpt_copy), needles of the one error line)
CLI_ERRORS = [
    ("out-is-the-image", lambda c, p, k: _seg(c, p, p), None, ["--out", "is the same file as --image", "refusing to overwrite an input"]),
    ("out-is-the-image-via-dotdot", lambda c, p, k: _seg(c, p, p.parent / ".." / p.parent.name / p.name), None, ["is the same file as --image"]),
    ("out-is-a-link-to-the-image", lambda c, p, k: _seg(c, p, p.parent / "link.png"), lambda p, m, k: (p.parent / "link.png").symlink_to(p), ["--out", "same file as --image"]),
    ("mask-out-is-the-image", lambda c, p, k: _seg(c, p, p.parent / "o.png", "--mask-out", str(p)), None, ["--mask-out", "same file as --image"]),
    ("mask-out-equals-out", lambda c, p, k: _seg(c, p, p.parent / "o.png", "--mask-out", str(p.parent / "o.png")), None, ["--out and --mask-out are the same file"]),
    ("queries-out-equals-out", lambda c, p, k: _seg(c, p, p.parent / "o.png", "--queries-out", str(p.parent / "o.png")), None, ["--out and --queries-out are the same file"]),
    ("out-under-a-file", lambda c, p, k: _seg(c, p, p / "o.png"), None, ["--out", "photo.png' is a file, not a folder"]),
    ("out-under-a-file-deep", lambda c, p, k: _seg(c, p, p.parent / "notes.txt" / "a" / "o.png"), None, ["notes.txt' is a file, not a folder"]),
    ("out-is-a-folder", lambda c, p, k: _seg(c, p, p.parent), None, ["cannot tell the image format"]),
    ("image-missing", lambda c, p, k: _seg(c, p.parent / "nope.png", p.parent / "o.png"), None, ["image file not found", "nope.png"]),
    ("image-is-a-folder", lambda c, p, k: _seg(c, p.parent, p.parent / "o.png"), None, ["expected an image file, got a directory"]),
    ("image-corrupt", lambda c, p, k: _seg(c, p.parent / "notes.txt", p.parent / "o.png"), None, ["corrupt or unreadable image file", "notes.txt"]),
    ("image-bomb", lambda c, p, k: _seg(c, p, p.parent / "o.png"), _bomb, ["photo.png is too large to decode safely", "decompression bomb"]),
    ("checkpoint-missing", lambda c, p, k: _seg(p.parent / "none", p, p.parent / "o.png"), None, ["checkpoint directory not found", "none"]),
    ("checkpoint-not-a-checkpoint", lambda c, p, k: _seg(p.parent, p, p.parent / "o.png"), None, ["is missing model.safetensors, config.json"]),
    ("checkpoint-unknown-backbone", lambda c, p, k: _seg(k, p, p.parent / "o.png"), lambda p, m, k: _edit_config(lambda c: c["kwargs"].update(backbone="no_such_net"))(k), ["config.json: backbone 'no_such_net' is not a model"]),
    ("checkpoint-tampered", lambda c, p, k: _seg(k, p, p.parent / "o.png"), lambda p, m, k: _flip_byte(k), ["does not match the SHA-256"]),
    ("checkpoint-truncated-config", lambda c, p, k: _seg(k, p, p.parent / "o.png"), lambda p, m, k: (k / "config.json").write_text("{"), ["config.json is not valid JSON"]),
    ("empty-sentence", lambda c, p, k: ["segment", "--checkpoint", str(c), "--image", str(p), "--text", "  ", "--out", str(p.parent / "o.png")], None, ["empty sentence"]),
    ("bad-threshold", lambda c, p, k: _seg(c, p, p.parent / "o.png", "--threshold", "2"), None, ["--threshold", "expected a number in [0, 1], got 2.0"]),
    ("info-tampered", lambda c, p, k: ["info", "--checkpoint", str(k)], lambda p, m, k: _flip_byte(k), ["vlaligner info: error:", "does not match the SHA-256"]),
    ("info-missing-hash", lambda c, p, k: ["info", "--checkpoint", str(k)], lambda p, m, k: _edit_config(lambda c: c.pop("weights_sha256"))(k), ["no valid 'weights_sha256'"]),
    ("info-truncated-config", lambda c, p, k: ["info", "--checkpoint", str(k)], lambda p, m, k: (k / "config.json").write_text('{"builder": '), ["config.json is not valid JSON"]),
    ("info-not-a-checkpoint", lambda c, p, k: ["info", "--checkpoint", str(p.parent)], None, ["is missing model.safetensors"]),
]


@pytest.mark.parametrize("name, argv, prepare, needles", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_answers_each_mistake_in_one_line(checkpoint, ckpt_copy, photo, monkeypatch, capsys, name, argv, prepare, needles):
    if prepare:
        prepare(photo, monkeypatch, ckpt_copy)
    before = (_tree(photo.parent), _tree(ckpt_copy))
    assert main(argv(checkpoint, photo, ckpt_copy)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert (_tree(photo.parent), _tree(ckpt_copy)) == before  # nothing written, nothing changed


def test_segment_writes_only_its_outputs_atomically(checkpoint, photo, capsys):
    folder = photo.parent
    before = _tree(folder)
    out, mask = folder / "res" / "overlay.png", folder / "res" / "mask.png"
    assert main(_seg(checkpoint, photo, out, "--mask-out", str(mask), "--queries")) == 0
    after = _tree(folder)
    new = set(after) - set(before)
    assert new == {"res/overlay.png", "res/mask.png", "res/overlay_queries.png"}
    assert {k: after[k] for k in before} == before  # the user's files untouched
    assert not list(folder.rglob(".*tmp*"))  # no temporary file left behind
    assert Image.open(out).size == Image.open(photo).size


def test_segment_exif_default_and_switch(checkpoint, tmp_path, capsys):
    path = tmp_path / "photo.jpg"
    _exif_photo(path, 6)
    assert main(_seg(checkpoint, path, tmp_path / "up.png")) == 0
    assert main(_seg(checkpoint, path, tmp_path / "stored.png", "--no-exif-transpose")) == 0
    assert Image.open(tmp_path / "up.png").size == (20, 30)  # (w, h) upright
    assert Image.open(tmp_path / "stored.png").size == (30, 20)


def test_info_reports_integrity(checkpoint, capsys):
    assert main(["info", "--checkpoint", str(checkpoint)]) == 0
    assert "SHA-256 matches config.json" in capsys.readouterr().out
