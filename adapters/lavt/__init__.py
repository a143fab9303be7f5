"""The Vision-Language Aligner in LAVT (yz93/LAVT-RIS, GPLv3): retrofit and run script.

Axis legend: b batch, n queries, l words, e language width, c channels, h w space.

``retrofit_lavt(model, ...)`` swaps the fixed ``classifier.conv1_1`` of a LAVT or LAVT-One
model for the aligner (see :mod:`adapters.lavt.retrofit`); ``adapters/lavt/run_lavt.py
--host-root PATH`` runs LAVT's own ``train.py`` or ``test.py`` with the retrofit applied to the
models its builders make. Nothing of LAVT is copied or imported at install time: the adapter
patches a user's checkout at run time.
"""

from .retrofit import LAVTWithAligner, retrofit_lavt, two_class_logits

__all__ = ["LAVTWithAligner", "retrofit_lavt", "two_class_logits"]
