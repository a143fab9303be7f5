"""The refer layout on disk: which files a RefCOCO / RefCOCO+ / G-Ref root must hold."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["check_data_root"]

PathLike = Union[str, "os.PathLike[str]"]


def check_data_root(root: PathLike, dataset: str, split_by: str) -> None:
    """Raise ``FileNotFoundError`` naming what is missing when ``root`` is not a refer layout.

    Cheap (file existence only), so that a wrong ``--data-root`` fails before any model is built.
    """
    root = Path(root).expanduser()
    layout = (
        f"expected {root}/{dataset}/refs({split_by}).p, {root}/{dataset}/instances.json and "
        f"{root}/images/mscoco/images/train2014/ (see docs/data.md)"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist; {layout}")
    missing = [
        str(p)
        for p in (
            root / dataset / f"refs({split_by}).p",
            root / dataset / "instances.json",
            root / "images" / "mscoco" / "images" / "train2014",
        )
        if not p.exists()
    ]
    if missing:
        raise FileNotFoundError(f"data root {root} is incomplete: missing {', '.join(missing)}; {layout}")
