"""The text encoder of EAVL: any ``transformers`` encoder, its words and [CLS] projected.

Axis legend: b batch, l words (tokens), e the language model's hidden size, d width.

Word features ``F_t (b l d)`` are the last layer's token states through one linear layer; the
global text feature ``F_s (b d)`` is the last layer's first token ([CLS]) through another
(paper III-A). Padding is handled by the attention mask: a real token never attends to a
padding token, so the ids under ``attention_mask == 0`` cannot change the real words' features.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["TextEncoder", "hidden_size_of"]


def hidden_size_of(language_model: nn.Module) -> int:
    """The width e of a ``transformers`` model's last hidden state (``config.hidden_size``)."""
    config = getattr(language_model, "config", None)
    for key in ("hidden_size", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise TypeError(
        "language_model must be a transformers model whose config has hidden_size (or d_model/dim), "
        f"got {type(language_model).__name__}"
    )


class TextEncoder(nn.Module):
    """Words ``(b l d)`` and sentence ``(b d)`` features from token ids.

    Args:
        language_model: a ``transformers`` encoder whose output has ``last_hidden_state
            (b l e)`` (BERT, RoBERTa, MiniLM, ...). Its pooler, if any, is dropped: EAVL reads the
            raw [CLS] state, and a pooler that never receives a gradient would break
            ``DistributedDataParallel`` and waste memory.
        dim: d, the width the words and the sentence are projected to.
        sentence_dim: width of ``F_s``; None builds no sentence projection (the ablation
            without ``F_s``) and ``forward`` returns ``sentence=None``.
    """

    def __init__(self, *, language_model: nn.Module, dim: int, sentence_dim: Optional[int]) -> None:
        super().__init__()
        if getattr(language_model, "pooler", None) is not None:
            language_model.pooler = None
        self.language_model = language_model
        self.hidden_size = hidden_size_of(language_model)
        self.dim = dim
        self.word_proj = nn.Linear(self.hidden_size, dim)
        self.sentence_proj = nn.Linear(self.hidden_size, sentence_dim) if sentence_dim else None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Encode ``input_ids (b l)`` with ``attention_mask (b l)`` (1 = real token).

        Returns:
            ``words (b l d)`` (values at padding are meaningless and masked downstream) and
            ``sentence (b sentence_dim)`` from the [CLS] token, or None without ``F_s``.
        """
        embeddings = self.language_model.get_input_embeddings() if hasattr(
            self.language_model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None)
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()  # export / compile: no data checks
        if vocab is not None and input_ids.numel() and not input_ids.is_floating_point() and not tracing:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"input_ids must be token ids in [0, {vocab}) for this text model's vocabulary, got "
                    f"values in [{low}, {high}]: were they made by another tokenizer? (use model.tokenize)"
                )
        hidden = self.language_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        words = self.word_proj(hidden)
        sentence = self.sentence_proj(hidden[:, 0]) if self.sentence_proj is not None else None
        return words, sentence
