"""A small, test-only replica of LAVT (yz93/LAVT-RIS) for the adapter tests.

Axis legend: b batch, l words, e language width (768 upstream), c channels, h w space.

Written from the upstream code as read at commit 1da0af9 (``lib/_utils.py``,
``lib/mask_predictor.py``, ``lib/segmentation.py``, ``lib/backbone.py``, ``train.py``). LAVT is
GPLv3: nothing here is copied from it; the classes below are independent code that only
reproduce the attribute names, call signatures and tensor shapes that
``adapters/lavt/retrofit.py`` relies on, at a size that runs in milliseconds on a CPU:

- ``_LAVTSimpleDecode(backbone, classifier)`` / ``LAVT`` with ``forward(x, l_feats, l_mask)``:
  ``l_feats (b e l)`` channels-first, ``l_mask (b l 1)`` with 1 = real word; the backbone
  returns four maps ``(b C*2**i H/2**(i+2) W/2**(i+2))``, i = 0..3; the classifier is called
  as ``classifier(x_c4, x_c3, x_c2, x_c1)`` and its ``(b 2 H/4 W/4)`` output is upsampled
  (bilinear, ``align_corners=True``) to the input size.
- ``_LAVTOneSimpleDecode(backbone, classifier, args)`` / ``LAVTOne`` with ``text_encoder``
  (a BERT; here a tiny ``transformers.BertModel`` built from a config, no download) and
  ``forward(x, text, l_mask)`` with ``l_mask (b l)``.
- ``SimpleDecoding(c4_dims, factor=2)`` with the upstream attribute names (``conv1_4``,
  ``bn1_4``, ..., ``conv2_2``, ``bn2_2``) and the final fixed ``conv1_1 = Conv2d(c4_dims//2,
  2, 1)`` at stride 4.
- ``lavt(pretrained='', args=None)`` / ``lavt_one(...)``: the builders of
  ``lib/segmentation.py``; ``criterion``: the weighted cross-entropy of ``train.py``
  (weights 0.9 / 1.1), here on the CPU.

``TinyMultiModalBackbone`` stands in for ``MultiModalSwinTransformer``: strided convs with a
language gate per stage (upstream: Swin stages with PWAM fusion), same outputs and
``num_features``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LAVT", "LAVTOne", "SimpleDecoding", "TinyMultiModalBackbone", "lavt", "lavt_one",
    "criterion", "tiny_args", "random_batch",
]


class TinyMultiModalBackbone(nn.Module):
    """Four stages at strides 4, 8, 16, 32 with ``embed_dim * 2**i`` channels, each gated by language.

    ``forward(x (b 3 H W), l (b e l), l_mask (b l 1)) -> tuple of 4 maps``.
    """

    def __init__(self, *, embed_dim: int, l_in_channels: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_features = [embed_dim * 2**i for i in range(4)]
        chans = [3] + self.num_features
        self.stages = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=4 if i == 0 else 2, padding=1)
            for i in range(4)
        )
        self.lang = nn.ModuleList(nn.Conv1d(l_in_channels, c, 1) for c in self.num_features)

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        mask = l_mask.permute(0, 2, 1)  # (b 1 l)
        outs = []
        for stage, lang in zip(self.stages, self.lang):
            x = F.gelu(stage(x))
            pooled = (lang(l) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            x = x * torch.sigmoid(pooled)[:, :, None, None]
            outs.append(x)
        return tuple(outs)


class SimpleDecoding(nn.Module):
    """LAVT's top-down decoder: fuse stages 4 -> 1 with two 3x3 conv-BN-ReLU per step, then ``conv1_1``.

    ``forward(x_c4, x_c3, x_c2, x_c1) -> (b 2 h1 w1)`` logits at stride 4.
    """

    def __init__(self, c4_dims: int, factor: int = 2) -> None:
        super().__init__()
        hidden = c4_dims // factor
        skips = {"4": c4_dims // factor, "3": c4_dims // factor**2, "2": c4_dims // factor**3}
        first_in = {"4": c4_dims, "3": hidden, "2": hidden}
        for step in ("4", "3", "2"):
            setattr(self, f"conv1_{step}", nn.Conv2d(first_in[step] + skips[step], hidden, 3, padding=1, bias=False))
            setattr(self, f"bn1_{step}", nn.BatchNorm2d(hidden))
            setattr(self, f"relu1_{step}", nn.ReLU())
            setattr(self, f"conv2_{step}", nn.Conv2d(hidden, hidden, 3, padding=1, bias=False))
            setattr(self, f"bn2_{step}", nn.BatchNorm2d(hidden))
            setattr(self, f"relu2_{step}", nn.ReLU())
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)

    def forward(self, x_c4, x_c3, x_c2, x_c1):
        x = x_c4
        for step, skip in (("4", x_c3), ("3", x_c2), ("2", x_c1)):
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = torch.cat([x, skip], dim=1)
            for i in ("1", "2"):
                conv, bn, relu = (getattr(self, f"{kind}{i}_{step}") for kind in ("conv", "bn", "relu"))
                x = relu(bn(conv(x)))
        return self.conv1_1(x)


class _LAVTSimpleDecode(nn.Module):
    def __init__(self, backbone: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x, l_feats, l_mask):
        size = x.shape[-2:]
        x_c1, x_c2, x_c3, x_c4 = self.backbone(x, l_feats, l_mask)
        out = self.classifier(x_c4, x_c3, x_c2, x_c1)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=True)


class LAVT(_LAVTSimpleDecode):
    pass


class _LAVTOneSimpleDecode(nn.Module):
    def __init__(self, backbone: nn.Module, classifier: nn.Module, args: Any) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.backbone = backbone
        self.classifier = classifier
        # Upstream: BertModel.from_pretrained(args.ck_bert); here a tiny BERT from a config.
        self.text_encoder = BertModel(BertConfig(
            vocab_size=args.vocab_size, hidden_size=args.text_dim, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=2 * args.text_dim, max_position_embeddings=64,
        ))
        self.text_encoder.pooler = None

    def forward(self, x, text, l_mask):
        size = x.shape[-2:]
        l_feats = self.text_encoder(text, attention_mask=l_mask)[0].permute(0, 2, 1)
        l_mask = l_mask.unsqueeze(dim=-1)
        x_c1, x_c2, x_c3, x_c4 = self.backbone(x, l_feats, l_mask)
        out = self.classifier(x_c4, x_c3, x_c2, x_c1)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=True)


class LAVTOne(_LAVTOneSimpleDecode):
    pass


def _segm(args: Any, one: bool) -> nn.Module:
    backbone = TinyMultiModalBackbone(embed_dim=args.embed_dim, l_in_channels=args.text_dim)
    classifier = SimpleDecoding(8 * args.embed_dim)
    return LAVTOne(backbone, classifier, args) if one else LAVT(backbone, classifier)


def lavt(pretrained: str = "", args: Any = None) -> nn.Module:
    return _segm(args, one=False)


def lavt_one(pretrained: str = "", args: Any = None) -> nn.Module:
    return _segm(args, one=True)


def criterion(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``train.py``'s loss: cross-entropy over the 2 channels with class weights 0.9 / 1.1."""
    weight = torch.tensor([0.9, 1.1], device=input.device)
    return F.cross_entropy(input, target, weight=weight)


def tiny_args(**overrides: Any) -> SimpleNamespace:
    """The args the builders read, at toy size (upstream: Swin-B embed_dim 128, BERT 768)."""
    args = dict(model="lavt", embed_dim=8, text_dim=24, vocab_size=60, img_size=64, num_words=6)
    args.update(overrides)
    return SimpleNamespace(**args)


def random_batch(args: Any, batch_size: int = 2, seed: int = 0):
    """``image (b 3 S S)``, ``target (b S S)`` long, ``l_feats (b e l)``, ``l_mask (b l 1)`` float 0/1, ``ids (b l)``."""
    g = torch.Generator().manual_seed(seed)
    s, l = args.img_size, args.num_words
    image = torch.randn(batch_size, 3, s, s, generator=g)
    target = (torch.rand(batch_size, s, s, generator=g) > 0.5).long()
    l_feats = torch.randn(batch_size, args.text_dim, l, generator=g)
    mask = torch.zeros(batch_size, l)
    for i in range(batch_size):
        mask[i, : 2 + i % (l - 2)] = 1
    ids = torch.randint(1, args.vocab_size, (batch_size, l), generator=g) * mask.long()
    return image, target, l_feats, mask[:, :, None], ids
