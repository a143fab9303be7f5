"""The transformer decoder of EAVL (CRIS's decoder, with the queries as its memory).

Axis legend: b batch, n queries, t vision tokens (h*w), d width, h w space.

Each layer: self-attention over the vision tokens, cross-attention with Q from the vision
tokens and K, V from the queries ``F_q``, then an FFN; pre-norm with CRIS's extra norms after
each attention and inside the FFN. Sine positional encodings are added to the vision tokens'
queries and keys (CRIS); the queries get none, since each already carries its identity (query
``i`` comes from the i-th dense vision map).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

__all__ = ["TransformerDecoder", "TransformerDecoderLayer", "sine_positional_encoding_2d"]


def sine_positional_encoding_2d(
    h: int, w: int, dim: int, *, device=None, dtype=None
) -> torch.Tensor:
    """CRIS's 2-D sine encoding: the first half of the channels codes x, the second y.

    Returns:
        ``(t d)`` with ``t = h*w`` in row-major order (the order of ``(h w)`` flattening).
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sine encoding, got {dim}")
    half = dim // 2
    div = torch.exp(
        torch.arange(0, half, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / half)
    )
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * div  # (w half/2)
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * div  # (h half/2)
    pe = torch.zeros(h, w, dim, device=device, dtype=torch.float32)
    pe[:, :, 0:half:2] = torch.sin(xs)[None]
    pe[:, :, 1:half:2] = torch.cos(xs)[None]
    pe[:, :, half::2] = torch.sin(ys)[:, None]
    pe[:, :, half + 1 :: 2] = torch.cos(ys)[:, None]
    return rearrange(pe, "h w d -> (h w) d").to(dtype or torch.float32)


class TransformerDecoderLayer(nn.Module):
    """One decoder layer: vision self-attention, vision-to-query cross-attention, FFN.

    Shapes: ``vision (b t d), queries (b n d), pos (t d) -> (b t d)``.
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.LayerNorm(ffn_dim),
            nn.Linear(ffn_dim, dim),
        )
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, vision: torch.Tensor, queries: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.norm1(vision)
        q = x + pos
        x = self.self_attn(q, q, x, need_weights=False)[0]
        vision = vision + self.dropout1(self.self_attn_norm(x))
        x = self.norm2(vision)
        x = self.cross_attn(x + pos, queries, queries, need_weights=False)[0]
        vision = vision + self.dropout2(self.cross_attn_norm(x))
        x = self.ffn(self.norm3(vision))
        return vision + self.dropout3(x)


class TransformerDecoder(nn.Module):
    """Refine the fused vision map with the queries: ``F_c = Decoder(F_v, F_q)``.

    Shapes: ``vision (b d h w), queries (b n d) -> (b d h w)``.

    Args:
        dim: d, width of the vision tokens and the queries.
        num_layers: decoder layers (CRIS and EAVL: 3).
        num_heads: attention heads (8).
        ffn_dim: hidden width of the FFN (2048).
        dropout: dropout in attention and FFN (0.1).
    """

    def __init__(
        self, *, dim: int, num_layers: int = 3, num_heads: int = 8, ffn_dim: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, vision: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Decode ``vision (b d h w)`` against ``queries (b n d)`` into ``F_c (b d h w)``."""
        if vision.ndim != 4 or vision.shape[1] != self.dim:
            raise ValueError(f"vision must be (b {self.dim} h w), got {tuple(vision.shape)}")
        if queries.ndim != 3 or queries.shape[2] != self.dim or queries.shape[0] != vision.shape[0]:
            raise ValueError(
                f"queries must be (b n {self.dim}) with b = {vision.shape[0]}, got {tuple(queries.shape)}"
            )
        h, w = vision.shape[-2:]
        pos = sine_positional_encoding_2d(h, w, self.dim, device=vision.device, dtype=vision.dtype)
        x = rearrange(vision, "b d h w -> b (h w) d")
        for layer in self.layers:
            x = layer(x, queries, pos)
        return rearrange(self.norm(x), "b (h w) d -> b d h w", h=h, w=w)
