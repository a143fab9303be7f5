"""VLT (Vision-Language Transformer) re-implemented in PyTorch, as a host for the aligner.

Axis legend: b batch, l words, e language width, n queries (VLT's N_q), c channels,
d width (hidden_dim), h w the stride-16 grid, t = h*w tokens, H W output space.

This is a re-implementation, not a port: the official VLT code
(henghuiding/Vision-Language-Transformer, MIT) is TensorFlow 1.15 / Keras 2.3 with a
Darknet-53 backbone and spaCy + bi-GRU language features, and does not install on current
Python. The module below follows the structure of the VLT papers (Ding et al., ICCV 2021 and
the TPAMI 2022 extension, which moves to Swin-B + BERT-base, the version EAVL compares
against) and of ``model/vlt_model.py`` as read at commit 9b24015, with Swin from ``timm`` and
BERT from ``transformers``:

1. encoders: three Swin maps ``F_v2 (b c2 H/8 W/8)``, ``F_v3 (b c3 H/16 W/16)``,
   ``F_v4 (b c4 H/32 W/32)``; BERT words ``(b l e)``; the sentence ``(b e)`` by attention
   pooling over the real words (VLT's ``lang_att``: tanh scores, softmax over words);
2. fusion (``simple_fusion`` and the up/down projections of ``make_multitask_braches``):
   ``F_v4 * sentence`` at stride 32, merged top-down with ``F_v3`` and ``F_v2`` into
   ``F_mq (b fusion_dim/2 h w)`` for query generation and ``F_tf (b d h w)`` for the
   transformer, both at stride 16;
3. Query Generation Module: coordinates + three 3x3 convs + 1x1 conv turn ``F_mq`` into n
   spatial maps, each flattened and projected to a vision query ``(b n d)``; each vision
   query attends to the (sine-position-encoded) words and the result is added to it: the
   queries ``F_q (b n d)``, one reading of the sentence each;
4. transformer: an encoder over the ``t`` tokens of ``F_tf`` (sine positions) and a decoder
   whose inputs are the queries, attending to the encoder output: ``(b n d)``;
5. Query Balance Module: a confidence ``sigmoid(MLP([dec, F_q]))`` per query scales its
   decoder output;
6. mask decoding: each balanced query becomes an ``h x w`` map through a linear layer (VLT's
   ``Dense(h*w)``, so the grid ``feat_size`` is fixed at build time from the input size), the
   n maps are convolved and upsampled to ``out_stride`` (VLT's ``seg_out_stride``, 2), and
7. ``final_conv``: the fixed 3x3 convolution to one logit channel. This is the kernel
   :func:`adapters.vlt.retrofit_vlt` replaces by the aligner.

Loss: binary cross-entropy with logits against the mask resized (nearest) to the logits,
averaged over pixels (VLT sums over pixels and averages over the batch; the two differ by a
constant factor that Adam's step size ignores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlaligner.functional import coord_features
from vlaligner.losses import mask_bce_loss

__all__ = [
    "VLT",
    "VLTFeatures",
    "build_vlt_tiny",
    "build_vlt_swin_b",
    "vlt_loss",
    "sine_encoding_1d",
    "sine_encoding_2d",
]


def conv_bn_leaky(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Darknet's ``DarknetConv2D_BN_Leaky``: conv (no bias), BN, LeakyReLU(0.1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1, inplace=True),
    )


def sine_encoding_1d(length: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Transformer sine/cosine positions ``(length dim)`` (keras ``TrigPosEmbedding``)."""
    if dim % 2:
        raise ValueError(f"dim must be even for a sine encoding, got {dim}")
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe.to(dtype or torch.float32)


