"""Draw docs/images/architecture.png: EAVL's data flow with the tensor shapes of each step.

Axis legend: b batch, n queries (24), l words (17), c channels, h w space.

The shapes are those of ``build_eavl_swin_b()`` at 480 x 480 (Swin-B + BERT-base, width 512,
n = 24, k = 3); ``--check-shapes`` runs the tiny model once and checks that the figure's
pattern (which map comes out at which stride, with which width) holds for it too.

    python docs/make_architecture_figure.py                # writes docs/images/architecture.png
    python docs/make_architecture_figure.py --check-shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).resolve().parent / "images" / "architecture.png"

# Colours by role: inputs, encoders (from timm / transformers), vlaligner modules, outputs.
COLOURS = {
    "input": "#f2f2f2",
    "encoder": "#dbe9f6",
    "neck": "#fde9c9",
    "aligner": "#d9f0d3",
    "aligner_part": "#f4fbf2",
    "output": "#f7d9d9",
}
EDGE = "#333333"


def box(ax, xy: Tuple[float, float], wh: Tuple[float, float], title: str, body: str = "",
        colour: str = "input", title_size: float = 11.5, body_size: float = 9.5, zorder: int = 2):
    """A rounded box with a bold title and a smaller body; returns its (x, y, w, h)."""
    x, y = xy
    w, h = wh
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=COLOURS[colour], edgecolor=EDGE, linewidth=1.2, zorder=zorder))
    if body:
        ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="top", fontsize=title_size,
                fontweight="bold", zorder=zorder + 1)
        ax.text(x + w / 2, y + h - 0.62, body, ha="center", va="top", fontsize=body_size,
                family="DejaVu Sans Mono", zorder=zorder + 1, linespacing=1.35)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=title_size,
                fontweight="bold", zorder=zorder + 1)
    return x, y, w, h


def arrow(ax, start, end, label: str = "", *, label_xy=None, rad: float = 0.0, colour: str = EDGE,
          label_size: float = 9.0, ha: str = "center"):
    """An arrow from ``start`` to ``end`` with an optional shape label."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.4,
                                 color=colour, connectionstyle=f"arc3,rad={rad}", zorder=1,
                                 shrinkA=2, shrinkB=2))
    if label:
        lx, ly = label_xy if label_xy else ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.14)
        ax.text(lx, ly, label, ha=ha, va="bottom", fontsize=label_size, family="DejaVu Sans Mono",
                color="#1a1a1a", zorder=5,
                bbox=dict(boxstyle="round,pad=0.12", facecolor="white", edgecolor="none", alpha=0.85))


def right(b, dy: float = 0.0):
    x, y, w, h = b
    return (x + w, y + h / 2 + dy)


def left(b, dy: float = 0.0):
    x, y, w, h = b
    return (x, y + h / 2 + dy)


def top(b, dx: float = 0.0):
    x, y, w, h = b
    return (x + w / 2 + dx, y + h)


def bottom(b, dx: float = 0.0):
    x, y, w, h = b
    return (x + w / 2 + dx, y)


