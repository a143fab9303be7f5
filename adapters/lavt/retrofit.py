"""Retrofit the Vision-Language Aligner into LAVT (yz93/LAVT-RIS).

Axis legend: b batch, n queries, l words (20), e language width (768), c channels,
d query width, h w space, H W input size (480).

LAVT is GPLv3, so nothing of it is copied here: this module imports nothing from LAVT and
works on the model object that LAVT's own ``lib/segmentation.py`` builds (``lavt`` or
``lavt_one``), wrapping it at run time.

LAVT's head is ``model.classifier``, a ``SimpleDecoding`` that fuses the four backbone maps
top-down and ends in a fixed ``conv1_1 = Conv2d(512, 2, 1)`` at stride 4 (Swin-B). The
retrofit keeps the backbone and the decoder's layers (the same module objects: same weights,
same state-dict keys), takes off ``conv1_1`` (on a shallow copy of the classifier, so the
model you pass in still works as before) and puts the aligner on the decoder's stride-4
features. Queries come from LAVT's own features:

- vision maps: the backbone's stride 8 / 16 / 32 outputs ``x_c2 (b 256 60 60)``,
  ``x_c3 (b 512 30 30)``, ``x_c4 (b 1024 15 15)`` (Swin-B at 480; already language-aware
  through LAVT's PWAM fusion);
- words: ``l_feats (b e l)`` (channels-first BERT states, as LAVT passes them), read as
  ``(b l e)``; word mask from ``l_mask (b l 1)`` (1 = real word) as a bool ``(b l)``;
  for ``lavt_one`` the model's own ``text_encoder`` runs first, as in LAVT;
- global vision feature: the spatial mean of ``x_c4`` (LAVT has no sentence or image
  vector; this is the pooled stage-4 feature of EAVL's Eq. 8).

The aligner and the generator live inside ``model.classifier`` (as ``classifier.aligner``
and ``classifier.query_generator``), because LAVT's ``train.py`` optimises
``classifier.parameters()``: they are trained by LAVT's own optimizer without editing it.

Output: LAVT's loss and evaluation read 2-channel logits (weighted cross-entropy, argmax).
The aligner gives one logit ``m``; the model returns ``cat([0, m])``, which is exact:
``softmax([0, m])[1] = sigmoid(m)``, ``argmax = (m > 0)``, and the cross-entropy over the two
channels equals the binary cross-entropy of ``m``. The result is upsampled to the input size
(bilinear, ``align_corners=True``) as LAVT does.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from adapters import check_has_modules, check_retrofit_args, pooled_global_vision, shallow_module_copy
from vlaligner import MultiQueryGenerator, VisionLanguageAligner

__all__ = ["LAVTWithAligner", "retrofit_lavt", "two_class_logits"]


def two_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(b 1 h w)`` foreground logit ``m`` -> ``(b 2 h w)`` LAVT logits ``[0, m]`` (exact for softmax/argmax/CE)."""
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (b 1 h w), got {tuple(logits.shape)}")
    return torch.cat([torch.zeros_like(logits), logits], dim=1)


def _check_language(l_feats: torch.Tensor, l_mask: torch.Tensor) -> None:
    if not isinstance(l_feats, torch.Tensor) or l_feats.dim() != 3:
        raise ValueError(
            "l_feats must be channels-first BERT features (b e l), got "
            f"{tuple(l_feats.shape) if isinstance(l_feats, torch.Tensor) else type(l_feats).__name__}"
        )
    b, _, l = l_feats.shape
    if not isinstance(l_mask, torch.Tensor) or tuple(l_mask.shape) != (b, l, 1):
        raise ValueError(
            f"l_mask must have shape (b l 1) = ({b}, {l}, 1) with 1 on real words, got "
            f"{tuple(l_mask.shape) if isinstance(l_mask, torch.Tensor) else type(l_mask).__name__}"
        )


