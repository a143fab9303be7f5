"""Pictures of a prediction: the mask laid over the image, and a grid of what each query saw
(the paper's Fig. 4: each query's own binarised mask, titled with its score and the words
it attended to most).

Axes: n queries, l words (tokens), H W image space, c colour channels (3).

Images are (H W 3) uint8 numpy arrays, masks (H W) bool or (n H W) float probabilities.
The overlay is pure numpy and saved with PIL at the image's own size; the grid is drawn
with matplotlib's Agg canvas directly (no pyplot state, no display needed), imported only
when a grid is drawn.

Training pictures live here too: ``plot_training_curves`` (loss and validation metric per
step, from a run's logs) and ``save_prediction_grid`` (validation samples with the predicted
and the true outline).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .fileio import read_jsonl

if TYPE_CHECKING:  # matplotlib is imported where a grid is drawn
    from matplotlib.figure import Figure

    from vlaligner.predictor import Prediction

__all__ = [
    "QueryPanel",
    "grid_shape",
    "mask_outline",
    "overlay_mask",
    "merge_subwords",
    "top_words",
    "query_panels",
    "render_query_grid",
    "save_overlay",
    "save_query_grid",
    "plot_training_curves",
    "save_prediction_grid",
]

PathLike = Union[str, os.PathLike]

# Tokens that frame a sentence rather than say anything about the object.
_SPECIAL_TOKENS = frozenset(
    {"[cls]", "[sep]", "[pad]", "[mask]", "<s>", "</s>", "<pad>", "<cls>", "<sep>",
     "<|startoftext|>", "<|endoftext|>", "<bos>", "<eos>"}
)
_HAS_WORD_CHAR = re.compile(r"\w")


@dataclass(frozen=True)
class QueryPanel:
    """One panel of the query grid.

    Fields: index (the query's position n in the model's output), score (its weight, or
    None when the model has no estimator), words (its most-attended words, strongest
    first), title (what the panel shows above the mask).
    """

    index: int
    score: Optional[float]
    words: Tuple[str, ...]
    title: str


# --------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------


def grid_shape(n: int, *, max_cols: int = 6) -> Tuple[int, int]:
    """(rows, cols) for n panels: at most ``max_cols`` per row, as few rows as possible."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (number of panels) must be a positive int, got {n!r}")
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")
    cols = min(int(n), max_cols)
    return math.ceil(int(n) / cols), cols


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be an (H W 3) uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H W 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must have dtype uint8, got dtype {image.dtype}")
    return image


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """(H W) bool: the pixels of ``mask`` (H W) bool that touch a pixel outside it."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    # A pixel is interior when its four neighbours are all in the mask.
    interior = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    return mask & ~interior


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    color: Tuple[int, int, int] = (0, 220, 255),
    alpha: float = 0.45,
    outline: bool = True,
) -> np.ndarray:
    """Tint the masked pixels of an image.

    Args:
        image: (H W 3) uint8.
        mask: (H W) bool (anything non-zero counts as inside).
        color: RGB tint; alpha: its opacity inside the mask; outline: draw the mask's
            border in the full colour so that thin or pale regions stay visible.

    Returns:
        (H W 3) uint8, the same size as ``image``; pixels outside the mask are unchanged.
    """
    _check_image(image)
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"mask must have shape (H W) = {image.shape[:2]} like the image, got shape {mask.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mask = mask.astype(bool)
    tint = np.asarray(color, dtype=np.float32).reshape(1, 1, 3)
    out = image.astype(np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint[0]
    if outline:
        out[mask_outline(mask)] = tint[0, 0]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def merge_subwords(
    tokens: Sequence[str], weights: Sequence[float]
) -> Tuple[List[str], List[float]]:
    """Join sub-word tokens into words, adding up their weights.

    Understands WordPiece (BERT: ``##`` continues a word), byte-level BPE / SentencePiece
    (``Ġ`` / ``▁`` starts a word) and CLIP BPE (``</w>`` ends a word). Special tokens
    ([CLS], <s>, ...) and tokens without a letter or digit (punctuation) are dropped, so the
    result is what a reader would call the sentence's words.
    """
    if len(tokens) != len(weights):
        raise ValueError(
            f"tokens and weights must have the same length l, got {len(tokens)} and {len(weights)}"
        )
    prefix_scheme = any(t.startswith(("Ġ", "▁")) for t in tokens)
    suffix_scheme = not prefix_scheme and any(t.endswith("</w>") for t in tokens)
    words: List[str] = []
    totals: List[float] = []
    open_word = False  # whether the next piece may continue the last word
    for token, weight in zip(tokens, weights):
        if token.lower() in _SPECIAL_TOKENS:
            open_word = False
            continue
        if prefix_scheme:
            starts = token.startswith(("Ġ", "▁")) or not open_word
            piece = token.lstrip("Ġ▁")
            ends = False
        elif suffix_scheme:
            starts = not open_word
            ends = token.endswith("</w>")
            piece = token[: -len("</w>")] if ends else token
        else:
            starts = not (token.startswith("##") and open_word)
            piece = token[2:] if token.startswith("##") else token
            ends = False
        if starts:
            words.append(piece)
            totals.append(float(weight))
        else:
            words[-1] += piece
            totals[-1] += float(weight)
        open_word = not ends
    keep = [i for i, w in enumerate(words) if _HAS_WORD_CHAR.search(w)]
    return [words[i] for i in keep], [totals[i] for i in keep]


def top_words(attention: Sequence[float], tokens: Sequence[str], *, k: int = 3) -> List[str]:
    """The ``k`` distinct words with the most attention, strongest first.

    Args:
        attention: (l) one query's attention over the tokens.
        tokens: the l token strings.
    """
    words, weights = merge_subwords(list(tokens), [float(a) for a in np.asarray(attention)])
    # Stable sort: equal weights keep sentence order.
    order = sorted(range(len(words)), key=lambda i: -weights[i])
    chosen: List[str] = []
    for i in order:
        # A repeated word ("the ... the") is shown once, at its strongest occurrence.
        if words[i].lower() not in (w.lower() for w in chosen):
            chosen.append(words[i])
        if len(chosen) == k:
            break
    return chosen


def query_panels(
    query_scores: Optional[np.ndarray],
    word_attention: Optional[np.ndarray],
    tokens: Optional[Sequence[str]],
    *,
    num_queries: Optional[int] = None,
    top_k: int = 3,
    sort_by_score: bool = True,
) -> List[QueryPanel]:
    """One ``QueryPanel`` per query, the highest score first.

    Args:
        query_scores: (n) or None.
        word_attention: (n l) or None (then panels carry no words).
        tokens: the l tokens of ``word_attention``.
        num_queries: n, needed only when both arrays are None.
    """
    n = None
    for name, value, rank in (("query_scores", query_scores, 1), ("word_attention", word_attention, 2)):
        if value is None:
            continue
        value = np.asarray(value)
        if value.ndim != rank:
            pattern = "(n)" if rank == 1 else "(n l)"
            raise ValueError(f"{name} must have shape {pattern}, got shape {value.shape}")
        if n is not None and value.shape[0] != n:
            raise ValueError(
                f"query_scores and word_attention must agree on n, got {n} and {value.shape[0]}"
            )
        n = int(value.shape[0])
    if n is None:
        n = num_queries
    if n is None or n < 1:
        raise ValueError("need query_scores, word_attention or num_queries to know n")
    if word_attention is not None:
        if tokens is None or len(tokens) != np.asarray(word_attention).shape[1]:
            raise ValueError(
                f"tokens must list the l = {np.asarray(word_attention).shape[1]} tokens of "
                f"word_attention (n l), got {None if tokens is None else len(tokens)}"
            )

    panels = []
    for i in range(n):
        score = None if query_scores is None else float(np.asarray(query_scores)[i])
        words: Tuple[str, ...] = ()
        if word_attention is not None:
            words = tuple(top_words(np.asarray(word_attention)[i], tokens, k=top_k))
        head = f"q{i}" if score is None else f"q{i}  score {score:.3f}"
        shown = [w if len(w) <= 14 else w[:13] + "…" for w in words]
        title = head + ("\n" + ", ".join(shown) if shown else "")
        panels.append(QueryPanel(index=i, score=score, words=words, title=title))
    if sort_by_score and query_scores is not None:
        panels.sort(key=lambda p: -p.score)  # stable: ties keep query order
    return panels


# --------------------------------------------------------------------------------------
# Drawing and saving
# --------------------------------------------------------------------------------------


def _thumbnail_size(h: int, w: int, longest: int) -> Tuple[int, int]:
    scale = min(1.0, longest / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))  # PIL order (W, H)


def render_query_grid(
    image: np.ndarray,
    query_masks: np.ndarray,
    panels: Sequence[QueryPanel],
    *,
    threshold: float = 0.5,
    panel_size: int = 192,
    max_cols: int = 6,
    color: Tuple[int, int, int] = (0, 220, 255),
    title: Optional[str] = None,
) -> "Figure":
    """Draw one panel per query: its binarised mask over the image, titled by ``panels``
    (the panel with the highest score has a bold title).

    Args:
        image: (H W 3) uint8.
        query_masks: (n H' W') probabilities (any size; resized to the panel).
        panels: the n panels in display order (``query_panels``); ``panel.index`` picks the mask.
        threshold: the probability that binarises each query's mask (as in the paper's Fig. 4).
        panel_size: the longest side of each panel in pixels.
        title: an optional line above the grid (e.g. the sentence).

    Returns:
        A matplotlib Figure on an Agg canvas with exactly len(panels) axes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_image(image)
    query_masks = np.asarray(query_masks)
    if query_masks.ndim != 3:
        raise ValueError(f"query_masks must have shape (n H W), got shape {query_masks.shape}")
    n = query_masks.shape[0]
    if len(panels) != n:
        raise ValueError(f"need one panel per query mask: {n} masks (n H W), got {len(panels)} panels")
    rows, cols = grid_shape(n, max_cols=max_cols)

    size = _thumbnail_size(image.shape[0], image.shape[1], panel_size)
    thumb = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))

    dpi = 100
    panel_w, panel_h = size[0] / dpi, size[1] / dpi
    title_h = 0.42  # inches for a two-line title
    fig = Figure(
        figsize=(cols * (panel_w + 0.1), rows * (panel_h + title_h) + (0.35 if title else 0.0)),
        dpi=dpi,
    )
    FigureCanvasAgg(fig)
    scored = [slot for slot, p in enumerate(panels) if p.score is not None]
    # Bold marks the one panel with the highest score (the first of equals).
    best_slot = max(scored, key=lambda slot: (panels[slot].score, -slot), default=None)
    for slot, panel in enumerate(panels):
        mask = Image.fromarray(np.ascontiguousarray(query_masks[panel.index], dtype=np.float32))
        mask = np.asarray(mask.resize(size, Image.Resampling.BILINEAR)) > threshold
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.imshow(overlay_mask(thumb, mask, color=color))
        weight = "bold" if slot == best_slot else "normal"
        ax.set_title(panel.title, fontsize=7, fontweight=weight)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _prepare_out(path: PathLike) -> Path:
    out = Path(path)
    ext = out.suffix.lower()
    if ext not in Image.registered_extensions():
        raise ValueError(f"cannot tell the image format of {str(out)!r}; end the name with .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def save_overlay(path: PathLike, image: np.ndarray, mask: np.ndarray, **kwargs) -> Path:
    """Write ``overlay_mask(image, mask, **kwargs)`` to ``path`` at the image's size."""
    out = _prepare_out(path)
    Image.fromarray(overlay_mask(image, mask, **kwargs)).save(out)
    return out


def save_query_grid(
    path: PathLike,
    image: np.ndarray,
    prediction: "Prediction",
    *,
    top_k: int = 3,
    panel_size: int = 192,
    max_cols: int = 6,
) -> List[QueryPanel]:
    """Write the query grid of a ``Prediction`` made with ``return_queries=True``.

    Returns:
        The panels drawn, in display order (one per query).
    """
    if prediction.query_masks is None:
        raise ValueError("the prediction has no per-query masks; predict with return_queries=True")
    out = _prepare_out(path)
    panels = query_panels(
        prediction.query_scores,
        prediction.word_attention,
        prediction.tokens,
        num_queries=prediction.query_masks.shape[0],
        top_k=top_k,
    )
    fig = render_query_grid(
        image,
        prediction.query_masks,
        panels,
        threshold=prediction.threshold,
        panel_size=panel_size,
        max_cols=max_cols,
        title=repr(prediction.sentence),
    )
    fig.savefig(out)
    return panels


def plot_training_curves(
    losses_path: PathLike, metrics_path: PathLike, out_path: PathLike, *, metric: str = "mIoU"
) -> Path:
    """Plot the training loss per step and the validation ``metric`` per evaluation to a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    losses = read_jsonl(Path(losses_path))
    evals = [r for r in read_jsonl(Path(metrics_path)) if metric in r.get("metrics", {})]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        steps = [r["step"] for r in losses]
        values = [r["loss"] for r in losses]
        ax_loss.plot(steps, values, lw=0.8, alpha=0.5, label="loss")
        if len(values) >= 10:
            window = max(2, len(values) // 20)
            kernel = np.ones(window) / window
            smooth = np.convolve(values, kernel, mode="valid")
            ax_loss.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
        ax_loss.legend()
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    for split in sorted({r.get("split", "val") for r in evals}):
        rows = [r for r in evals if r.get("split", "val") == split]
        ax_metric.plot([r["step"] for r in rows], [r["metrics"][metric] for r in rows], "o-", label=split)
    if evals:
        ax_metric.legend()
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"{metric} (%)")
    ax_metric.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def save_prediction_grid(
    out_path: PathLike,
    images: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    sentences: Sequence[str],
    *,
    ious: Optional[Sequence[float]] = None,
) -> Path:
    """A PNG with one panel per sample: the prediction lit and outlined, the truth outlined.

    Outside the predicted mask the image is darkened (whatever the objects' colours, the
    prediction stands out); the prediction's outline is cyan, the ground truth's dashed lime.

    Args:
        images: ``(H W 3)`` uint8 each.
        preds, targets: ``(H W)`` bool each, the size of their image.
        sentences: the referring expression of each sample (the panel title).
        ious: optional IoU (0-1) of each sample, shown under its sentence.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import textwrap

    n = len(images)
    if not (len(preds) == len(targets) == len(sentences) == n) or n == 0:
        raise ValueError(
            f"need as many images, preds, targets and sentences (>= 1), got {n}, {len(preds)}, "
            f"{len(targets)}, {len(sentences)}"
        )
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        image = np.asarray(images[i]).astype(np.float32) / 255.0
        pred = np.asarray(preds[i]).astype(bool)
        target = np.asarray(targets[i]).astype(bool)
        if pred.shape != image.shape[:2] or target.shape != image.shape[:2]:
            raise ValueError(
                f"sample {i}: image (H W 3) = {image.shape}, pred {pred.shape} and target {target.shape} "
                "must share H W"
            )
        shown = np.where(pred[..., None], image, 0.3 * image)
        ax.imshow(shown)
        if pred.any() and not pred.all():
            ax.contour(pred.astype(float), levels=[0.5], colors=["cyan"], linewidths=1.4)
        if target.any() and not target.all():
            ax.contour(target.astype(float), levels=[0.5], colors=["lime"], linewidths=1.4, linestyles="dashed")
        title = textwrap.fill(sentences[i], 32)
        if ious is not None:
            title += f"\nIoU {100 * ious[i]:.1f}%"
        ax.set_title(title, fontsize=8)
    fig.suptitle("lit + cyan: prediction, dashed lime: ground truth", fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
