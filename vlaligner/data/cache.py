"""The synthetic set's cache folder: generated once, atomically, under a file lock.

``ensure_synthetic_set`` is what the demo, the tests and the benchmarks call: the first call
generates the set (``generate_synthetic_refcoco``) into the cache, later calls return it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..fileio import atomic_write_dir

__all__ = ["SYNTHETIC_MARKER", "SYNTHETIC_VERSION", "default_cache_dir", "ensure_synthetic_set"]

PathLike = Union[str, "os.PathLike[str]"]

SYNTHETIC_MARKER = "vlaligner-synthetic.json"
SYNTHETIC_VERSION = 1


def default_cache_dir(generalized: bool = False) -> Path:
    """Where the synthetic set is cached: ``$VLALIGNER_CACHE`` or ``$XDG_CACHE_HOME/vlaligner``
    (``~/.cache/vlaligner``), sub-folder ``synthetic-v1`` (``synthetic-gref-v1`` for the
    generalized set)."""
    base = os.environ.get("VLALIGNER_CACHE")
    if base is None:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlaligner")
    return Path(base) / f"synthetic-{'gref-' if generalized else ''}v{SYNTHETIC_VERSION}"


def ensure_synthetic_set(
    cache_dir: PathLike,
    *,
    num_images: int,
    seed: int = 0,
    generalized: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Generate the synthetic set into ``cache_dir`` once; return the data root.

    ``generalized=False``: the RefCOCO layout (``generate_synthetic_refcoco``, data set
    ``refcoco``); ``True``: the gRefCOCO layout with multi- and no-target sentences
    (``generate_synthetic_grefcoco``, data set ``grefcoco``).

    The folder records its generation parameters in ``vlaligner-synthetic.json``; a folder
    made with other parameters is regenerated. Generation goes to a temporary sibling that is
    renamed into place (a killed generation never leaves a half set), under a file lock so
    that concurrent processes (torchrun ranks, parallel runs) generate it once.
    """
    from .synthetic import generate_synthetic_grefcoco, generate_synthetic_refcoco

    cache_dir = Path(cache_dir).expanduser()
    wanted = {"version": SYNTHETIC_VERSION, "num_images": int(num_images), "seed": int(seed)}
    if generalized:  # only then, so that caches of the classic set stay valid
        wanted["generalized"] = True
    generate = generate_synthetic_grefcoco if generalized else generate_synthetic_refcoco

    def current() -> Optional[dict]:
        try:
            return json.loads((cache_dir / SYNTHETIC_MARKER).read_text())
        except (OSError, ValueError):
            return None

    if current() == wanted:
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir.with_name(cache_dir.name + ".lock")):
        found = current()
        if found == wanted:  # another process generated it while we waited
            return cache_dir
        if log is not None:
            what = "generating" if found is None else f"regenerating (it was made with {found})"
            kind = "generalized synthetic set" if generalized else "synthetic set"
            log(f"{what} the {kind} ({num_images} images, seed {seed}) in {cache_dir}")

        def write(tmp: Path) -> None:
            generate(tmp, num_images=int(num_images), seed=int(seed))
            (tmp / SYNTHETIC_MARKER).write_text(json.dumps(wanted))

        atomic_write_dir(cache_dir, write)
    return cache_dir


class _file_lock:
    """An exclusive ``flock`` on ``path`` (no-op where ``fcntl`` does not exist)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = None

    def __enter__(self) -> "_file_lock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.handle = open(self.path, "a+")
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
