"""A small, test-only replica of CRIS (DerrickWang005/CRIS.pytorch, MIT) for the adapter tests.

Axis legend: b batch, l words, c channels, d width, h w space, k kernel size.

Written from the upstream code as read at commit e596332 (``model/segmenter.py``,
``model/layers.py``, ``model/clip.py``, ``model/__init__.py``); no upstream code is copied.
It reproduces what ``adapters/cris/retrofit.py`` relies on, at a size that runs in
milliseconds on a CPU:

- ``CRIS(cfg)`` with the attributes ``backbone``, ``neck``, ``decoder``, ``proj`` and
  ``forward(img, word, mask=None)``: ``pad_mask = word == 0``; ``vis =
  backbone.encode_image(img)`` (three maps at strides 8, 16, 32); ``word, state =
  backbone.encode_text(word)`` (``(b l width)`` after ``ln_final`` and ``(b embed_dim)`` from
  the end-of-text token); ``fq = neck(vis, state)`` at stride 16; ``decoder(fq, word,
  pad_mask)`` returns ``(b c h*w)``, reshaped to ``(b c h w)``; ``pred = proj(fq, state)``
  ``(b 1 4h 4w)``. Training returns ``(pred.detach(), mask, loss)`` with the mask resized
  (nearest) to the prediction and BCE with logits; evaluation returns ``pred.detach()``.
- ``Projector(word_dim, in_dim, kernel_size)`` with ``in_dim``, ``kernel_size``, ``vis``
  (two rounds of 2x bilinear upsampling + conv from ``2*in_dim`` channels, then a 1x1 conv to
  ``in_dim``) and ``txt`` (``Linear(word_dim, in_dim*k*k + 1)``), applied per sample with a
  grouped convolution.
- ``build_segmenter(args) -> (model, param_list)`` with CRIS's two parameter groups
  (backbone with ``lr_multi * base_lr``, everything else with ``base_lr``).

The backbone is not CLIP: ``TinyCLIP`` only keeps CLIP's method names and output shapes
(``encode_image`` -> ``(b c3 h/8 w/8), (b c4 h/16 w/16), (b embed_dim h/32 w/32)``, as
CRIS's modified ResNet with its spatial attention pooling; ``encode_text`` -> words and
state). The neck and decoder are simplified but keep the upstream call signatures, shapes
and the use of ``state`` and ``pad_mask``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CRIS", "Projector", "FPN", "TransformerDecoder", "TinyCLIP", "build_segmenter", "tiny_cfg"]


def conv_layer(in_dim: int, out_dim: int, kernel_size: int = 1, padding: int = 0) -> nn.Sequential:
    """Conv + BN + ReLU, CRIS's building block."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size, 1, padding, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(True),
    )


