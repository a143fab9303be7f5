"""The refer layout on disk: which files a RefCOCO / RefCOCO+ / G-Ref root must hold."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["check_data_root"]

PathLike = Union[str, "os.PathLike[str]"]


def check_data_root(root: PathLike, dataset: str, split_by: str) -> None:
    """Raise ``FileNotFoundError`` naming what is missing when ``root`` is not a refer layout.

    Cheap (file existence only), so that a wrong ``--data-root`` fails before any model is
    built. RefCOCO / RefCOCO+ / G-Ref: ``<dataset>/refs(<split_by>).p``,
    ``<dataset>/instances.json``, ``images/mscoco/images/train2014/``; gRefCOCO:
    ``grefcoco/grefs(<split_by>).json`` (or ``.p``), ``grefcoco/instances.json``,
    ``images/train2014/`` (or RefCOCO's image folder).
    """
    from .refer import missing_data_files

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (see docs/data.md for the layout)")
    missing = missing_data_files(root, dataset, split_by)
    if missing:
        raise FileNotFoundError(f"data root {root} is incomplete: missing {', '.join(missing)} (see docs/data.md)")
