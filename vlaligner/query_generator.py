"""The Multi-Query Generator of EAVL (paper Eqs. 6-10, VLT's query generation).

Axis legend: b batch, n queries, l words, c channels, d width, h w space, g pooled grid cells.

Each of the n queries reads the same sentence with its own emphasis: a dense vision map per
query (from the backbone maps) decides, by attention, how much each real word contributes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._validation import check_bool_mask, check_input, check_same_batch
from .layers import NormLayer, conv_norm_act
from .neck import FusionNeck, check_vision_feats

__all__ = ["MultiQueryGenerator", "masked_word_attention"]


def masked_word_attention(scores: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the real words only.

    Args:
        scores: ``(b n l)`` attention logits.
        word_mask: ``(b l)`` bool, True for real words.

    Returns:
        ``(b n l)`` weights that are 0 on padding and sum to 1 over the real words. A
        sentence whose words are all padding gets all-zero weights (so its queries are zero
        vectors), never NaN.
    """
    mask = word_mask[:, None, :]
    # Softmax in at least float32: half precision loses the small weights.
    compute_dtype = torch.promote_types(scores.dtype, torch.float32)
    filled = scores.to(compute_dtype).masked_fill(~mask, torch.finfo(compute_dtype).min)
    weights = filled.softmax(dim=-1) * mask
    return weights.to(scores.dtype)


class MultiQueryGenerator(nn.Module):
    """Turn three vision maps and the words of a sentence into n queries ``(b n d)``.

    Dense vision features (Eq. 6): a neck over the three maps without sentence gating, then
    three convolutions (3x3, 3x3, 1x1) from ``dim`` down to n channels; each channel is the
    spatial pattern query ``i`` looks at, average-pooled to ``grid_size`` so that any input
    size works (*choice*: at 480 x 480 with a stride-16 grid of 30 x 30 the pooling is the
    identity). Fused language features (Eq. 8): ``F_l = relu(W_t F_t) * relu(W_g F_g)``, or
    ``relu(W_t F_t)`` without the global vision feature. Vision-guided attention (Eq. 9):
    ``A = softmax_l(<W_a f_vd_i, W_b f_l_j> / sqrt(d))`` over real words only (the
    ``1/sqrt(d)`` scaling is a *choice* for stable training). Queries (Eq. 10):
    ``F_q = A (F_l W_q)``.

    Args:
        vision_channels: channels of the three maps at strides s, 2s, 4s.
        text_dim: width of the word features.
        dim: query width d.
        num_queries: n.
        global_vision_dim: width of the global vision feature F_g, or None to build the
            ablation without it.
        grid_size: the (h, w) grid the per-query maps are pooled to before ``W_a``.
        neck_fuse_kernel_size: kernel of the dense neck's concatenation convolutions (see
            :class:`~vlaligner.FusionNeck`).
        norm_layer: normalisation used in the convolutions.
    """

    def __init__(
        self,
        *,
        vision_channels: Sequence[int],
        text_dim: int,
        dim: int = 512,
        num_queries: int = 24,
        global_vision_dim: Optional[int] = None,
        grid_size: Tuple[int, int] = (30, 30),
        neck_fuse_kernel_size: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        if len(vision_channels) != 3:
            raise ValueError(f"vision_channels must list three channel counts, got {vision_channels}")
        self.vision_channels = tuple(int(c) for c in vision_channels)
        self.text_dim = text_dim
        self.dim = dim
        self.num_queries = num_queries
        self.global_vision_dim = global_vision_dim
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.dense_neck = FusionNeck(
            in_channels=self.vision_channels, dim=dim, sentence_dim=None, use_coords=False,
            fuse_kernel_size=neck_fuse_kernel_size, norm_layer=norm_layer,
        )
        self.query_maps = nn.Sequential(
            conv_norm_act(dim, dim, 3, norm_layer=norm_layer),
            conv_norm_act(dim, dim, 3, norm_layer=norm_layer),
            nn.Conv2d(dim, num_queries, 1),
        )
        self.word_proj = nn.Linear(text_dim, dim)
        self.global_proj = nn.Linear(global_vision_dim, dim) if global_vision_dim else None
        self.vision_key = nn.Linear(self.grid_size[0] * self.grid_size[1], dim)  # W_a
        self.word_key = nn.Linear(dim, dim)  # W_b
        self.word_value = nn.Linear(dim, dim)  # W_q

    def _check_inputs(
        self,
        vision_feats: Sequence[torch.Tensor],
        words: torch.Tensor,
        word_mask: torch.Tensor,
        global_vision: Optional[torch.Tensor],
    ) -> None:
        check_vision_feats(vision_feats, self.vision_channels, self)
        check_input("words", words, "b l text_dim", sizes={2: self.text_dim}, module=self)
        check_bool_mask("word_mask", word_mask, words.shape[:2], "b l")
        if word_mask.device != words.device:
            raise ValueError(
                f"word_mask must be on the device of words ({words.device}), got {word_mask.device}"
            )
        if self.global_proj is not None:
            if global_vision is None:
                raise ValueError(
                    "this generator was built with global_vision_dim: pass global_vision "
                    f"(b {self.global_vision_dim})"
                )
            check_input(
                "global_vision", global_vision, "b global_vision_dim",
                sizes={1: self.global_vision_dim}, module=self,
            )
        elif global_vision is not None:
            raise ValueError(
                "this generator was built without global_vision_dim: pass global_vision=None "
                "or build it with global_vision_dim"
            )
        check_same_batch(
            vision_feats=vision_feats[0], words=words, global_vision=global_vision
        )

    def forward(
        self,
        vision_feats: Sequence[torch.Tensor],
        words: torch.Tensor,
        word_mask: torch.Tensor,
        global_vision: Optional[torch.Tensor] = None,
        return_attention: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Generate the queries.

        Args:
            vision_feats: three maps ``(b c_i h_i w_i)`` at strides s, 2s, 4s.
            words: ``(b l text_dim)`` word features; values at padding never matter.
            word_mask: ``(b l)`` bool, True for real words.
            global_vision: ``(b global_vision_dim)`` F_g, or None when built without it.
            return_attention: also return the word attention.

        Returns:
            ``queries (b n d)``, or ``(queries, attention (b n l))``. A sentence whose words
            are all padding gets zero attention and zero queries (no NaN).
        """
        self._check_inputs(vision_feats, words, word_mask, global_vision)
        dense = self.dense_neck(vision_feats)
        maps = F.adaptive_avg_pool2d(self.query_maps(dense), self.grid_size)
        maps = rearrange(maps, "b n h w -> b n (h w)")

        # Zero the padding so that any value there (even inf or NaN) cannot leak through 0 * x.
        words = words.masked_fill(~word_mask[..., None], 0.0)
        fused_words = F.relu(self.word_proj(words))
        if self.global_proj is not None:
            fused_words = fused_words * F.relu(self.global_proj(global_vision))[:, None, :]

        vision_keys = self.vision_key(maps)
        word_keys = self.word_key(fused_words)
        logits = torch.einsum("bnd,bld->bnl", vision_keys, word_keys) / math.sqrt(self.dim)
        attention = masked_word_attention(logits, word_mask)
        queries = torch.einsum("bnl,bld->bnd", attention, self.word_value(fused_words))
        if return_attention:
            return queries, attention
        return queries
