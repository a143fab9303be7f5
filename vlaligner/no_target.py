"""A no-target decision for generalized referring segmentation (gRefCOCO): "nothing matches".

Axis legend: b batch, n queries, d query width, c channels, h w space of the features,
H W space of the mask logits.

EAVL's aligner already scores its n queries (the Multi-Query Estimator's softmax weights);
the no-target head pools the queries with those weights (and their maximum), optionally
lets the pooled query look at the decoded vision features, optionally reads two statistics
of the predicted mask, and maps the result to one logit per sample: > 0 means "the sentence
refers to nothing in the image". Train it with
:func:`vlaligner.gres_losses.no_target_loss`. It works with any host that has queries
(adapters: call it on the host's own queries; see docs/custom_model.md).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._validation import check_dim, check_floating, check_rank, check_same_batch

__all__ = ["NoTargetHead"]


class NoTargetHead(nn.Module):
    """Queries (+ scores, vision features, mask logits) -> ``(b)`` no-target logits.

    Pooled input, concatenated (each part only when configured / given):

    - ``sum_i s_i q_i`` (score-weighted mean of the queries; the plain mean without scores)
      and ``max_i q_i`` (element-wise), ``2d`` values;
    - with ``vision_dim``: one multi-head cross-attention of the weighted query over the
      vision tokens (features projected to d by a 1x1 convolution), ``d`` values;
    - with ``use_mask_stats``: the maximum and the mean of ``sigmoid(mask_logits)`` (the
      mask's peak confidence and its area), detached so that the mask head is trained by
      the mask loss alone, 2 values.

    Then LayerNorm -> Linear(hidden) -> GELU -> Linear(1).

    Args:
        query_dim: width d of the queries.
        vision_dim: channels c of the vision features to attend to, or None (queries only).
        hidden_dim: width of the hidden layer (default d).
        num_heads: heads of the cross-attention (must divide d).
        use_mask_stats: also read the predicted mask's max and mean probability.
        bias_init: initial bias of the output logit (e.g. ``log(0.1 / 0.9)`` for a 10 %
            no-target prior).
    """

    def __init__(
        self,
        *,
        query_dim: int,
        vision_dim: Optional[int] = None,
        hidden_dim: Optional[int] = None,
        num_heads: int = 4,
        use_mask_stats: bool = False,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        if query_dim < 1:
            raise ValueError(f"query_dim must be positive, got {query_dim}")
        if vision_dim is not None and query_dim % num_heads != 0:
            raise ValueError(
                f"query_dim must be divisible by num_heads, got query_dim={query_dim}, num_heads={num_heads}"
            )
        self.query_dim = int(query_dim)
        self.vision_dim = None if vision_dim is None else int(vision_dim)
        self.use_mask_stats = bool(use_mask_stats)
        hidden = int(hidden_dim or query_dim)
        if self.vision_dim is not None:
            self.vision_proj: Optional[nn.Module] = nn.Conv2d(self.vision_dim, query_dim, 1)
            self.cross_attention: Optional[nn.MultiheadAttention] = nn.MultiheadAttention(
                query_dim, num_heads, batch_first=True
            )
        else:
            self.vision_proj = None
            self.cross_attention = None
        in_dim = 2 * query_dim + (query_dim if self.vision_dim is not None else 0) + (2 if use_mask_stats else 0)
        self.in_dim = in_dim
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        self.classifier = nn.Linear(hidden, 1)
        if bias_init:
            with torch.no_grad():
                self.classifier.bias.fill_(float(bias_init))

    def forward(
        self,
        queries: torch.Tensor,
        scores: Optional[torch.Tensor] = None,
        features: Optional[torch.Tensor] = None,
        mask_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """No-target logits.

        Args:
            queries: ``(b n d)``.
            scores: ``(b n)`` query weights (the estimator's, summing to 1), or None for the
                plain mean.
            features: ``(b c h w)`` vision features (required exactly when built with
                ``vision_dim``).
            mask_logits: ``(b 1 H W)`` or ``(b H W)`` predicted mask logits (required exactly
                when built with ``use_mask_stats``).

        Returns:
            ``(b)`` logits; ``sigmoid`` gives the probability that nothing is referred to.
        """
        check_rank("queries", queries, "b n d")
        check_dim("queries", queries, "b n d", 2, self.query_dim)
        check_floating("queries", queries)
        if scores is not None:
            check_rank("scores", scores, "b n")
            check_same_batch(queries=queries, scores=scores)
            if scores.shape[1] != queries.shape[1]:
                raise ValueError(
                    f"scores must have one weight per query, got scores {tuple(scores.shape)} for "
                    f"queries {tuple(queries.shape)}"
                )
            weighted = torch.einsum("bn,bnd->bd", scores.to(queries.dtype), queries)
        else:
            weighted = queries.mean(dim=1)
        parts = [weighted, queries.amax(dim=1)]
        if self.cross_attention is not None:
            if features is None:
                raise ValueError("this NoTargetHead was built with vision_dim, so features (b c h w) are required")
            check_rank("features", features, "b c h w")
            check_dim("features", features, "b c h w", 1, int(self.vision_dim))  # type: ignore[arg-type]
            check_same_batch(queries=queries, features=features)
            tokens = self.vision_proj(features).flatten(2).transpose(1, 2)  # (b hw d)
            attended, _ = self.cross_attention(weighted.unsqueeze(1), tokens, tokens, need_weights=False)
            parts.append(attended.squeeze(1))
        elif features is not None:
            raise ValueError("features were given but this NoTargetHead was built without vision_dim")
        if self.use_mask_stats:
            if mask_logits is None:
                raise ValueError("this NoTargetHead was built with use_mask_stats, so mask_logits are required")
            if mask_logits.ndim not in (3, 4):
                raise ValueError(
                    f"mask_logits must have shape (b 1 H W) or (b H W), got {tuple(mask_logits.shape)}"
                )
            check_same_batch(queries=queries, mask_logits=mask_logits)
            prob = torch.sigmoid(mask_logits.detach().float()).flatten(1)
            parts.append(torch.stack([prob.amax(dim=1), prob.mean(dim=1)], dim=1).to(queries.dtype))
        elif mask_logits is not None:
            raise ValueError("mask_logits were given but this NoTargetHead was built without use_mask_stats")
        return self.classifier(self.mlp(torch.cat(parts, dim=-1))).squeeze(-1)
