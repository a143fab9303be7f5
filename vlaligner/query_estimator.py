"""The Multi-Query Estimator of EAVL (paper Eq. 13): how much each query's mask counts.

Axis legend: b batch, n queries, d query width.
"""

from __future__ import annotations

import torch
from torch import nn

from ._validation import check_input

__all__ = ["MultiQueryEstimator"]


class MultiQueryEstimator(nn.Module):
    """Score n queries: one multi-head self-attention layer, a linear layer, softmax over n.

    The attention output is added back to the queries and layer-normalised before the score
    (*choice*: a standard post-norm residual block, so that the layer starts close to a
    per-query linear score).

    Args:
        query_dim: width d of the queries (divisible by ``num_heads``).
        num_heads: attention heads.
        dropout: attention dropout.
    """

    def __init__(self, *, query_dim: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if query_dim % num_heads != 0:
            raise ValueError(
                f"query_dim must be divisible by num_heads, got query_dim={query_dim}, "
                f"num_heads={num_heads}"
            )
        self.query_dim = query_dim
        self.attention = nn.MultiheadAttention(query_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(query_dim)
        self.score = nn.Linear(query_dim, 1)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """Score the queries.

        Args:
            queries: ``(b n d)``.

        Returns:
            ``(b n)`` scores, non-negative and summing to 1 over n (in the queries' dtype;
            the softmax itself runs in at least float32).
        """
        check_input("queries", queries, "b n d", sizes={2: self.query_dim}, module=self)
        attended, _ = self.attention(queries, queries, queries, need_weights=False)
        hidden = self.norm(queries + attended)
        logits = self.score(hidden).squeeze(-1)
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        return logits.to(compute_dtype).softmax(dim=-1).to(logits.dtype)
