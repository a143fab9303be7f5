"""Tests of the ``vlaligner`` command (run in-process through ``main([...])``, plus one
subprocess run of ``python -m vlaligner.cli --help``).

Axes: n queries, H W image space.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlaligner.cli import main

IMG = 64
NUM_QUERIES = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_eavl_tiny(img_size=IMG, num_queries=NUM_QUERIES).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    rgb = np.random.default_rng(0).integers(0, 256, size=(97, 131, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    Image.fromarray(rgb).save(path)
    return path


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ segment
def test_segment_writes_overlay_and_query_grid(checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "res" / "overlay.png"
    code = main([
        "segment", "--checkpoint", str(checkpoint), "--image", str(image_file),
        "--text", "the red square on the left", "--out", str(out), "--queries",
        "--mask-out", str(tmp_path / "mask.png"), "--threshold", "0.4",
    ])
    assert code == 0
    stdout = capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (131, 97) and img.mode == "RGB"
    with Image.open(tmp_path / "mask.png") as img:
        assert img.size == (131, 97) and set(np.unique(np.asarray(img))) <= {0, 255}
    grid = out.with_name("overlay_queries.png")
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 50
    # one printed line per query, each with a score and words
    query_lines = [line for line in stdout.splitlines() if line.strip().startswith("query")]
    assert len(query_lines) == NUM_QUERIES
    assert all("score 0." in line and "words:" in line for line in query_lines)
    assert f"({NUM_QUERIES} query panels" in stdout


def test_segment_overlay_matches_predictor(checkpoint, image_file, tmp_path):
    """The overlay differs from the image exactly where the predictor's mask is (tint or border)."""
    from vlaligner import predictor as predictor_module

    out = tmp_path / "o.png"
    assert main(["segment", "--checkpoint", str(checkpoint), "--image", str(image_file),
                 "--text", "a blue circle", "--out", str(out), "--threshold", "0.45"]) == 0
    pred = predictor_module.Predictor.from_pretrained(checkpoint, threshold=0.45).predict(
        image_file, "a blue circle"
    )
    original = np.asarray(Image.open(image_file).convert("RGB"))
    changed = (np.asarray(Image.open(out)) != original).any(axis=2)
    assert not changed[~pred.mask].any()
    assert changed.sum() >= 0.9 * pred.mask.sum()  # tint can leave a few pixels equal by chance


def test_segment_queries_out_option(checkpoint, image_file, tmp_path):
    grid = tmp_path / "deep" / "grid.png"
    assert main(["segment", "--checkpoint", str(checkpoint), "--image", str(image_file),
                 "--text", "shape", "--out", str(tmp_path / "o.png"), "--queries-out", str(grid)]) == 0
    assert grid.is_file() and not (tmp_path / "o_queries.png").exists()


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"--image": "{tmp}/missing.jpg"}, ["image file not found", "missing.jpg"]),
        ({"--image": "{tmp}/notes.png"}, ["unreadable image file", "notes.png"]),
        ({"--text": "  "}, ["empty sentence"]),
        ({"--checkpoint": "{tmp}/nockpt"}, ["checkpoint directory not found", "nockpt"]),
        ({"--checkpoint": "{tmp}"}, ["is missing model.safetensors, config.json"]),
        ({"--out": "{tmp}/out.xyz"}, ["--out", "end it with .png"]),
        ({"--device": "cuda:7"} if torch.cuda.device_count() < 8 else {"--device": "tpu"}, ["cuda:7"]),
        ({"--threshold": "2"}, ["--threshold", "expected a number in [0, 1], got 2.0"]),
        ({"--dtype": "int8"}, ["--dtype", "invalid choice: 'int8'"]),
    ],
)
def test_segment_user_errors_exit_2(checkpoint, image_file, tmp_path, capsys, change, needles):
    (tmp_path / "notes.png").write_text("not an image")
    options = {"--checkpoint": str(checkpoint), "--image": str(image_file),
               "--text": "the box", "--out": str(tmp_path / "o.png")}
    options.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    argv = ["segment"] + [item for pair in options.items() for item in pair]
    assert main(argv) == 2
    line = _one_line_error(capsys, *needles)
    assert line.startswith("vlaligner segment: error:")
    assert not (tmp_path / "o.png").exists()