def draw(path: Path = OUTPUT, dpi: int = 150) -> Path:
    fig, ax = plt.subplots(figsize=(20, 10.5))
    ax.set_xlim(0, 30)
    ax.set_ylim(0, 15.5)
    ax.axis("off")
    ax.text(0.2, 15.2, "EAVL data flow (Swin-B + BERT-base, 480 x 480, n = 24 queries, width 512, k = 3)",
            fontsize=16, fontweight="bold", va="top")
    ax.text(0.2, 14.55, "b batch, l = 17 tokens, n = 24 queries; shapes as einops patterns. "
            "Blue: encoders (timm / transformers); orange: neck and decoder; green: vlaligner's aligner.",
            fontsize=10.5, va="top", color="#444444")

    # ------------------------------------------------------------------ inputs and encoders
    image = box(ax, (0.3, 10.2), (3.0, 2.0), "Image", "(b 3 480 480)\nImageNet-normalised", "input")
    sentence = box(ax, (0.3, 1.6), (3.0, 2.0), "Sentence", '"the man in red\n on the left"', "input")
    swin = box(ax, (4.6, 9.6), (3.4, 3.2), "Swin-B", "stages 2-4\n+ attention\n  pooling on\n  stage 4", "encoder")
    bert = box(ax, (4.6, 1.2), (3.4, 2.8), "BERT-base", "last layer,\nprojected to 512", "encoder")
    arrow(ax, right(image), left(swin))
    arrow(ax, right(sentence), left(bert), "(b 17) ids\n+ mask", label_xy=(3.95, 1.55))

    # ------------------------------------------------------------------ encoder outputs
    feats = box(ax, (9.3, 9.3), (4.3, 3.8), "Vision features",
                "F_v2 (b 256 60 60)  /8\nF_v3 (b 512 30 30)  /16\nF_v4 (b 1024 15 15) /32\nF_g  (b 1024) global", "encoder",
                body_size=9.5)
    words = box(ax, (9.3, 1.0), (4.3, 3.2), "Text features",
                "F_t (b 17 512) words\nF_s (b 512)    sentence\nword_mask (b 17) bool", "encoder", body_size=9.5)
    arrow(ax, right(swin), left(feats))
    arrow(ax, right(bert), left(words))

    # ------------------------------------------------------------------ neck and generator
    neck = box(ax, (15.0, 10.0), (4.2, 3.0), "Fusion Neck", "Eqs. 2-5: gate F_v4 by F_s,\nmerge strides 8/16/32,\n+ (x, y) coords",
               "neck", body_size=9.2)
    gen = box(ax, (15.0, 3.9), (4.2, 3.6), "Multi-Query\nGenerator", "\n\nEqs. 6-10: n per-query\nvision maps attend\nover the real words",
              "aligner", body_size=9.2)
    arrow(ax, right(feats, 0.9), left(neck, 0.4), "F_v2..4", label_xy=(14.3, 12.0))
    arrow(ax, (13.2, 4.2), (15.6, 10.0), "F_s", label_xy=(13.75, 5.3))
    arrow(ax, bottom(feats, 0.6), left(gen, 1.0), "F_v2..4, F_g", label_xy=(12.3, 8.1), rad=0.2)
    arrow(ax, right(words, -0.6), left(gen, -1.0), "F_t, mask", label_xy=(14.3, 2.25))

    # ------------------------------------------------------------------ decoder
    dec = box(ax, (21.2, 9.0), (3.6, 3.2), "Transformer\ndecoder", "\n\n3 layers: self-attn on\nvision tokens, cross-attn\nto the queries",
              "neck", body_size=8.8)
    arrow(ax, right(neck, 0.6), left(dec, 0.6), "F_v\n(b 512 30 30)", label_xy=(20.2, 12.3))
    arrow(ax, right(gen, 1.4), left(dec, -1.0), "F_q", label_xy=(20.0, 8.1), rad=0.25)

    # ------------------------------------------------------------------ the aligner
    ax.add_patch(FancyBboxPatch((20.3, 0.35), 9.05, 7.4, boxstyle="round,pad=0.02,rounding_size=0.15",
                                facecolor=COLOURS["aligner"], edgecolor=EDGE, linewidth=1.6, zorder=0))
    ax.text(29.15, 7.45, "Vision-Language Aligner (Eqs. 11-14)", ha="right", va="center", fontsize=12.5,
            fontweight="bold")
    mmg = box(ax, (20.55, 2.7), (4.3, 3.2), "Multi-Mask Generator",
              "up-projection /16 -> /4:\nF_c' (b 128 120 120)\nLinear(query) ->\nK (b 24 128 3 3), bias (b 24)",
              "aligner_part", title_size=10.5, body_size=8.4)
    est = box(ax, (25.1, 2.7), (4.0, 3.2), "Multi-Query Estimator", "self-attention over\nthe n queries,\nLinear -> softmax_n:\ns (b 24)",
              "aligner_part", title_size=10.5, body_size=8.6)
    fuse = box(ax, (20.55, 0.55), (8.55, 1.8), "Fused kernel: one convolution whatever n",
               "sum_i s_i K_i (b 1 128 3 3), sum_i s_i bias_i (b 1)\nconv with F_c' -> logits (b 1 120 120) = sum_i s_i m_i",
               "aligner_part", title_size=10.5, body_size=8.8)
    # F_q feeds both parts: one bus from the generator, a branch down into each.
    bus_y = 6.55
    ax.plot([19.2, 27.1], [bus_y, bus_y], color=EDGE, linewidth=1.4, zorder=1)
    ax.text(25.6, bus_y + 0.08, "F_q (b 24 512)", ha="center", va="bottom", fontsize=9, family="DejaVu Sans Mono")
    arrow(ax, (23.7, bus_y), (23.7, 5.9))
    arrow(ax, (27.1, bus_y), (27.1, 5.9))
    arrow(ax, bottom(dec, -1.0), (22.0, 5.9), "F_c (b 512 30 30)", label_xy=(22.15, 8.0), ha="left")
    arrow(ax, bottom(mmg), (mmg[0] + mmg[2] / 2, 2.35))
    arrow(ax, bottom(est), (est[0] + est[2] / 2, 2.35))

    # ------------------------------------------------------------------ output
    out = box(ax, (25.6, 9.0), (4.3, 3.3), "Mask", "upsample logits\n(b 1 120 120) -> 480 x 480,\nsigmoid > 0.5,\nresize to the photo",
              "output", body_size=9.0)
    ax.plot([29.1, 29.65], [1.45, 1.45], color=EDGE, linewidth=1.4, zorder=1)
    arrow(ax, (29.65, 1.45), (29.65, 9.0))
    ax.text(29.5, 8.05, "logits (b 1 120 120)", ha="right", va="bottom", fontsize=9, family="DejaVu Sans Mono")
    ax.text(21.2, 14.0, "Training: BCE(logits, ground truth resized to 120 x 120).\n"
            "return_query_masks=True also returns the n masks m (b 24 120 120) for display.",
            fontsize=10, va="top", ha="left", color="#333333")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def check_shapes() -> None:
    """Run the tiny model with hooks and check the strides and widths the figure shows."""
    import torch

    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=128, num_queries=8).eval()
    seen = {}
    hooks = [
        model.neck.register_forward_hook(lambda m, a, o: seen.__setitem__("F_v", o.shape)),
        model.decoder.register_forward_hook(lambda m, a, o: seen.__setitem__("F_c", o.shape)),
        model.query_generator.register_forward_hook(lambda m, a, o: seen.__setitem__("F_q", o[0].shape)),
        model.head.mask_generator.projection.register_forward_hook(lambda m, a, o: seen.__setitem__("F_c'", o.shape)),
    ]
    ids, mask = model.tokenize(["the man in red on the left"])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128), ids, mask, return_query_masks=True)
    for h in hooks:
        h.remove()
    side, dim, n = 128, 64, 8
    expected = {"F_v": (1, dim, side // 16, side // 16), "F_c": (1, dim, side // 16, side // 16),
                "F_q": (1, n, dim), "F_c'": (1, dim // 4, side // 4, side // 4)}
    for key, shape in expected.items():
        assert tuple(seen[key]) == shape, f"{key}: figure pattern {shape}, model gives {tuple(seen[key])}"
    assert tuple(out.logits.shape) == (1, 1, side // 4, side // 4)
    assert tuple(out.query_masks.shape) == (1, n, side // 4, side // 4)
    print("shapes match the figure's pattern:", {k: tuple(v) for k, v in seen.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--check-shapes", action="store_true", help="also verify the shape pattern on the tiny model")
    args = parser.parse_args()
    if args.check_shapes:
        check_shapes()
    print(f"wrote {draw(args.output, args.dpi)}")


if __name__ == "__main__":
    main()
