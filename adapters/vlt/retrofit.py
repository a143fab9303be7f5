"""Retrofit the Vision-Language Aligner into VLT (the PyTorch re-implementation in :mod:`adapters.vlt.model`).

Axis legend: b batch, n queries, l words, e language width, c channels, d query width,
h w space, H' W' output space (``H / out_stride``).

VLT ends in ``final_conv``, a fixed 3x3 convolution from the decoded map
``(b d H' W')`` to one logit channel. The retrofit keeps everything else (the same module
objects: same weights, same state-dict keys) and replaces that kernel by the aligner's n query
kernels applied to the same decoded map, with queries from VLT's own features:

- vision maps: the backbone's ``F_v2 (b c2 H/8 W/8)``, ``F_v3 (b c3 H/16 W/16)``,
  ``F_v4 (b c4 H/32 W/32)`` (Swin-B: 256 / 512 / 1024);
- words: BERT's ``(b l e)`` last hidden states; word mask ``attention_mask > 0`` (1 = real
  token, as ``transformers``), a bool ``(b l)``;
- global vision feature: the spatial mean of ``F_v4``.

VLT's own query machinery (generation, transformer, balance) still shapes the decoded map;
the aligner's queries are separate and only decide the final kernels. The output keeps VLT's
contract: ``forward(images, input_ids, attention_mask) -> logits (b 1 H' W')``, trained with
:func:`adapters.vlt.model.vlt_loss`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from adapters import check_retrofit_args, pooled_global_vision, shallow_module_copy
from vlaligner import MultiQueryGenerator, VisionLanguageAligner

from .model import VLT

__all__ = ["VLTWithAligner", "retrofit_vlt"]


class VLTWithAligner(VLT):
    """VLT whose ``final_conv`` is replaced by ``aligner`` fed by ``query_generator``.

    Built by :func:`retrofit_vlt` only (it shares the host's modules); ``forward`` keeps
    VLT's signature and output.
    """

    aligner: VisionLanguageAligner
    query_generator: MultiQueryGenerator
    use_global_vision: bool

    def __init__(self, *args, **kwargs) -> None:  # pragma: no cover - guard only
        raise TypeError("build a VLTWithAligner with adapters.vlt.retrofit_vlt(vlt_model, ...)")

    def predict(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        *, return_query_masks: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``logits (b 1 H' W')``, ``query_scores (b n)``, ``query_masks (b n H' W')`` or None."""
        feats = self.features(images, input_ids, attention_mask)
        global_vision = pooled_global_vision(feats.vision_feats[2]) if self.use_global_vision else None
        queries = self.query_generator(list(feats.vision_feats), feats.words, feats.word_mask, global_vision)
        out = self.aligner(feats.decoded, queries, return_query_masks=return_query_masks)
        return out.logits, out.query_scores, out.query_masks

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(b 3 H W), (b l), (b l) -> logits (b 1 H' W')``, as VLT."""
        return self.predict(images, input_ids, attention_mask)[0]


def retrofit_vlt(
    model: VLT,
    *,
    num_queries: int = 24,
    kernel_size: int = 3,
    use_estimator: bool = True,
    head: str = "aligner",
    query_dim: Optional[int] = None,
    num_heads: int = 8,
    use_global_vision: bool = True,
) -> VLT:
    """Return VLT with the Vision-Language Aligner in place of ``final_conv``.

    Args:
        model: a :class:`adapters.vlt.model.VLT` (``build_vlt_swin_b`` / ``build_vlt_tiny``).
            It is not modified; the result shares its modules, so train only the result.
        num_queries: n, the aligner's queries (paper: 24); VLT's own N_q is unchanged.
        kernel_size: odd k of each query kernel (VLT's final conv: 3).
        use_estimator: weight the n masks by the Multi-Query Estimator (else 1/n each).
        head: ``"aligner"``, or ``"fixed"``: ``model`` itself, unchanged.
        query_dim: d; default VLT's ``hidden_dim``.
        num_heads: attention heads of the estimator.
        use_global_vision: feed the pooled stride-32 map as ``F_g`` (False: the ablation).

    Returns:
        A :class:`VLTWithAligner` (or ``model`` for ``head="fixed"``).
    """
    check_retrofit_args(
        head=head, num_queries=num_queries, kernel_size=kernel_size,
        use_estimator=use_estimator, query_dim=query_dim, num_heads=num_heads,
    )
    if not isinstance(model, VLT):
        raise TypeError(f"model must be an adapters.vlt.model.VLT, got {type(model).__name__}")
    if isinstance(model, VLTWithAligner):
        raise TypeError("model already has the aligner: retrofit the plain VLT")
    if head == "fixed":
        return model
    dim = model.hidden_dim if query_dim is None else query_dim
    if use_estimator and dim % num_heads:
        raise ValueError(f"the query width ({dim}) must be divisible by num_heads ({num_heads}); pass query_dim")
    ref = model.final_conv.weight
    generator = MultiQueryGenerator(
        vision_channels=model.vision_channels, text_dim=model.text_dim, dim=dim,
        num_queries=num_queries, global_vision_dim=model.vision_channels[2] if use_global_vision else None,
        grid_size=(model.feat_size, model.feat_size),
    ).to(device=ref.device, dtype=ref.dtype)
    aligner = VisionLanguageAligner(
        in_channels=model.hidden_dim, query_dim=dim, kernel_size=kernel_size, num_heads=num_heads,
        use_estimator=use_estimator, num_upsamples=0,
    ).to(device=ref.device, dtype=ref.dtype)
    new = shallow_module_copy(model)
    new.__class__ = VLTWithAligner
    del new.final_conv  # the fixed kernel is what the aligner replaces
    new.query_generator = generator
    new.aligner = aligner
    new.use_global_vision = use_global_vision
    return new