def test_queries_with_fixed_head_exits_2(image_file, tmp_path, capsys):
    from vlaligner.models import build_eavl_tiny

    fixed = build_eavl_tiny(img_size=IMG, num_queries=2, head="fixed").save_pretrained(tmp_path / "fixed")
    argv = ["segment", "--checkpoint", str(fixed), "--image", str(image_file), "--text", "a box",
            "--out", str(tmp_path / "o.png")]
    assert main(argv + ["--queries"]) == 2
    _one_line_error(capsys, "--queries: the checkpoint", "fixed-kernel head", "without --queries")
    assert main(argv) == 0 and (tmp_path / "o.png").is_file()


def test_missing_required_option_exits_2(capsys):
    assert main(["segment", "--image", "x.png"]) == 2
    _one_line_error(capsys, "required", "--checkpoint", "--text", "--out")
    assert main(["nonsense"]) == 2
    _one_line_error(capsys, "invalid choice: 'nonsense'")


# ------------------------------------------------------------------ help and info
@pytest.mark.parametrize("command", [[], ["segment"], ["synth"], ["info"], ["version"], ["export"]])
def test_help_complete(command, capsys):
    assert main(command + ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlaligner")
    if not command:
        for name in ("segment", "synth", "train", "evaluate", "info", "version", "export"):
            assert name in out
    if command == ["segment"]:
        for option in ("--checkpoint", "--image", "--text", "--out", "--queries", "--queries-out",
                       "--device", "--dtype", "--threshold", "--image-dir", "--texts", "--out-dir",
                       "--batch-size", "--compile"):
            assert option in out
    if command == ["export"]:
        for option in ("--checkpoint", "--onnx", "--opset", "--overwrite", "--no-check"):
            assert option in out


def test_python_m_help_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "vlaligner.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "segment" in result.stdout and "usage: vlaligner" in result.stdout


def test_version_and_info(checkpoint, capsys):
    import vlaligner

    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == vlaligner.__version__
    assert main(["info", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f"vlaligner {vlaligner.__version__}" in out
    assert f"model: builder eavl_tiny, img_size {IMG}, num_queries {NUM_QUERIES}, head aligner" in out
    assert main(["info", "--checkpoint", str(checkpoint / "nothere")]) == 2
    _one_line_error(capsys, "checkpoint directory not found")


# ------------------------------------------------------------------ synth
def test_synth_forwards_to_generator(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--images", "4", "--seed", "3", "--image-size", "64"]) == 0
    assert (out / "refcoco" / "refs(unc).p").is_file()
    images = sorted((out / "images" / "mscoco" / "images" / "train2014").glob("*.jpg"))
    assert len(images) == 4
    with Image.open(images[0]) as img:
        assert img.size == (64, 64)
    assert "4 images" in capsys.readouterr().out
    assert main(["synth", str(tmp_path / "s2"), "--images", "2"]) == 2
    _one_line_error(capsys, "num_images must be an int >= 4")
    assert main(["synth", str(tmp_path / "s3"), "--images", "zero"]) == 2
    _one_line_error(capsys, "--images", "expected a positive integer, got 'zero'")


# ------------------------------------------------------------------ train / evaluate
def test_train_and_evaluate_run_the_training_package(tmp_path, capsys):
    # No checkout needed: the commands are vlaligner.training's, with their own prog name.
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: vlaligner train" in out and "--recipe" in out
    assert main(["evaluate", "--help"]) == 0
    assert "usage: vlaligner evaluate" in capsys.readouterr().out
    # a usage mistake: one line naming the option, exit 2, nothing built
    assert main(["train", "--dataset", "coco", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "vlaligner train: error: unknown --dataset 'coco'" in err
    assert not (tmp_path / "o").exists()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
