"""Retrofit the Vision-Language Aligner into CRIS (DerrickWang005/CRIS.pytorch).

Axis legend: b batch, n queries, l words (17), c channels, d query width, h w space
(26 x 26 at stride 16 for a 416 input), H W mask space (104 x 104 at stride 4).

CRIS's head is ``model.proj``, a ``Projector`` that turns the sentence vector ``state`` into
one 3x3 kernel (plus bias) per sample and applies it to the decoder output upsampled to
stride 4. The retrofit keeps CRIS's backbone, neck and decoder (the same module objects, so
the same weights and the same state-dict keys) and replaces that single sentence kernel by
the aligner's n query kernels, with queries built from CRIS's own features:

- vision maps: the three maps of ``backbone.encode_image(img)``, ``(b 512 52 52)``,
  ``(b 1024 26 26)``, ``(b embed_dim 13 13)`` for RN50 at 416 (strides 8, 16, 32);
- words: ``word (b l 512)`` of ``backbone.encode_text`` (after ``ln_final``, before the text
  projection, the same tensor CRIS's decoder reads); word mask ``~pad_mask`` (CRIS's
  ``pad_mask`` is True on padding, id 0; the generator wants True on real words);
- global vision feature: the spatial mean of the stride-32 map (CLIP's attention-pooled
  ``(b embed_dim 13 13)``; its width equals the sentence ``state``'s: 1024 RN50, 512 RN101);
- the aligner reads the decoder output ``fq (b 512 26 26)`` and up-projects it to stride 4
  exactly as the Projector's ``vis`` does (same layers and channels: 2x bilinear upsampling +
  3x3 conv-BN-ReLU 512 -> 512, 2x upsampling + 3x3 conv-BN-ReLU 512 -> 256, 1x1 conv 256 ->
  256; 3.61 M parameters for CRIS's ``in_dim=256``), so that CRIS and CRIS + aligner differ
  only by the kernels and the query generator, and the prediction keeps CRIS's
  ``(b 1 104 104)``.

The returned :class:`CRISWithAligner` keeps ``CRIS.forward(img, word, mask=None)``: in training
it returns ``(pred.detach(), mask, loss)`` with the mask resized (nearest) to the prediction
and binary cross-entropy with logits; in evaluation it returns ``pred.detach()``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from adapters import check_has_modules, check_retrofit_args, pooled_global_vision
from vlaligner import MultiQueryGenerator, VisionLanguageAligner
from vlaligner.losses import mask_bce_loss, resize_target

__all__ = ["CRISWithAligner", "retrofit_cris"]


class CRISWithAligner(nn.Module):
    """CRIS with its final kernel ``proj`` swapped; ``forward`` is CRIS's.

    Attributes ``backbone``, ``neck`` and ``decoder`` are the host's own modules (state-dict
    keys unchanged). ``proj`` is the final kernel: a :class:`vlaligner.VisionLanguageAligner`
    (``head="aligner"``, with ``query_generator`` a :class:`vlaligner.MultiQueryGenerator`)
    or the host's own ``Projector`` (``head="fixed"``, ``query_generator`` None).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        decoder: nn.Module,
        proj: nn.Module,
        query_generator: Optional[MultiQueryGenerator],
        use_global_vision: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decoder = decoder
        self.proj = proj
        self.query_generator = query_generator
        self.use_global_vision = use_global_vision
        self.head = "fixed" if query_generator is None else "aligner"

    def predict(
        self, img: torch.Tensor, word: torch.Tensor, *, return_query_masks: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Logits with gradients, plus the aligner's query scores and masks.

        Args:
            img: ``(b 3 H W)`` normalised image (CRIS: 416 x 416).
            word: ``(b l)`` CLIP token ids, 0 = padding.
            return_query_masks: also return the n per-query masks.

        Returns:
            ``pred (b 1 H/4 W/4)``, ``query_scores (b n)`` or None (fixed head), and
            ``query_masks (b n H/4 W/4)`` or None.
        """
        if not isinstance(word, torch.Tensor) or word.dim() != 2:
            raise ValueError(
                "word must be a (b l) tensor of CLIP token ids (0 = padding), got "
                f"{tuple(word.shape) if isinstance(word, torch.Tensor) else type(word).__name__}"
            )
        pad_mask = word == 0  # CRIS's convention: True on padding
        vis = self.backbone.encode_image(img)
        words, state = self.backbone.encode_text(word)
        fq = self.neck(vis, state)
        b, c, h, w = fq.shape
        fq = self.decoder(fq, words, pad_mask).reshape(b, c, h, w)
        if self.query_generator is None:
            return self.proj(fq, state), None, None
        global_vision = pooled_global_vision(vis[2]) if self.use_global_vision else None
        queries = self.query_generator(list(vis), words, ~pad_mask, global_vision)
        out = self.proj(fq, queries, return_query_masks=return_query_masks)
        return out.logits, out.query_scores, out.query_masks

    def forward(
        self, img: torch.Tensor, word: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """CRIS's forward.

        Args:
            img: ``(b 3 H W)``.
            word: ``(b l)`` token ids, 0 = padding.
            mask: ``(b 1 H W)`` float target, required in training.

        Returns:
            training: ``(pred (b 1 H/4 W/4) detached, mask (b 1 H/4 W/4), loss scalar)``;
            evaluation: ``pred (b 1 H/4 W/4)`` detached (logits; CRIS applies the sigmoid).
        """
        pred, _, _ = self.predict(img, word)
        if self.training:
            if mask is None:
                raise ValueError("CRIS needs mask (b 1 H W) in training mode, got None")
            if pred.shape[-2:] != mask.shape[-2:]:
                mask = resize_target(mask, tuple(pred.shape[-2:])).detach()
            loss = mask_bce_loss(pred, mask)
            return pred.detach(), mask, loss
        return pred.detach()


def retrofit_cris(
    model: nn.Module,
    *,
    num_queries: int = 24,
    kernel_size: int = 3,
    use_estimator: bool = True,
    head: str = "aligner",
    query_dim: Optional[int] = None,
    num_heads: int = 8,
    use_global_vision: bool = True,
    grid_size: Tuple[int, int] = (26, 26),
) -> CRISWithAligner:
    """Return CRIS with the Vision-Language Aligner in place of its ``Projector``.

    Args:
        model: a ``CRIS`` as built by CRIS's ``model.build_segmenter(cfg)`` (or ``CRIS(cfg)``):
            with ``backbone`` (``encode_image`` / ``encode_text``), ``neck``, ``decoder`` and
            ``proj`` (a ``Projector`` with ``in_dim`` and ``kernel_size``). It is not modified;
            its modules are shared with the result, so use only the result afterwards.
        num_queries: n, the aligner's queries (paper: 24).
        kernel_size: odd k of each query kernel (CRIS's Projector: 3).
        use_estimator: weight the n masks by the Multi-Query Estimator (else 1/n each).
        head: ``"aligner"``, or ``"fixed"`` to keep CRIS's Projector (same outputs as
            ``model``, through the same wrapper, for side-by-side runs).
        query_dim: d, the query width; default the decoder width (``2 * proj.in_dim``, 512).
        num_heads: attention heads of the estimator.
        use_global_vision: feed the pooled stride-32 map to the generator as ``F_g``
            (paper Eq. 8); False builds the ablation without it.
        grid_size: the grid the generator pools its per-query maps to: CRIS's stride-16 grid,
            ``input_size // 16`` (26 at 416).

    Returns:
        A :class:`CRISWithAligner` whose ``forward(img, word, mask=None)`` behaves as CRIS's.
    """
    check_retrofit_args(
        head=head, num_queries=num_queries, kernel_size=kernel_size,
        use_estimator=use_estimator, query_dim=query_dim, num_heads=num_heads,
    )
    check_has_modules(model, ("backbone", "neck", "decoder", "proj"), "CRIS", "model.build_segmenter(cfg)")
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model.backbone, method, None)):
            raise TypeError(f"model.backbone must be CRIS's CLIP with {method}(), got {type(model.backbone).__name__}")
    in_dim = getattr(model.proj, "in_dim", None)
    if not isinstance(in_dim, int):
        raise TypeError(
            "model.proj must be CRIS's Projector (with an int in_dim: half the decoder width), "
            f"got {type(model.proj).__name__}"
        )
    if head == "fixed":
        return CRISWithAligner(
            backbone=model.backbone, neck=model.neck, decoder=model.decoder, proj=model.proj,
            query_generator=None, use_global_vision=use_global_vision,
        ).train(model.training)

    vision_channels, text_dim, global_dim = _cris_feature_widths(model)
    width = 2 * in_dim  # the Projector's input: the decoder width (cfg.vis_dim)
    dim = width if query_dim is None else query_dim
    if use_estimator and dim % num_heads:
        raise ValueError(
            f"the query width ({dim}) must be divisible by num_heads ({num_heads}); pass query_dim"
        )
    generator = MultiQueryGenerator(
        vision_channels=vision_channels, text_dim=text_dim, dim=dim, num_queries=num_queries,
        global_vision_dim=global_dim if use_global_vision else None, grid_size=grid_size,
    )
    aligner = VisionLanguageAligner(
        in_channels=width, query_dim=dim, kernel_size=kernel_size, num_heads=num_heads,
        use_estimator=use_estimator, num_upsamples=2, mask_channels=in_dim,
        # CRIS's Projector.vis: 2x up + 3x3 conv to 2*in_dim, 2x up + 3x3 conv to in_dim, 1x1 to in_dim.
        hidden_channels=(width, in_dim),
    )
    device, dtype = _device_dtype(model)
    generator.to(device=device, dtype=dtype)
    aligner.to(device=device, dtype=dtype)
    return CRISWithAligner(
        backbone=model.backbone, neck=model.neck, decoder=model.decoder, proj=aligner,
        query_generator=generator, use_global_vision=use_global_vision,
    ).train(model.training)


def _device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


@torch.no_grad()
def _cris_feature_widths(model: nn.Module) -> Tuple[Tuple[int, int, int], int, int]:
    """Channels of CRIS's three visual maps, the word width and the stride-32 width.

    The map channels are read by running ``encode_image`` once on a 64 x 64 image in eval
    mode (exact for any CLIP variant: RN50, RN101 or a user's own; the train/eval state is
    restored). The word width is CLIP's ``ln_final`` width (the text path is not probed: its
    causal mask is built for exactly ``word_len`` tokens).
    """
    backbone = model.backbone
    device, dtype = _device_dtype(model)
    was_training = backbone.training
    backbone.eval()
    try:
        vis = backbone.encode_image(torch.zeros(1, 3, 64, 64, device=device, dtype=dtype))
    finally:
        backbone.train(was_training)
    if not isinstance(vis, (tuple, list)) or len(vis) != 3:
        raise TypeError("model.backbone.encode_image must return three maps (strides 8, 16, 32)")
    ln_final = getattr(backbone, "ln_final", None)
    if not isinstance(ln_final, nn.LayerNorm):
        raise TypeError(
            "model.backbone must be CRIS's CLIP with an ln_final LayerNorm (its width is the "
            f"word width), got {type(ln_final).__name__}"
        )
    channels = tuple(int(v.shape[1]) for v in vis)
    return channels, int(ln_final.normalized_shape[0]), channels[2]
