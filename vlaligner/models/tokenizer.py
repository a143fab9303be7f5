"""Tokenizers for EAVL: the embedded WordPiece vocabulary and a checked ``tokenize``.

Axis legend: b batch (sentences), l tokens (padded to ``max_length``).

``tiny_vocab.txt`` (shipped with the package) holds BERT's special tokens, punctuation, digits,
``a``-``z`` and ``##a``-``##z`` (so every English word splits into known pieces: an unknown
word is never an error), a few suffixes and a few hundred words of referring expressions
(colours, shapes, positions, sizes, common COCO objects). A ``transformers`` BERT tokenizer
built from it needs no download; the tiny model uses it, and it is the offline fall-back of
the Swin-B builder when the real ``bert-base-uncased`` tokenizer is not cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Tuple, Union

import torch

__all__ = ["TINY_VOCAB_PATH", "TOKENIZER_FILES", "load_tiny_tokenizer", "tokenize", "load_tokenizer", "has_tokenizer_files"]

#: The embedded WordPiece vocabulary (one token a line; line number = id).
TINY_VOCAB_PATH = Path(__file__).resolve().with_name("tiny_vocab.txt")


def load_tiny_tokenizer() -> Any:
    """A lower-casing BERT WordPiece tokenizer over :data:`TINY_VOCAB_PATH` (no download)."""
    from transformers import BertTokenizerFast  # an extra: imported where used

    if not TINY_VOCAB_PATH.is_file():
        raise FileNotFoundError(
            f"the embedded vocabulary {TINY_VOCAB_PATH} is missing: reinstall vlaligner[models]"
        )
    # Positional on purpose: transformers 5 names the first parameter ``vocab``, 4.x ``vocab_file``.
    return BertTokenizerFast(str(TINY_VOCAB_PATH), do_lower_case=True)


#: Files one of which a folder must hold to contain a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer_files(path: Union[str, Path]) -> bool:
    """Whether the folder holds a tokenizer's vocabulary (see :data:`TOKENIZER_FILES`)."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Union[str, Path]) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` for a local folder, never downloading."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    # transformers 5 builds a tokenizer with an empty vocabulary from a folder that holds only
    # a model config; every word would become [UNK]. Refuse that instead.
    if not has_tokenizer_files(path):
        raise FileNotFoundError(
            f"tokenizer folder {str(path)!r} holds none of {list(TOKENIZER_FILES)}: "
            f"found {sorted(p.name for p in path.iterdir())}"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(
    tokenizer: Any, sentences: Union[str, Sequence[str]], max_length: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokenize, truncate and pad to exactly ``max_length`` tokens.

    Args:
        tokenizer: a ``transformers`` tokenizer (adds [CLS] and [SEP]).
        sentences: one sentence or a list of them; each must hold a non-blank character.
        max_length: l, including [CLS] and [SEP] (at least 3).

    Returns:
        ``input_ids (b l)`` and ``attention_mask (b l)``, both int64; mask 1 = real token.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if not isinstance(sentences, (list, tuple)):
        raise TypeError(f"sentences must be a str or a list of str, got {type(sentences).__name__}")
    if len(sentences) == 0:
        raise ValueError("sentences is an empty list: pass at least one sentence")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] must be a str, got {type(s).__name__}")
        if not s.strip():
            # An empty expression refers to nothing; segmenting it would be silent nonsense.
            raise ValueError(f"sentences[{i}] is empty: a referring expression needs words, got {s!r}")
    if not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3 ([CLS] word [SEP]), got {max_length!r}")
    encoded = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()
