"""The Vision-Language Aligner in VLT: a PyTorch re-implementation of VLT, its retrofit, a trainer.

Axis legend: b batch, n queries, l words, e language width, c channels, d width, h w space.

The official VLT is TensorFlow 1.15 and does not install on current Python, so
:mod:`adapters.vlt.model` re-implements it in PyTorch from the papers (Swin + BERT, as the
TPAMI version); :func:`retrofit_vlt` swaps its final fixed 3x3 convolution for the aligner;
``adapters/vlt/train_vlt.py`` trains either on a RefCOCO-layout folder (or a synthetic one).
"""

from .model import VLT, VLTFeatures, build_vlt_swin_b, build_vlt_tiny, vlt_loss
from .retrofit import VLTWithAligner, retrofit_vlt

__all__ = [
    "VLT",
    "VLTFeatures",
    "VLTWithAligner",
    "build_vlt_swin_b",
    "build_vlt_tiny",
    "retrofit_vlt",
    "vlt_loss",
]
