"""A host model in EAVL's call signature, so that the project's ``Trainer`` trains it.

Axis legend: b batch, l words, S input size, h w the host's logit grid.

:class:`vlaligner.training.Trainer` trains any module with EAVL's call signature:
``model(images (b 3 S S), input_ids (b l), attention_mask (b l))`` returning an object with
``.logits (b 1 h w)``, a ``.tokenize(sentences, max_length)`` method and an ``img_size``.
:class:`HostSegmenter` gives a host (VLT, the CRIS replica of the benchmarks, ... with or
without the aligner) exactly that, and writes its checkpoints the way the hosts' users expect:
``model.safetensors`` holds the host's own ``state_dict`` keys (plus ``aligner.*`` /
``query_generator.*`` after a retrofit), and ``config.json`` records the host's settings and the
SHA-256 of the weights, which every load checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["SegmentationOutput", "HostSegmenter", "HOST_FORMAT"]

#: The ``format`` field of a host checkpoint's ``config.json``.
HOST_FORMAT = "vlaligner-host"

LogitsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SegmentationOutput:
    """What the training loop reads from a forward: ``logits (b 1 h w)``."""

    logits: torch.Tensor


class HostSegmenter(nn.Module):
    """A host wrapped to train through :class:`vlaligner.training.Trainer`.

    Args:
        host: the host model (its parameters are the trained ones).
        logits: ``logits(host, images (b 3 S S), input_ids (b l), attention_mask (b l)) ->
            (b 1 h w)``, the host's forward to logits with gradients (e.g. VLT's
            ``host(images, ids, mask)``; CRIS's ``host.predict(images, ids)[0]``).
        tokenizer: a ``transformers`` tokenizer (vlaligner's embedded WordPiece one for the
            small hosts).
        max_length: tokens per sentence with [CLS] and [SEP] (the host's text encoder's length).
        img_size: the input side S the host was built for.
        name: the host's name (``"vlt"``, ``"cris"``), recorded in ``config.json``.
        config: the host's settings, recorded in ``config.json`` (JSON-able).
    """

    def __init__(
        self,
        host: nn.Module,
        *,
        logits: LogitsFn,
        tokenizer: Any,
        max_length: int,
        img_size: int,
        name: str,
        config: Mapping[str, Any],
    ) -> None:
        super().__init__()
        if not isinstance(host, nn.Module):
            raise TypeError(f"host must be an nn.Module, got {type(host).__name__}")
        if not callable(logits):
            raise TypeError(f"logits must be callable (host, images, input_ids, attention_mask) -> (b 1 h w), got {logits!r}")
        for key, value in (("max_length", max_length), ("img_size", img_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        self.host = host
        self._logits = logits
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.img_size = img_size
        self.name = name
        self.config = dict(config)
        json.dumps(self.config)  # fails now, not at the first save, if something is not JSON-able

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> SegmentationOutput:
        """``images (b 3 S S)``, ``input_ids (b l)``, ``attention_mask (b l)`` -> ``.logits (b 1 h w)``."""
        logits = self._logits(self.host, images, input_ids, attention_mask)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[1] != 1:
            raise ValueError(
                f"the {self.name} host's logits must be a (b 1 h w) tensor, got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
            )
        return SegmentationOutput(logits=logits)

    def tokenize(
        self, sentences: Union[str, Sequence[str]], max_length: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``input_ids (b l)`` and ``attention_mask (b l)`` for ``sentences``, ``l = max_length``."""
        from vlaligner.models.tokenizer import tokenize

        if isinstance(sentences, str):
            sentences = [sentences]
        return tokenize(self._tokenizer, list(sentences), max_length or self.max_length)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write ``model.safetensors`` (the host's keys) and ``config.json`` (settings + SHA-256)."""
        from safetensors.torch import save_file

        from vlaligner.fileio import sha256_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.host.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": HOST_FORMAT, "host": self.name})
        document: Dict[str, Any] = {
            "format": HOST_FORMAT, "host": self.name, "config": self.config,
            "weights_sha256": sha256_file(directory / "model.safetensors"),
        }
        (directory / "config.json").write_text(json.dumps(document, indent=1) + "\n")

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = "") -> None:
        """Load the host's weights; weights of another configuration fail with the keys that differ."""
        own = self.host.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if (strict and (missing or unexpected)) or shapes:
            parts = []
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
                if keys:
                    parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
            raise ValueError(
                f"the weights in {source or 'the checkpoint'} do not fit this {self.name} model ({self.config}): "
                + "; ".join(parts) + ". Were they trained with other options (--head, --num-queries, ...)?"
            )
        self.host.load_state_dict(dict(state), strict=strict)
