"""The Vision-Language Aligner in CRIS (DerrickWang005/CRIS.pytorch): retrofit and run script.

Axis legend: b batch, n queries, l words, c channels, h w space.

``retrofit_cris(model, ...)`` swaps CRIS's ``Projector`` for the aligner (see
:mod:`adapters.cris.retrofit`); ``adapters/cris/run_cris.py --host-root PATH`` runs CRIS's own
``train.py`` or ``test.py`` with the retrofit applied to the model its builder makes.
"""

from .retrofit import CRISWithAligner, retrofit_cris

__all__ = ["CRISWithAligner", "retrofit_cris"]