class LAVTWithAligner(nn.Module):
    """LAVT (or LAVT-One) with its final ``conv1_1`` swapped; ``forward`` is LAVT's.

    Attributes ``backbone``, ``classifier`` and (LAVT-One) ``text_encoder`` carry the host's
    state-dict keys. With ``head="aligner"`` the classifier is a shallow copy of LAVT's
    ``SimpleDecoding`` whose ``conv1_1`` is ``nn.Identity`` and which holds
    ``query_generator`` (:class:`vlaligner.MultiQueryGenerator`) and ``aligner``
    (:class:`vlaligner.VisionLanguageAligner`); with ``head="fixed"`` it is LAVT's own.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        classifier: nn.Module,
        text_encoder: Optional[nn.Module],
        head: str,
        use_global_vision: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        if text_encoder is not None:
            self.text_encoder = text_encoder
        self.has_text_encoder = text_encoder is not None
        self.head = head
        self.use_global_vision = use_global_vision

    def encode_text(self, text: torch.Tensor, l_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """LAVT-One's language path: ``text (b l)`` ids, ``l_mask (b l)`` -> ``l_feats (b e l)``, ``l_mask (b l 1)``."""
        l_feats = self.text_encoder(text, attention_mask=l_mask)[0]
        return rearrange(l_feats, "b l e -> b e l"), l_mask.unsqueeze(-1)

    def predict(
        self, x: torch.Tensor, l_feats: torch.Tensor, l_mask: torch.Tensor, *, return_query_masks: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Stride-4 outputs before LAVT's upsampling.

        Args:
            x: ``(b 3 H W)`` normalised image.
            l_feats: ``(b e l)`` BERT features (LAVT), or ``(b l)`` token ids (LAVT-One).
            l_mask: ``(b l 1)`` 1 = real word (LAVT), or ``(b l)`` (LAVT-One).
            return_query_masks: also return the n per-query masks.

        Returns:
            ``logits (b 2 H/4 W/4)`` (``[0, m]`` with the aligner), ``query_scores (b n)`` or
            None, ``query_masks (b n H/4 W/4)`` or None.
        """
        if self.has_text_encoder:
            l_feats, l_mask = self.encode_text(l_feats, l_mask)
        _check_language(l_feats, l_mask)
        x_c1, x_c2, x_c3, x_c4 = self.backbone(x, l_feats, l_mask)
        decoded = self.classifier(x_c4, x_c3, x_c2, x_c1)
        if self.head == "fixed":
            return decoded, None, None
        words = rearrange(l_feats, "b e l -> b l e")
        word_mask = l_mask[..., 0] > 0
        global_vision = pooled_global_vision(x_c4) if self.use_global_vision else None
        queries = self.classifier.query_generator([x_c2, x_c3, x_c4], words, word_mask, global_vision)
        out = self.classifier.aligner(decoded, queries, return_query_masks=return_query_masks)
        return two_class_logits(out.logits), out.query_scores, out.query_masks

    def forward(self, x: torch.Tensor, l_feats: torch.Tensor, l_mask: torch.Tensor) -> torch.Tensor:
        """LAVT's forward: ``(b 2 H W)`` logits at the input size (same in train and eval).

        Args:
            x: ``(b 3 H W)``.
            l_feats: ``(b e l)`` channels-first word features (LAVT) or ``(b l)`` ids (LAVT-One).
            l_mask: ``(b l 1)`` float/int 1 = real word (LAVT) or ``(b l)`` (LAVT-One).
        """
        logits, _, _ = self.predict(x, l_feats, l_mask)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def retrofit_lavt(
    model: nn.Module,
    *,
    num_queries: int = 24,
    kernel_size: int = 3,
    use_estimator: bool = True,
    head: str = "aligner",
    query_dim: Optional[int] = None,
    num_heads: int = 8,
    text_dim: Optional[int] = None,
    use_global_vision: bool = True,
    grid_size: Tuple[int, int] = (30, 30),
) -> LAVTWithAligner:
    """Return LAVT with the Vision-Language Aligner in place of ``classifier.conv1_1``.

    Args:
        model: ``LAVT`` or ``LAVTOne`` as built by LAVT's ``lib.segmentation.lavt(...)`` /
            ``lavt_one(...)``: with ``backbone`` (``num_features``: the four stage widths),
            ``classifier`` (``SimpleDecoding`` with ``conv1_1``, a ``Conv2d(c, 2, 1)``) and,
            for LAVT-One, ``text_encoder``. It is not modified; the result shares its
            modules, so train only the result.
        num_queries: n (paper: 24).
        kernel_size: odd k of each query kernel (LAVT's conv1_1 is 1x1; the aligner's default 3).
        use_estimator: weight the n masks by the Multi-Query Estimator (else 1/n each).
        head: ``"aligner"``, or ``"fixed"`` to keep LAVT's classifier (same outputs as ``model``).
        query_dim: d; default the decoder width (``conv1_1.in_channels``, 512 for Swin-B).
        num_heads: attention heads of the estimator.
        text_dim: e, the word width in ``l_feats``; default the text encoder's hidden size for
            LAVT-One, else 768 (LAVT's PWAM reads 768-wide BERT-base features).
        use_global_vision: feed the pooled stride-32 map as ``F_g`` (False: the ablation).
        grid_size: grid for the generator's per-query maps: the stride-16 grid
            (``img_size // 16``, 30 at 480).

    Returns:
        A :class:`LAVTWithAligner` whose ``forward(x, l_feats, l_mask)`` returns ``(b 2 H W)``.
    """
    check_retrofit_args(
        head=head, num_queries=num_queries, kernel_size=kernel_size,
        use_estimator=use_estimator, query_dim=query_dim, num_heads=num_heads,
    )
    check_has_modules(model, ("backbone", "classifier"), "LAVT", "lib.segmentation.lavt(...) or lavt_one(...)")
    text_encoder = getattr(model, "text_encoder", None)
    conv = getattr(model.classifier, "conv1_1", None)
    if not isinstance(conv, nn.Conv2d) or conv.out_channels != 2:
        raise TypeError(
            "model.classifier must be LAVT's SimpleDecoding ending in conv1_1 = Conv2d(c, 2, 1), "
            f"got conv1_1 = {conv!r}"
        )
    if head == "fixed":
        return LAVTWithAligner(
            backbone=model.backbone, classifier=model.classifier, text_encoder=text_encoder,
            head="fixed", use_global_vision=use_global_vision,
        ).train(model.training)

    widths: Sequence[int] = getattr(model.backbone, "num_features", None) or ()
    if len(widths) != 4:
        raise TypeError(
            "model.backbone must be LAVT's MultiModalSwinTransformer with num_features listing "
            f"the four stage widths, got num_features = {widths!r}"
        )
    if text_dim is None:
        config = getattr(text_encoder, "config", None)
        text_dim = int(getattr(config, "hidden_size", 768))
    width = conv.in_channels
    dim = width if query_dim is None else query_dim
    if use_estimator and dim % num_heads:
        raise ValueError(f"the query width ({dim}) must be divisible by num_heads ({num_heads}); pass query_dim")
    generator = MultiQueryGenerator(
        vision_channels=[int(c) for c in widths[1:]], text_dim=text_dim, dim=dim,
        num_queries=num_queries, global_vision_dim=int(widths[3]) if use_global_vision else None,
        grid_size=grid_size,
    )
    aligner = VisionLanguageAligner(
        in_channels=width, query_dim=dim, kernel_size=kernel_size, num_heads=num_heads,
        use_estimator=use_estimator, num_upsamples=0,
    )
    generator.to(device=conv.weight.device, dtype=conv.weight.dtype)
    aligner.to(device=conv.weight.device, dtype=conv.weight.dtype)
    classifier = shallow_module_copy(model.classifier)
    # The decoder now ends at its stride-4 features; the aligner replaces the fixed 1x1 conv.
    classifier.conv1_1 = nn.Identity()
    classifier.query_generator = generator
    classifier.aligner = aligner
    return LAVTWithAligner(
        backbone=model.backbone, classifier=classifier, text_encoder=text_encoder,
        head="aligner", use_global_vision=use_global_vision,
    ).train(model.training)
