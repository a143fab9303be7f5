"""vlaligner: the Vision-Language Aligner of EAVL as a plug-in library for referring segmentation.

The three parts of the aligner, each in its own module:

- :class:`MultiQueryGenerator` (``query_generator.py``): vision maps + words -> n queries.
- :class:`MultiMaskGenerator` (``mask_generator.py``): features + queries -> n masks.
- :class:`MultiQueryEstimator` (``query_estimator.py``): queries -> n scores.

:class:`VisionLanguageAligner` (``aligner.py``) composes the last two into the final mask,
computed with one fused convolution. The math lives in :mod:`vlaligner.functional`.
Optional parts: :mod:`vlaligner.models` (full EAVL; extra ``models``), :mod:`vlaligner.data`
(RefCOCO loaders; extra ``data``), :mod:`vlaligner.metrics`, and :class:`Predictor`.
"""

from __future__ import annotations

from typing import Any

from .aligner import AlignerOutput, FixedKernelHead, VisionLanguageAligner
from .mask_generator import MultiMaskGenerator
from .neck import FusionNeck
from .query_estimator import MultiQueryEstimator
from .query_generator import MultiQueryGenerator

__version__ = "0.1.0"

__all__ = [
    "MultiQueryGenerator",
    "MultiMaskGenerator",
    "MultiQueryEstimator",
    "VisionLanguageAligner",
    "AlignerOutput",
    "FixedKernelHead",
    "FusionNeck",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The predictor needs numpy and PIL: import it only when asked, so that the core (and
    # `from vlaligner import *`) stays torch-only.
    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'vlaligner' has no attribute {name!r}")
