"""Tests of vlaligner.viz: overlay, word ranking, query grid layout and drawing.

Axes: n queries, l words, H W image space.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlaligner.viz import (
    QueryPanel,
    grid_shape,
    mask_outline,
    merge_subwords,
    overlay_mask,
    query_panels,
    render_query_grid,
    save_overlay,
    save_query_grid,
    top_words,
)


def _image(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ grid layout
@pytest.mark.parametrize(
    "n, max_cols, expected",
    [(1, 6, (1, 1)), (5, 6, (1, 5)), (6, 6, (1, 6)), (7, 6, (2, 6)), (24, 6, (4, 6)), (32, 6, (6, 6)), (10, 4, (3, 4))],
)
def test_grid_shape(n, max_cols, expected):
    rows, cols = grid_shape(n, max_cols=max_cols)
    assert (rows, cols) == expected
    assert rows * cols >= n > (rows - 1) * cols  # no empty row


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_grid_shape_rejects(n):
    with pytest.raises(ValueError, match="positive int"):
        grid_shape(n)


# ------------------------------------------------------------------ overlay
def test_overlay_changes_only_masked_pixels():
    image = _image()
    mask = np.zeros(image.shape[:2], bool)
    mask[5:20, 10:30] = True
    out = overlay_mask(image, mask, color=(0, 255, 0), alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], image[~mask])
    border = mask_outline(mask)
    np.testing.assert_array_equal(out[border], np.tile([0, 255, 0], (border.sum(), 1)))
    inside = mask & ~border
    expected = np.round(0.5 * image[inside].astype(np.float32) + 0.5 * np.array([0, 255, 0])).astype(np.uint8)
    np.testing.assert_array_equal(out[inside], expected)


def test_mask_outline_is_the_border():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    outline = mask_outline(mask)
    assert outline.sum() == 16  # 5x5 square: 25 - 9 interior
    assert not outline[2:5, 2:5].any()
    full = np.ones((4, 5), bool)  # touching the image edge counts as a border
    assert mask_outline(full).sum() == 4 * 5 - 2 * 3


@pytest.mark.parametrize(
    "image, mask, exc, match",
    [
        (np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), bool), ValueError, r"mask must have shape \(H W\) = \(4, 5\)"),
        (np.zeros((4, 5), np.uint8), np.zeros((4, 5), bool), ValueError, r"image must have shape \(H W 3\)"),
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), bool), TypeError, "dtype uint8"),
        ([[0]], np.zeros((1, 1), bool), TypeError, "numpy array, got list"),
    ],
)
def test_overlay_rejects(image, mask, exc, match):
    with pytest.raises(exc, match=match):
        overlay_mask(image, mask)


def test_save_overlay_png(tmp_path):
    image = _image(31, 45)
    path = save_overlay(tmp_path / "sub" / "o.png", image, np.ones((31, 45), bool))
    with Image.open(path) as img:
        assert img.size == (45, 31) and img.format == "PNG"
    with pytest.raises(ValueError, match="end the name with .png"):
        save_overlay(tmp_path / "o.unknownext", image, np.ones((31, 45), bool))


# ------------------------------------------------------------------ words
def test_merge_wordpieces():
    tokens = ["[CLS]", "the", "sand", "##wich", "by", "fork", ".", "[SEP]"]
    words, weights = merge_subwords(tokens, [0.5, 0.1, 0.2, 0.3, 0.05, 0.4, 0.9, 0.6])
    assert words == ["the", "sandwich", "by", "fork"]
    assert weights == pytest.approx([0.1, 0.5, 0.05, 0.4])


def test_merge_bpe_schemes():
    words, weights = merge_subwords(["<s>", "Ġsand", "wich", "Ġleft", "</s>"], [1, 1, 2, 3, 1])
    assert words == ["sandwich", "left"] and weights == [3.0, 3.0]
    words, weights = merge_subwords(["<|startoftext|>", "sand", "wich</w>", "left</w>"], [9, 1, 2, 3])
    assert words == ["sandwich", "left"] and weights == [3.0, 3.0]


def test_top_words_order_and_ties():
    tokens = ["[CLS]", "man", "in", "red", "shirt", "[SEP]"]
    assert top_words([0.9, 0.3, 0.1, 0.4, 0.2, 0.8], tokens, k=2) == ["red", "man"]
    # equal weights keep sentence order; k larger than the words gives them all
    assert top_words([0, 1, 1, 1, 1, 0], tokens, k=10) == ["man", "in", "red", "shirt"]
    # a repeated word is listed once, at its strongest occurrence
    tokens = ["[CLS]", "the", "box", "left", "of", "the", "ball", "[SEP]"]
    assert top_words([0, 0.3, 0.1, 0.2, 0, 0.35, 0.05, 0], tokens, k=3) == ["the", "left", "box"]


def test_merge_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length l, got 2 and 3"):
        merge_subwords(["a", "b"], [1, 2, 3])


# ------------------------------------------------------------------ panels
def test_query_panels_sorted_with_scores_and_words():
    scores = np.array([0.1, 0.6, 0.3], np.float32)
    tokens = ["[CLS]", "left", "red", "box", "[SEP]"]
    attention = np.array(
        [[0, 0.7, 0.2, 0.1, 0], [0, 0.1, 0.1, 0.8, 0], [0, 0.2, 0.6, 0.2, 0]], np.float32
    )
    panels = query_panels(scores, attention, tokens, top_k=2)
    assert [p.index for p in panels] == [1, 2, 0]
    assert panels[0].words == ("box", "left") or panels[0].words == ("box", "red")
    assert panels[1].words[0] == "red" and panels[2].words[0] == "left"
    assert panels[0].title.startswith("q1  score 0.600") and "box" in panels[0].title
    unsorted = query_panels(scores, attention, tokens, sort_by_score=False)
    assert [p.index for p in unsorted] == [0, 1, 2]


def test_query_panels_without_scores_or_attention():
    panels = query_panels(None, None, None, num_queries=4)
    assert [p.title for p in panels] == ["q0", "q1", "q2", "q3"]
    assert all(p.score is None and p.words == () for p in panels)


@pytest.mark.parametrize(
    "scores, attention, tokens, match",
    [
        (np.ones((2, 2)), None, None, r"query_scores must have shape \(n\)"),
        (np.ones(3), np.ones((2, 4)), ["a"] * 4, "agree on n, got 3 and 2"),
        (None, np.ones((2, 4)), ["a"] * 3, "l = 4 tokens"),
        (None, None, None, "num_queries"),
    ],
)
def test_query_panels_rejects(scores, attention, tokens, match):
    with pytest.raises(ValueError, match=match):
        query_panels(scores, attention, tokens)


# ------------------------------------------------------------------ grid drawing
@pytest.mark.parametrize("n", [1, 5, 8])
def test_render_query_grid_has_n_panels(n):
    rng = np.random.default_rng(n)
    image = _image(29, 41)
    query_masks = rng.random((n, 29, 41)).astype(np.float32)
    scores = rng.random(n)
    scores /= scores.sum()
    panels = query_panels(scores, None, None)
    fig = render_query_grid(image, query_masks, panels, max_cols=3)
    assert len(fig.axes) == n
    rows, cols = grid_shape(n, max_cols=3)
    for slot, ax in enumerate(fig.axes):
        assert ax.get_subplotspec().get_geometry()[:3] == (rows, cols, slot)
        assert ax.get_title() == panels[slot].title
        assert len(ax.get_images()) == 1
    # the highest score is the first panel and the only bold title
    assert fig.axes[0].title.get_fontweight() == "bold"
    assert all(ax.title.get_fontweight() == "normal" for ax in fig.axes[1:])


def test_only_one_bold_title_among_equal_scores():
    panels = query_panels(np.full(3, 1 / 3), None, None)
    fig = render_query_grid(_image(), np.zeros((3, 37, 53)), panels)
    assert [ax.title.get_fontweight() for ax in fig.axes] == ["bold", "normal", "normal"]


def test_render_query_grid_binarises_each_mask():
    image = np.full((20, 20, 3), 100, np.uint8)
    masks = np.zeros((2, 20, 20), np.float32)
    masks[0, :, :10] = 0.9  # query 0: left half above threshold
    panels = query_panels(np.array([0.5, 0.5]), None, None, sort_by_score=False)
    fig = render_query_grid(image, masks, panels, panel_size=20)
    left = fig.axes[0].get_images()[0].get_array()
    right = fig.axes[1].get_images()[0].get_array()
    assert (np.asarray(left)[5:15, 2:8] != 100).any()  # tinted
    assert (np.asarray(left)[5:15, 14:18] == 100).all()
    assert (np.asarray(right) == 100).all()  # nothing above threshold


def test_render_query_grid_rejects_mismatch():
    with pytest.raises(ValueError, match="one panel per query mask: 3 masks"):
        render_query_grid(_image(), np.zeros((3, 37, 53)), [QueryPanel(0, None, (), "q0")])
    with pytest.raises(ValueError, match=r"query_masks must have shape \(n H W\)"):
        render_query_grid(_image(), np.zeros((37, 53)), [])


def test_save_query_grid_png(tmp_path):
    from vlaligner.predictor import Prediction

    n = 4
    rng = np.random.default_rng(1)
    prob = rng.random((23, 67)).astype(np.float32)
    pred = Prediction(
        sentence="the red box",
        mask=prob > 0.5,
        probability=prob,
        query_masks=rng.random((n, 23, 67)).astype(np.float32),
        query_scores=np.full(n, 1 / n, np.float32),
        word_attention=rng.random((n, 5)).astype(np.float32),
        tokens=["[CLS]", "the", "red", "box", "[SEP]"],
    )
    panels = save_query_grid(tmp_path / "g.png", _image(23, 67), pred)
    assert len(panels) == n
    with Image.open(tmp_path / "g.png") as img:
        assert img.format == "PNG" and img.width > 67
    pred.query_masks = None
    with pytest.raises(ValueError, match="return_queries=True"):
        save_query_grid(tmp_path / "h.png", _image(23, 67), pred)
