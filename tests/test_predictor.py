"""Tests of vlaligner.Predictor on a tiny random EAVL (saved and reloaded from tmp_path).

Axes: b sentences, n queries, l words, H W original image size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlaligner.predictor import (
    Prediction,
    Predictor,
    as_rgb_array,
    check_checkpoint_dir,
    logits_to_probability,
    resolve_device,
    resolve_dtype,
)

IMG = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=IMG, num_queries=4)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_pretrained(checkpoint)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ shapes and sizes
@pytest.mark.parametrize("h, w", [(97, 131), (IMG, IMG), (31, 200)])
def test_outputs_at_original_size(predictor, h, w):
    pred = predictor.predict(_rgb(h, w), "the red square on the left")
    assert isinstance(pred, Prediction)
    assert pred.mask.shape == (h, w) and pred.mask.dtype == np.bool_
    assert pred.probability.shape == (h, w) and pred.probability.dtype == np.float32
    assert 0.0 <= pred.probability.min() and pred.probability.max() <= 1.0
    np.testing.assert_array_equal(pred.mask, pred.probability > predictor.threshold)
    assert pred.sentence == "the red square on the left"
    assert pred.query_masks is None and pred.word_attention is None and pred.tokens is None


def test_matches_the_model_at_its_own_size(predictor):
    """An image already at the model's size: the probabilities are the model's logits,
    bilinearly upsampled and passed through a sigmoid (the same preprocessing as the data)."""
    from vlaligner.data import preprocess_image

    rgb = _rgb(IMG, IMG, seed=3)
    sentence = "the big blue circle"
    pred = predictor.predict(rgb, sentence)
    ids, mask = predictor.model.tokenize([sentence])
    with torch.inference_mode():
        logits = predictor.model(preprocess_image(rgb, IMG)[None], ids, mask).logits
    expected = torch.sigmoid(
        torch.nn.functional.interpolate(logits, size=(IMG, IMG), mode="bilinear", align_corners=False)
    )[0, 0].numpy()
    np.testing.assert_allclose(pred.probability, expected, atol=1e-5)


def test_same_masks_as_the_evaluation(predictor):
    """At an odd, non-square size the predictor's mask is the one vlaligner.training.evaluation.predict_masks
    (the evaluation) makes from the same sample: same preprocessing, same two-step resize."""
    from vlaligner.data import preprocess_image
    from vlaligner.training.evaluation import predict_masks

    h, w = 97, 131
    rgb = _rgb(h, w, seed=8)
    sentence = "the purple star at the top"
    pred = predictor.predict(rgb, sentence)
    ids, mask = predictor.model.tokenize([sentence])
    batch = {"image": preprocess_image(rgb, IMG)[None], "input_ids": ids, "attention_mask": mask,
             "orig_size": torch.tensor([[h, w]])}
    (expected,) = predict_masks(predictor.model, batch, device="cpu", threshold=predictor.threshold)
    # predict_masks compares logits with logit(t), the predictor sigmoid(logits) with t: equal
    # up to the rounding of pixels sitting exactly on the boundary
    assert (pred.mask != expected.numpy()).mean() < 1e-3


def test_greyscale_and_rgba_inputs(predictor):
    h, w = 45, 71
    rgb = _rgb(h, w, seed=1)
    grey = rgb[:, :, 0]
    sentence = "the small green triangle"
    ref_grey = predictor.predict(np.repeat(grey[:, :, None], 3, axis=2), sentence).probability
    for image in (grey, grey[:, :, None], Image.fromarray(grey, mode="L")):
        pred = predictor.predict(image, sentence)
        assert pred.mask.shape == (h, w)
        np.testing.assert_allclose(pred.probability, ref_grey, atol=1e-6)
    # RGBA: composited on white, as a viewer shows it (opaque: the colours; clear: white)
    for alpha, seen in ((255, rgb), (0, np.full_like(rgb, 255))):
        rgba = np.concatenate([rgb, np.full((h, w, 1), alpha, np.uint8)], axis=2)
        ref = predictor.predict(seen, sentence).probability
        for image in (rgba, Image.fromarray(rgba)):
            pred = predictor.predict(image, sentence)
            assert pred.mask.shape == (h, w)
            np.testing.assert_allclose(pred.probability, ref, atol=1e-6)


def test_path_inputs(predictor, tmp_path):
    rgb = _rgb(53, 77, seed=2)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    Image.fromarray(rgb[:, :, 1], mode="L").save(tmp_path / "grey.png")
    ref = predictor.predict(rgb, "a shape").probability
    for path in (tmp_path / "img.png", str(tmp_path / "img.png")):
        np.testing.assert_allclose(predictor.predict(path, "a shape").probability, ref, atol=1e-6)
    assert predictor.predict(tmp_path / "grey.png", "a shape").mask.shape == (53, 77)


# ------------------------------------------------------------------ batching and queries
def test_list_of_sentences_equals_one_by_one(predictor):
    rgb = _rgb(61, 93, seed=4)
    sentences = ["the red square", "the blue circle at the bottom right", "left one"]
    batched = predictor.predict(rgb, sentences, return_queries=True)
    assert isinstance(batched, list) and [p.sentence for p in batched] == sentences
    for sentence, many in zip(sentences, batched):
        one = predictor.predict(rgb, sentence, return_queries=True)
        np.testing.assert_allclose(many.probability, one.probability, atol=1e-5)
        np.testing.assert_array_equal(many.mask, one.mask)
        np.testing.assert_allclose(many.query_masks, one.query_masks, atol=1e-5)
        np.testing.assert_allclose(many.query_scores, one.query_scores, atol=1e-6)
        np.testing.assert_allclose(many.word_attention, one.word_attention, atol=1e-6)
        assert many.tokens == one.tokens
    # a one-element list is a list
    assert isinstance(predictor.predict(rgb, ["x y"]), list)


def test_return_queries(predictor):
    h, w = 97, 131
    sentence = "the green square left of the circle"
    pred = predictor.predict(_rgb(h, w, seed=5), sentence, return_queries=True)
    n = predictor.model.num_queries
    assert pred.num_queries == n == 4
    assert pred.query_masks.shape == (n, h, w) and pred.query_masks.dtype == np.float32
    assert 0.0 <= pred.query_masks.min() and pred.query_masks.max() <= 1.0
    assert pred.query_scores.shape == (n,)
    assert pred.query_scores.sum() == pytest.approx(1.0, abs=1e-5)
    l = len(pred.tokens)
    assert pred.word_attention.shape == (n, l)
    # padding is removed: the tokens are the sentence's pieces framed by [CLS] / [SEP]
    assert pred.tokens[0] == "[CLS]" and pred.tokens[-1] == "[SEP]" and "[PAD]" not in pred.tokens
    assert "green" in pred.tokens and "circle" in pred.tokens
    assert np.all(pred.word_attention >= 0)
    # Eq. 14 at the model's grid: the final logits are the score-weighted sum of the query
    # logits; check it through the probabilities (logit = log p - log(1 - p)).
    def logit(p):
        p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        return np.log(p) - np.log1p(-p)

    weighted = np.einsum("n,nhw->hw", pred.query_scores.astype(np.float64), logit(pred.query_masks))
    inner = (slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(weighted[inner], logit(pred.probability)[inner], atol=2e-3)


def test_threshold(predictor, checkpoint):
    rgb = _rgb(40, 40, seed=6)
    low = Predictor(predictor.model, threshold=0.0).predict(rgb, "a box")
    high = Predictor(predictor.model, threshold=1.0).predict(rgb, "a box")
    assert low.mask.all() and not high.mask.any()
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        Predictor.from_pretrained(checkpoint, threshold=1.5)


def test_bfloat16_autocast_on_cpu(predictor):
    p32 = Predictor(predictor.model)
    p16 = Predictor(predictor.model, dtype="bfloat16")
    assert p16.dtype == torch.bfloat16 and p32.dtype == torch.float32
    rgb = _rgb(50, 70, seed=7)
    a = p32.predict(rgb, "the yellow star").probability
    b = p16.predict(rgb, "the yellow star").probability
    assert b.dtype == np.float32 and b.shape == (50, 70)
    assert np.abs(a - b).mean() < 0.05
    # weights stay float32: autocast, not a cast of the model
    assert next(p16.model.parameters()).dtype == torch.float32


def test_exported_lazily_from_the_package():
    import vlaligner

    assert vlaligner.Predictor is Predictor


def test_wraps_an_existing_model(predictor):
    again = Predictor(predictor.model, threshold=0.3)
    assert again.threshold == 0.3 and again.img_size == IMG and not again.model.training
    assert again.has_queries
    assert "img_size=64" in repr(again)


# ------------------------------------------------------------------ errors
def test_missing_image_file(predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*nope.png"):
        predictor.predict(tmp_path / "nope.png", "a box")


def test_unreadable_image_file(predictor, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(ValueError, match="unreadable image file .*notes.png"):
        predictor.predict(bad, "a box")
    truncated = tmp_path / "cut.png"
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png"):
        predictor.predict(truncated, "a box")
    with pytest.raises(ValueError, match="expected an image file, got a directory"):
        predictor.predict(tmp_path, "a box")


@pytest.mark.parametrize(
    "text, exc, match",
    [
        ("", ValueError, "text is an empty sentence"),
        ("   \t", ValueError, "text is an empty sentence"),
        (["a box", " "], ValueError, r"text\[1\] is an empty sentence"),
        ([], ValueError, "non-empty list of sentences, got \\[\\]"),
        (None, TypeError, "text must be a str or a list of str, got NoneType"),
        (["ok", 3], TypeError, r"text\[1\] must be a str, got int"),
    ],
)
def test_bad_sentences(predictor, text, exc, match):
    with pytest.raises(exc, match=match):
        predictor.predict(_rgb(8, 8), text)


@pytest.mark.parametrize(
    "image, exc, match",
    [
        (np.zeros((10, 12, 3), np.float32), TypeError, "dtype uint8, got dtype float32.*astype"),
        (np.zeros((10, 12, 2), np.uint8), ValueError, r"shape \(H W 3\).*got shape \(10, 12, 2\)"),
        (np.zeros((3, 10, 12), np.uint8), ValueError, r"channels-first, use image.transpose\(1, 2, 0\)"),
        (np.zeros((2, 10, 12, 3), np.uint8), ValueError, r"got shape \(2, 10, 12, 3\)"),
        (np.zeros((0, 12, 3), np.uint8), ValueError, "must not be empty"),
        (torch.zeros(3, 10, 12), TypeError, "got a torch.Tensor"),
        (12, TypeError, "got int"),
        ("", ValueError, "image path is empty"),
    ],
)
def test_bad_images(predictor, image, exc, match):
    with pytest.raises(exc, match=match):
        predictor.predict(image, "a box")


def test_checkpoint_errors(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*missing"):
        Predictor.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="is missing model.safetensors, config.json"):
        Predictor.from_pretrained(empty)
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is missing config.json; expected a directory written by"):
        Predictor.from_pretrained(empty)
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "last.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="it holds last.pt: a training checkpoint"):
        check_checkpoint_dir(pickles)
    with pytest.raises(FileNotFoundError, match="must be a directory, got the file"):
        Predictor.from_pretrained(checkpoint / "model.safetensors")


def test_device_and_dtype_errors():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") == cpu
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Predictor(object())


def test_logits_to_probability_keeps_boundary():
    """Resizing logits (not probabilities) then a sigmoid: the 0.5 level set of an upsampled
    step edge stays in the middle, and values are proper probabilities."""
    logits = torch.tensor([[-8.0, -8.0, 8.0, 8.0]]).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    prob = logits_to_probability(logits, (2, 8))
    assert prob.shape == (1, 1, 2, 8) and prob.dtype == torch.float32
    row = prob[0, 0, 0]
    assert (row[:4] < 0.5).all() and (row[4:] > 0.5).all()
    assert row[0] == pytest.approx(torch.sigmoid(torch.tensor(-8.0)).item())
    # through the input size first: two bilinear steps, as the evaluation does
    grid = torch.randn(1, 2, 4, 4)
    two_step = logits_to_probability(grid, (5, 7), input_size=(16, 16))
    first = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)
    second = torch.nn.functional.interpolate(first, size=(5, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(two_step, torch.sigmoid(second))
    assert not torch.allclose(two_step, logits_to_probability(grid, (5, 7)))


def test_as_rgb_array_pil_modes():
    palette = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), mode="L").convert("P")
    wide = Image.fromarray((np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000))
    for img in (palette, wide, Image.new("CMYK", (4, 3)), Image.new("LA", (4, 3))):
        out = as_rgb_array(img)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    # 16-bit greyscale is scaled to 8 bits (by 255 / 65535, as a viewer shows it), not clipped
    assert as_rgb_array(wide)[2, 3, 0] == round(55000 * 255 / 65535) and as_rgb_array(wide)[0, 0, 0] == 0


def test_fixed_head_has_no_queries(tmp_path):
    from vlaligner.models import build_eavl_tiny

    fixed = Predictor(build_eavl_tiny(img_size=IMG, num_queries=2, head="fixed"))
    assert fixed.predict(_rgb(20, 30), "a box").mask.shape == (20, 30)
    assert not fixed.has_queries
    with pytest.raises(ValueError, match="no per-query masks .*without return_queries"):
        fixed.predict(_rgb(20, 30), "a box", return_queries=True)


def test_image_is_encoded_once_for_many_sentences(predictor, monkeypatch):
    calls = []
    encode = predictor.model.encode_image
    monkeypatch.setattr(predictor.model, "encode_image", lambda images: calls.append(images.shape) or encode(images))
    forward_calls = []
    monkeypatch.setattr(predictor.model, "forward", lambda *a, **k: forward_calls.append(1))
    out = predictor.predict(_rgb(40, 50), ["one", "two", "three", "four"])
    assert len(out) == 4 and calls == [torch.Size([1, 3, IMG, IMG])] and forward_calls == []