class TinyCLIP(nn.Module):
    """CLIP's ``encode_image`` / ``encode_text`` contract at toy size.

    ``encode_image(img (b 3 H W))`` -> ``(v3 (b c3 H/8 W/8), v4 (b c4 H/16 W/16),
    v5 (b embed_dim H/32 W/32))``. ``encode_text(text (b l))`` -> ``(words (b l width),
    state (b embed_dim))``; ``state`` is read at the end-of-text token (the largest id),
    as CLIP does.
    """

    def __init__(self, *, vis_channels: Tuple[int, int], embed_dim: int, width: int,
                 vocab_size: int, context_length: int) -> None:
        super().__init__()
        c3, c4 = vis_channels
        self.visual = nn.ModuleDict({
            "stem": nn.Sequential(nn.Conv2d(3, c3, 3, stride=8, padding=1), nn.ReLU()),
            "layer3": nn.Sequential(nn.Conv2d(c3, c4, 3, stride=2, padding=1), nn.ReLU()),
            "layer4": nn.Sequential(nn.Conv2d(c4, embed_dim, 3, stride=2, padding=1), nn.ReLU()),
        })
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, 1)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def encode_image(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v3 = self.visual["stem"](image)
        v4 = self.visual["layer3"](v3)
        v5 = self.visual["layer4"](v4)
        return v3, v4, v5

    def encode_text(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        causal = torch.triu(torch.full((text.shape[1],) * 2, float("-inf")), 1)
        x = self.ln_final(self.transformer(x, mask=causal))
        state = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return x, state


class FPN(nn.Module):
    """CRIS's neck contract: ``forward(imgs (v3, v4, v5), state (b in[2])) -> (b out[1] h4 w4)``."""

    def __init__(self, in_channels: List[int], out_channels: List[int]) -> None:
        super().__init__()
        self.txt_proj = nn.Linear(in_channels[2], out_channels[2])
        self.f1_v_proj = conv_layer(in_channels[2], out_channels[2], 1)
        self.f2_v_proj = conv_layer(in_channels[1], out_channels[1], 3, 1)
        self.f3_v_proj = conv_layer(in_channels[0], out_channels[1], 3, 1)
        self.aggr = conv_layer(out_channels[2] + 2 * out_channels[1], out_channels[1], 1)

    def forward(self, imgs: Tuple[torch.Tensor, ...], state: torch.Tensor) -> torch.Tensor:
        v3, v4, v5 = imgs
        f5 = self.f1_v_proj(v5) * self.txt_proj(state)[:, :, None, None]
        f5 = F.interpolate(f5, size=v4.shape[-2:], mode="bilinear")
        f3 = F.avg_pool2d(self.f3_v_proj(v3), 2, 2)
        return self.aggr(torch.cat([f3, self.f2_v_proj(v4), f5], dim=1))


class TransformerDecoder(nn.Module):
    """CRIS's decoder contract: ``forward(vis (b c h w), txt (b l c), pad_mask (b l)) -> (b c h*w)``.

    One cross-attention layer (vision tokens attend to the words, padding masked) plus an
    FFN, with dropout so that training-mode outputs depend on the random state, as upstream.
    """

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float,
                 return_intermediate: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d_model, nhead, dim_ffn, dropout, batch_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate

    def forward(self, vis: torch.Tensor, txt: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = vis.shape
        x = vis.reshape(b, c, h * w).transpose(1, 2)
        for layer in self.layers:
            x = layer(x, txt, memory_key_padding_mask=pad_mask)
        return self.norm(x).transpose(1, 2)


class Projector(nn.Module):
    """CRIS's head: the sentence ``state`` becomes one k x k kernel + bias per sample.

    ``forward(x (b 2*in_dim h w), word (b word_dim)) -> (b 1 4h 4w)``.
    """

    def __init__(self, word_dim: int = 1024, in_dim: int = 256, kernel_size: int = 3) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.kernel_size = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_layer(in_dim * 2, in_dim * 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_layer(in_dim * 2, in_dim, 3, padding=1),
            nn.Conv2d(in_dim, in_dim, 1),
        )
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)

    def forward(self, x: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        x = self.vis(x)
        b, c, h, w = x.shape
        params = self.txt(word)
        weight = params[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias=params[:, -1],
                       padding=self.kernel_size // 2, groups=b)
        return out.transpose(0, 1)


class CRIS(nn.Module):
    """CRIS's segmenter with the upstream attribute names and forward contract."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.backbone = TinyCLIP(
            vis_channels=(cfg.fpn_in[0], cfg.fpn_in[1]), embed_dim=cfg.word_dim,
            width=cfg.vis_dim, vocab_size=cfg.vocab_size, context_length=cfg.word_len,
        )
        self.neck = FPN(in_channels=cfg.fpn_in, out_channels=cfg.fpn_out)
        self.decoder = TransformerDecoder(
            num_layers=cfg.num_layers, d_model=cfg.vis_dim, nhead=cfg.num_head,
            dim_ffn=cfg.dim_ffn, dropout=cfg.dropout, return_intermediate=cfg.intermediate,
        )
        self.proj = Projector(cfg.word_dim, cfg.vis_dim // 2, 3)

    def forward(self, img: torch.Tensor, word: torch.Tensor, mask: torch.Tensor = None):
        pad_mask = torch.zeros_like(word).masked_fill_(word == 0, 1).bool()
        vis = self.backbone.encode_image(img)
        word, state = self.backbone.encode_text(word)
        fq = self.neck(vis, state)
        b, c, h, w = fq.size()
        fq = self.decoder(fq, word, pad_mask).reshape(b, c, h, w)
        pred = self.proj(fq, state)
        if self.training:
            if pred.shape[-2:] != mask.shape[-2:]:
                mask = F.interpolate(mask, pred.shape[-2:], mode="nearest").detach()
            loss = F.binary_cross_entropy_with_logits(pred, mask)
            return pred.detach(), mask, loss
        return pred.detach()


def build_segmenter(args: Any):
    """``model/__init__.py``'s builder: the model and CRIS's two parameter groups."""
    model = CRIS(args)
    backbone, head = [], []
    for name, param in model.named_parameters():
        if name.startswith("backbone") and "positional_embedding" not in name:
            backbone.append(param)
        else:
            head.append(param)
    param_list = [
        {"params": backbone, "initial_lr": args.lr_multi * args.base_lr},
        {"params": head, "initial_lr": args.base_lr},
    ]
    return model, param_list


def tiny_cfg(**overrides: Any) -> SimpleNamespace:
    """A CRIS config (the keys of ``config/refcoco/cris_r50.yaml`` that the model reads) at toy size.

    Input 64 x 64 gives maps 8, 4, 2 and a 16 x 16 prediction, like 416 -> 52, 26, 13 -> 104.
    """
    cfg = dict(
        input_size=64, word_len=8, word_dim=48, vis_dim=32, fpn_in=[16, 24, 48],
        fpn_out=[16, 32, 48], num_layers=1, num_head=2, dim_ffn=64, dropout=0.1,
        intermediate=False, vocab_size=50, base_lr=1e-3, lr_multi=0.1,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def random_batch(cfg: Any, batch_size: int = 2, seed: int = 0):
    """``img (b 3 S S)``, ``word (b l)`` with 0 = padding after an end-of-text token, ``mask (b 1 S S)``."""
    g = torch.Generator().manual_seed(seed)
    s, l = cfg.input_size, cfg.word_len
    img = torch.randn(batch_size, 3, s, s, generator=g)
    word = torch.randint(1, cfg.vocab_size - 1, (batch_size, l), generator=g)
    for i in range(batch_size):
        length = 3 + i % (l - 3)
        word[i, length - 1] = cfg.vocab_size - 1  # end-of-text: the largest id, as CLIP's
        word[i, length:] = 0
    mask = (torch.rand(batch_size, 1, s, s, generator=g) > 0.5).float()
    return img, word, mask
