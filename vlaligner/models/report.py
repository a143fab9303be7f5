"""Parameter and FLOP report for an EAVL model or builder (used by the benchmarks).

Axis legend: b batch, l words, H W input size.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one eval-mode forward
(matrix multiplies, convolutions and attention; a multiply-add counts as 2 FLOPs, element-wise
ops are not counted). Papers in this field usually quote fvcore's "FLOPs", which count one
per multiply-add: compare those with ``gmacs`` (= ``gflops / 2``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .eavl import EAVL

__all__ = ["model_report", "count_params", "params_by_part"]


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (each shared tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def params_by_part(model: EAVL) -> Dict[str, int]:
    """Parameters of each part of ``model`` (the parts partition the model: they sum to the total)."""
    parts: Dict[str, nn.Module] = {
        "backbone": model.image_encoder.backbone,
        "attention_pool": model.image_encoder.pool,
        "language_model": model.text_encoder.language_model,
        "text_projections": nn.ModuleList(
            m for m in (model.text_encoder.word_proj, model.text_encoder.sentence_proj) if m is not None
        ),
        "neck": model.neck,
        "query_generator": model.query_generator,
        "decoder": model.decoder,
        "head": model.head,
    }
    return {name: count_params(module) for name, module in parts.items()}


def _count_flops(model: EAVL, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, unfused: bool):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(images, ids, mask, return_query_masks=unfused)
    total = counter.get_total_flops()
    by_part: Dict[str, float] = {}
    for name, counts in counter.get_flop_counts().items():
        # Module names look like "EAVL.image_encoder.backbone"; keep the direct children.
        pieces = name.split(".")
        if len(pieces) == 2:
            by_part[pieces[1]] = sum(counts.values()) / 1e9
    return total, by_part


def _unfused_flops(model: EAVL, images, ids, mask, fused_flops: int) -> Dict[str, float]:
    """GFLOPs of an aligner that convolves with the n query kernels and sums the masks.

    The aligner computes the per-query masks on top of the fused logits when asked for them,
    so the masks cost ``extra = count(with masks) - count(without)``: n convolutions with one
    output each, i.e. n times the fused convolution. An unfused aligner runs those n and not
    the fused one: ``fused + extra * (n - 1) / n`` (element-wise sums are not counted). The
    fixed-kernel head has no queries to fuse and reports no saving.
    """
    with_masks, _ = _count_flops(model, images, ids, mask, unfused=True)
    extra = with_masks - fused_flops
    n = model.num_queries
    unfused_flops = fused_flops + extra * (n - 1) / n
    return {
        "gflops_unfused": unfused_flops / 1e9,
        "gflops_saved_by_fusion": (unfused_flops - fused_flops) / 1e9,
    }


def model_report(
    model_or_builder: Union[EAVL, str],
    *,
    img_size: Optional[int] = None,
    batch_size: int = 1,
    text_length: Optional[int] = None,
    unfused: bool = False,
    **builder_kwargs: Any,
) -> Dict[str, Any]:
    """Parameters (total and per part) and GFLOPs of one forward pass.

    Args:
        model_or_builder: an :class:`EAVL`, or a builder name from
            :data:`vlaligner.models.BUILDERS` (built with ``builder_kwargs``, random weights).
        img_size: input side (default: the model's ``img_size``).
        batch_size: b of the counted forward.
        text_length: l of the counted forward (default: the model's ``max_length``, 17);
            every token is real.
        unfused: also report ``gflops_unfused``, the count for an aligner that computes the n
            per-query masks and their weighted sum instead of one fused convolution, and
            ``gflops_saved_by_fusion`` (see :func:`_unfused_flops`).

    Returns:
        ``dict(params, params_by_part, gflops, gmacs, gflops_by_part, img_size, batch_size,
        text_length, builder)``, plus ``gflops_unfused`` and ``gflops_saved_by_fusion`` when
        ``unfused``.
    """
    if isinstance(model_or_builder, str):
        from .builders import BUILDERS

        if model_or_builder not in BUILDERS:
            raise ValueError(f"unknown builder {model_or_builder!r}; known: {sorted(BUILDERS)}")
        model = BUILDERS[model_or_builder](**builder_kwargs)
    elif isinstance(model_or_builder, EAVL):
        if builder_kwargs:
            raise TypeError(f"builder keyword arguments {sorted(builder_kwargs)} need a builder name, not a model")
        model = model_or_builder
    else:
        raise TypeError(f"model_or_builder must be an EAVL or a builder name, got {type(model_or_builder).__name__}")
    side = model.img_size if img_size is None else int(img_size)
    length = model.max_length if text_length is None else int(text_length)
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and text_length must be >= 1, got {batch_size}, {length}")
    param = next(model.parameters())
    images = torch.zeros(batch_size, 3, side, side, device=param.device, dtype=param.dtype)
    # Any in-vocabulary ids do: the FLOPs do not depend on the values.
    ids = torch.full((batch_size, length), 1, dtype=torch.long, device=param.device)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops, by_part = _count_flops(model, images, ids, mask, unfused=False)
            report: Dict[str, Any] = {
                "builder": model.config.get("builder"),
                "params": count_params(model),
                "params_by_part": params_by_part(model),
                "gflops": flops / 1e9,
                "gmacs": flops / 2e9,
                "gflops_by_part": by_part,
                "img_size": side,
                "batch_size": batch_size,
                "text_length": length,
            }
            if unfused:
                report.update(_unfused_flops(model, images, ids, mask, flops))
    finally:
        model.train(was_training)
    return report