def sine_encoding_2d(h: int, w: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """2-D sine positions ``(h*w dim)``: half the channels code x, half code y (row-major tokens)."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sine encoding, got {dim}")
    x = sine_encoding_1d(w, dim // 2, device=device, dtype=dtype)  # (w dim/2)
    y = sine_encoding_1d(h, dim // 2, device=device, dtype=dtype)  # (h dim/2)
    grid = torch.cat([x[None].expand(h, w, -1), y[:, None].expand(h, w, -1)], dim=-1)
    return rearrange(grid, "h w d -> (h w) d")


@dataclass
class VLTFeatures:
    """What VLT computes before its final kernel (read by the retrofit).

    Attributes:
        vision_feats: ``(F_v2 (b c2 H/8 W/8), F_v3 (b c3 H/16 W/16), F_v4 (b c4 H/32 W/32))``.
        words: ``(b l e)`` BERT word features (values at padding are meaningless).
        word_mask: ``(b l)`` bool, True on real words.
        sentence: ``(b e)`` attention-pooled sentence feature.
        decoded: ``(b d H' W')`` features at ``out_stride``, the final kernel's input.
        query_confidence: ``(b n)`` the Query Balance Module's confidences.
    """

    vision_feats: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    words: torch.Tensor
    word_mask: torch.Tensor
    sentence: torch.Tensor
    decoded: torch.Tensor
    query_confidence: torch.Tensor


class WordAttentionPool(nn.Module):
    """VLT's ``lang_att``: per-channel tanh scores, softmax over the real words, weighted sum.

    ``words (b l e), word_mask (b l) -> (b e)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, dim)

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        scores = torch.tanh(self.score(words)).masked_fill(~word_mask[..., None], float("-inf"))
        weights = scores.softmax(dim=1).nan_to_num(0.0)  # an all-padding row pools to zero
        return (weights * words).sum(dim=1)


