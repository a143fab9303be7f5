"""The full EAVL model (optional: ``pip install vlaligner[models]`` pulls timm, transformers, safetensors).

Axis legend: b batch, n queries, l words, c channels, d width, h w space, k kernel size.

- :class:`EAVL`, :class:`EAVLOutput`: the model and what its forward returns.
- :func:`build_eavl_swin_b`: the paper's Swin-B + BERT-base model (480, N = 24, width 512).
- :func:`build_eavl_tiny`: the same code path at a size that trains on a 2-core CPU.
- :data:`BUILDERS`: builder name -> function (the names recorded in checkpoints).
- :func:`model_report`: parameters and GFLOPs of a model or builder.
"""

from __future__ import annotations

try:  # fail early, and say which extra is missing, rather than deep inside a builder
    import safetensors  # noqa: F401
    import timm  # noqa: F401
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"vlaligner.models needs timm, transformers and safetensors ({error}); "
        "install them with: pip install 'vlaligner[models]'"
    ) from error

from .builders import BUILDERS, build_eavl_swin_b, build_eavl_tiny
from .decoder import TransformerDecoder, TransformerDecoderLayer, sine_positional_encoding_2d
from .eavl import EAVL, EAVLOutput, ImageFeatures
from .image_encoder import AttentionPool2d, ImageEncoder, create_timm_backbone
from .report import model_report
from .text_encoder import TextEncoder
from .tokenizer import TINY_VOCAB_PATH, load_tiny_tokenizer

__all__ = [
    "EAVL",
    "EAVLOutput",
    "ImageFeatures",
    "build_eavl_swin_b",
    "build_eavl_tiny",
    "BUILDERS",
    "model_report",
    "ImageEncoder",
    "AttentionPool2d",
    "create_timm_backbone",
    "TextEncoder",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "sine_positional_encoding_2d",
    "load_tiny_tokenizer",
    "TINY_VOCAB_PATH",
]