class VLTFusion(nn.Module):
    """VLT's multi-modal fusion: ``F_v2, F_v3, F_v4, sentence -> F_mq (b f/2 h w), F_tf (b d h w)``.

    Stride 32: ``F_m = leaky(BN(conv(F_v4) * leaky(LN(W s))))``. Stride 16: ``F_mid =
    conv1x1([up(F_m), conv1x1(F_v3)])``; ``F_mq = conv1x1([F_mid, conv1x1(avgpool(F_v2))])``;
    ``F_tf = conv1x1([up(F_m), conv1x1([conv3x3(conv1x1(F_mq)), F_mid])])`` then to ``d``.
    """

    def __init__(self, *, vision_channels: Sequence[int], text_dim: int, fusion_dim: int, hidden_dim: int) -> None:
        super().__init__()
        c2, c3, c4 = (int(c) for c in vision_channels)
        half = fusion_dim // 2
        self.vision_proj = conv_bn_leaky(c4, fusion_dim, 3)
        # VLT normalises the projected sentence with BatchNorm; LayerNorm keeps batch-1
        # training possible (BatchNorm1d cannot train on one sample).
        self.sentence_proj = nn.Sequential(
            nn.Linear(text_dim, fusion_dim), nn.LayerNorm(fusion_dim), nn.LeakyReLU(0.1)
        )
        self.fuse_norm = nn.Sequential(nn.BatchNorm2d(fusion_dim), nn.LeakyReLU(0.1))
        self.mid_skip = conv_bn_leaky(c3, c3, 1)
        self.mid_out = conv_bn_leaky(fusion_dim + c3, half, 1)
        self.query_skip = conv_bn_leaky(c2, c2, 1)
        self.query_out = conv_bn_leaky(half + c2, half, 1)
        self.tf_reduce = conv_bn_leaky(half, half // 2, 1)
        self.tf_expand = conv_bn_leaky(half // 2, half, 3)
        self.tf_skip = conv_bn_leaky(2 * half, half, 1)
        self.tf_out = conv_bn_leaky(fusion_dim + half, half, 1)
        self.tf_proj = conv_bn_leaky(half, hidden_dim, 1)

    def forward(
        self, vision_feats: Sequence[torch.Tensor], sentence: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        f2, f3, f4 = vision_feats
        size = f3.shape[-2:]
        fm = self.fuse_norm(self.vision_proj(f4) * self.sentence_proj(sentence)[:, :, None, None])
        fm_up = F.interpolate(fm, size=size, mode="nearest")  # keras UpSampling2D
        mid = self.mid_out(torch.cat([fm_up, self.mid_skip(f3)], dim=1))
        pooled = F.adaptive_avg_pool2d(f2, size)
        fmq = self.query_out(torch.cat([mid, self.query_skip(pooled)], dim=1))
        tf_mid = torch.cat([self.tf_expand(self.tf_reduce(fmq)), mid], dim=1)
        ftf = self.tf_out(torch.cat([fm_up, self.tf_skip(tf_mid)], dim=1))
        return fmq, self.tf_proj(ftf)


class QueryGenerationModule(nn.Module):
    """VLT's QGM: ``F_mq (b c h w), words (b l e), word_mask (b l) -> F_q (b n d)``.

    n spatial maps from ``[F_mq, x, y]`` (three 3x3 convs, one 1x1), each flattened and
    projected to ``d`` (ReLU): the vision queries. They attend to the projected words (sine
    positions on both, padding masked) and the attended words are added to them.
    """

    def __init__(
        self, *, in_channels: int, text_dim: int, hidden_dim: int, num_queries: int, feat_size: int, num_heads: int
    ) -> None:
        super().__init__()
        c = in_channels + 2
        self.maps = nn.Sequential(
            conv_bn_leaky(c, c, 3), conv_bn_leaky(c, c, 3), conv_bn_leaky(c, c, 3),
            nn.Conv2d(c, num_queries, 1),
        )
        self.feat_size = feat_size
        self.vision_proj = nn.Linear(feat_size * feat_size, hidden_dim)
        self.lang_proj = nn.Linear(text_dim, hidden_dim)
        self.q = nn.Linear(hidden_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)

    def forward(self, fmq: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        b, _, h, w = fmq.shape
        coords = coord_features(b, h, w, device=fmq.device, dtype=fmq.dtype)
        maps = self.maps(torch.cat([fmq, coords], dim=1))
        if (h, w) != (self.feat_size, self.feat_size):
            raise ValueError(
                f"VLT was built for a {self.feat_size} x {self.feat_size} stride-16 grid "
                f"(input {16 * self.feat_size}), got a {h} x {w} grid: resize the input"
            )
        vision = F.relu(self.vision_proj(rearrange(maps, "b n h w -> b n (h w)")))
        lang = F.relu(self.lang_proj(words))
        n, l, d = vision.shape[1], lang.shape[1], vision.shape[2]
        q = F.relu(self.q(vision + sine_encoding_1d(n, d, device=vision.device, dtype=vision.dtype)))
        lang_pos = lang + sine_encoding_1d(l, d, device=lang.device, dtype=lang.dtype)
        k, v = F.relu(self.k(lang_pos)), F.relu(self.v(lang_pos))
        # A sentence with no real word would make every key masked (NaN); let it see all.
        key_padding = ~word_mask & word_mask.any(dim=1, keepdim=True)
        attended = self.attention(q, k, v, key_padding_mask=key_padding, need_weights=False)[0]
        return vision + attended


class QueryBalanceModule(nn.Module):
    """VLT's QBM: ``decoded (b n d), queries (b n d) -> (balanced (b n d), confidence (b n))``."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.decoded_proj = nn.Linear(hidden_dim, hidden_dim)
        self.query_proj = nn.Linear(hidden_dim, hidden_dim)
        self.mix = nn.Linear(2 * hidden_dim, hidden_dim)
        self.confidence = nn.Linear(hidden_dim, 1)

    def forward(self, decoded: torch.Tensor, queries: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([F.relu(self.decoded_proj(decoded)), F.relu(self.query_proj(queries))], dim=-1)
        confidence = torch.sigmoid(self.confidence(F.relu(self.mix(both))))
        return confidence * decoded, confidence[..., 0]


class VLT(nn.Module):
    """VLT with a Swin-like backbone and a BERT-like language model (both passed in).

    Args:
        backbone: returns three maps at strides 8, 16, 32 (channels ``vision_channels``), NCHW
            or NHWC (``vision_channels_last=True``, timm's Swin).
        vision_channels: ``(c2, c3, c4)``.
        language_model: a ``transformers`` encoder (``last_hidden_state (b l e)``).
        text_dim: e.
        feat_size: side of the stride-16 grid (``img_size // 16``); VLT's per-query
            ``Linear(d, h*w)`` fixes it.
        hidden_dim: d (VLT: 256).
        fusion_dim: width of the fusion (VLT's ``jemb_dim``: 1024).
        num_queries: n (VLT's released config: 32).
        num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout: the transformer
            (VLT: 8 heads, 2 + 2 layers, FFN 256, dropout 0.1).
        out_stride: stride of the output logits, 2, 4, 8 or 16 (VLT: 2).
        vision_channels_last: the backbone returns ``(b h w c)`` maps.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        vision_channels: Sequence[int],
        language_model: nn.Module,
        text_dim: int,
        feat_size: int,
        hidden_dim: int = 256,
        fusion_dim: int = 1024,
        num_queries: int = 32,
        num_heads: int = 8,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        ffn_dim: int = 256,
        dropout: float = 0.1,
        out_stride: int = 2,
        vision_channels_last: bool = False,
    ) -> None:
        super().__init__()
        if out_stride not in (2, 4, 8, 16):
            raise ValueError(f"out_stride must be 2, 4, 8 or 16, got {out_stride}")
        if len(vision_channels) != 3:
            raise ValueError(f"vision_channels must list three widths (strides 8, 16, 32), got {vision_channels}")
        if hidden_dim % 4 or hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a multiple of 4 and of num_heads ({num_heads})")
        if feat_size < 1:
            raise ValueError(f"feat_size must be >= 1, got {feat_size}")
        self.vision_channels = tuple(int(c) for c in vision_channels)
        self.text_dim = text_dim
        self.feat_size = feat_size
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.out_stride = out_stride
        self.vision_channels_last = vision_channels_last
        self.backbone = backbone
        if getattr(language_model, "pooler", None) is not None:
            language_model.pooler = None  # never used: an unused module would break DDP
        self.language_model = language_model
        self.sentence_pool = WordAttentionPool(text_dim)
        self.fusion = VLTFusion(
            vision_channels=self.vision_channels, text_dim=text_dim, fusion_dim=fusion_dim, hidden_dim=hidden_dim
        )
        self.query_generation = QueryGenerationModule(
            in_channels=fusion_dim // 2, text_dim=text_dim, hidden_dim=hidden_dim,
            num_queries=num_queries, feat_size=feat_size, num_heads=num_heads,
        )
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(hidden_dim, num_heads, ffn_dim, dropout, batch_first=True),
            num_encoder_layers, enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, batch_first=True),
            num_decoder_layers,
        )
        self.query_balance = QueryBalanceModule(hidden_dim)
        self.query_to_map = nn.Linear(hidden_dim, feat_size * feat_size)
        post = [conv_bn_leaky(num_queries, hidden_dim, 3), conv_bn_leaky(hidden_dim, hidden_dim, 3),
                conv_bn_leaky(hidden_dim, hidden_dim, 3)]
        stride = 16
        while stride > out_stride:
            post += [nn.Upsample(scale_factor=2, mode="nearest"), conv_bn_leaky(hidden_dim, hidden_dim, 3)]
            stride //= 2
        self.postprocess = nn.Sequential(*post)
        self.final_conv = nn.Conv2d(hidden_dim, 1, 3, padding=1)

    def encode(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images (b 3 H W)``, ``input_ids (b l)``, ``attention_mask (b l)`` (1 = real) ->
        ``(vision_feats, words (b l e), word_mask (b l) bool, sentence (b e))``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                "images must have shape (b 3 H W), got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
            )
        side = 16 * self.feat_size
        if tuple(images.shape[-2:]) != (side, side):
            # VLT's per-query Linear(d, h*w) fixes the grid, hence the input size.
            raise ValueError(
                f"VLT was built for {side} x {side} inputs (a {self.feat_size} x {self.feat_size} "
                f"stride-16 grid), got images of shape {tuple(images.shape)}: resize the input"
            )
        if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                "input_ids and attention_mask must both have shape (b l), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"images and input_ids must have the same batch size, got {images.shape[0]} and {input_ids.shape[0]}")
        feats = tuple(self.backbone(images))[-3:]
        if self.vision_channels_last:
            feats = tuple(rearrange(f, "b h w c -> b c h w") for f in feats)
        words = self.language_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        word_mask = attention_mask > 0
        return feats, words, word_mask, self.sentence_pool(words, word_mask)

    def features(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> VLTFeatures:
        """Everything up to (not including) ``final_conv``."""
        feats, words, word_mask, sentence = self.encode(images, input_ids, attention_mask)
        fmq, ftf = self.fusion(feats, sentence)
        queries = self.query_generation(fmq, words, word_mask)
        h, w = ftf.shape[-2:]
        tokens = rearrange(ftf, "b d h w -> b (h w) d")
        memory = self.encoder(tokens + sine_encoding_2d(h, w, self.hidden_dim, device=tokens.device, dtype=tokens.dtype))
        n = queries.shape[1]
        decoded = self.decoder(
            queries + sine_encoding_1d(n, self.hidden_dim, device=queries.device, dtype=queries.dtype), memory
        )
        balanced, confidence = self.query_balance(decoded, queries)
        maps = rearrange(F.relu(self.query_to_map(balanced)), "b n (h w) -> b n h w", h=h, w=w)
        return VLTFeatures(
            vision_feats=feats, words=words, word_mask=word_mask, sentence=sentence,
            decoded=self.postprocess(maps), query_confidence=confidence,
        )

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(b 3 H W), (b l), (b l) -> logits (b 1 H/out_stride W/out_stride)`` (same in train and eval)."""
        return self.final_conv(self.features(images, input_ids, attention_mask).decoded)


def vlt_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits, ``logits (b 1 h w)`` against ``target (b H W)`` / ``(b 1 H W)`` resized (nearest)."""
    return mask_bce_loss(logits, target)


def _swin_backbone(name: str, *, img_size: int, pretrained: bool, **kwargs: Any) -> Tuple[nn.Module, Tuple[int, ...]]:
    import timm  # an extra: imported where used

    backbone = timm.create_model(
        name, pretrained=pretrained, features_only=True, out_indices=(1, 2, 3), img_size=img_size, **kwargs
    )
    reductions = tuple(backbone.feature_info.reduction())
    if reductions != (8, 16, 32):
        raise ValueError(f"{name}: VLT needs stages at strides 8, 16, 32, got {reductions}")
    return backbone, tuple(backbone.feature_info.channels())


def build_vlt_tiny(
    *,
    img_size: int = 64,
    num_queries: int = 8,
    hidden_dim: int = 32,
    out_stride: int = 4,
    vocab_size: int = 30522,
    max_length: int = 32,
) -> VLT:
    """A VLT small enough for CPU tests: Swin with 16-wide stages, a 1-layer 32-wide BERT.

    ``img_size`` must be a multiple of 32 (the Swin windows are 2 x 2 tokens).
    """
    from transformers import BertConfig, BertModel

    if img_size % 32:
        raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
    backbone, channels = _swin_backbone(
        "swin_tiny_patch4_window7_224", img_size=img_size, pretrained=False,
        embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2,
    )
    bert = BertModel(BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max(max_length, 32),
    ), add_pooling_layer=False)
    return VLT(
        backbone=backbone, vision_channels=channels, language_model=bert, text_dim=32,
        feat_size=img_size // 16, hidden_dim=hidden_dim, fusion_dim=64, num_queries=num_queries,
        num_heads=4, ffn_dim=64, out_stride=out_stride, vision_channels_last=True,
    )


def build_vlt_swin_b(
    *,
    pretrained: bool = False,
    img_size: int = 480,
    bert: Optional[str] = None,
    num_queries: int = 32,
    out_stride: int = 2,
) -> VLT:
    """VLT as the EAVL paper compares against (TPAMI version): Swin-B + BERT-base, d = 256.

    Args:
        pretrained: load ImageNet-22k Swin-B weights through timm (its cache or a download:
            the user's explicit choice; nothing is fetched when False).
        img_size: input side, a multiple of 32 (480 as EAVL; VLT used 416).
        bert: a local folder (or hub id, if the user's cache has it) for
            ``BertModel.from_pretrained``; None builds BERT-base from its config, untrained.
        num_queries: n (VLT's released config: 32).
        out_stride: stride of the output logits (VLT: 2).
    """
    from transformers import BertConfig, BertModel

    if img_size % 32:
        raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
    backbone, channels = _swin_backbone("swin_base_patch4_window12_384", img_size=img_size, pretrained=pretrained)
    if bert is None:
        language_model = BertModel(BertConfig(), add_pooling_layer=False)  # BertConfig() is BERT-base
    else:
        language_model = BertModel.from_pretrained(bert, add_pooling_layer=False)
    return VLT(
        backbone=backbone, vision_channels=channels, language_model=language_model,
        text_dim=language_model.config.hidden_size, feat_size=img_size // 16, hidden_dim=256,
        fusion_dim=1024, num_queries=num_queries, num_heads=8, ffn_dim=256, out_stride=out_stride,
        vision_channels_last=True,
    )
