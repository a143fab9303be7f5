"""A run's output folder: which files the run owns, and its logs.

A training run writes only files it owns. It records their names in
``OUTPUT_DIR/.vlaligner-run.json`` as it creates them; before it starts it refuses a folder
that holds anything a run did not write (a user's own ``best/`` or ``metrics.jsonl`` is never
deleted or overwritten), and ``--overwrite`` removes only the files the earlier run recorded.

Logs: ``train.log`` (text), ``losses.jsonl`` (one line a step), ``metrics.jsonl`` (one line an
evaluation); a resumed run rewrites the two ``.jsonl`` logs atomically (write aside, rename),
so a kill never leaves them empty.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Set, Union

from ..fileio import atomic_write_text, read_json_file

__all__ = [
    "MANIFEST_NAME",
    "RUN_FILES",
    "OutputDirError",
    "check_output_dir",
    "RunManifest",
    "setup_logging",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The record of what a run wrote, in its output folder.
MANIFEST_NAME = ".vlaligner-run.json"
#: Every name a training run may create in its output folder (``param_digest.rank*.txt`` too).
RUN_FILES = (
    "last", "last.old", "best", "best.old", "train.log", "losses.jsonl", "metrics.jsonl",
    "curves.png", "predictions.png", "tb", "run_config.json",
)


class OutputDirError(ValueError):
    """The output folder holds files this run must not touch."""


def _listed(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir())


def _is_run_file(name: str) -> bool:
    return (
        name in RUN_FILES or name == MANIFEST_NAME or name.startswith("param_digest.rank")
        or ".tmp-" in name or (name.startswith(".") and name.endswith(".tmp"))
    )


def _owned(directory: Path) -> Set[str]:
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return set()
    try:
        data = read_json_file(manifest, what="run manifest")
    except ValueError:
        return set()
    files = data.get("files", []) if isinstance(data, dict) else []
    return {str(f) for f in files if isinstance(f, str)}


def check_output_dir(directory: PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds files this run must not touch.

    - A missing or empty folder is fine.
    - Files that no run recorded as its own (the user's) are never touched: refused, whatever
      the options, naming the first of them.
    - An earlier run's folder needs ``resume`` (continue it) or ``overwrite`` (start over,
      removing only that run's files).

    Raises:
        OutputDirError: with a message naming the folder and the files.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"--output-dir {directory} is a file, not a folder")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    owned = _owned(directory)
    has_manifest = (directory / MANIFEST_NAME).is_file()

    def leftover(name: str) -> bool:  # what a crashed write of a run leaves beside its files
        return has_manifest and _is_run_file(name) and (name.endswith((".old", ".tmp")) or ".tmp-" in name)

    foreign = [
        n for n in _listed(directory)
        if n not in owned and not (n == MANIFEST_NAME and has_manifest) and not leftover(n)
    ]
    if foreign:
        raise OutputDirError(
            f"--output-dir {directory} holds files no vlaligner run wrote ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); they are never overwritten or deleted: choose "
            "another --output-dir, or move them"
        )
    if not resume and not overwrite:
        raise OutputDirError(
            f"{directory} holds an earlier run ({', '.join(sorted(owned)[:5])}); pass --resume to continue "
            "it or --overwrite to start over (which removes only that run's files)"
        )


class RunManifest:
    """The list of files a run created in its output folder, kept on disk as it grows."""

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(directory)
        self.files: Set[str] = _owned(self.directory)

    def add(self, *names: str) -> None:
        """Record ``names`` (top-level entries of the folder) as this run's own."""
        new = {n for n in names if n not in self.files}
        if not new:
            return
        for name in new:
            if not _is_run_file(name):
                raise ValueError(f"{name!r} is not a file a training run writes (expected one of {RUN_FILES})")
        self.files |= new
        self.save()

    def save(self) -> None:
        import json

        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": "vlaligner-run", "files": sorted(self.files)}, indent=1) + "\n"
        atomic_write_text(self.directory / MANIFEST_NAME, text)

    def remove_own_files(self) -> List[str]:
        """Delete the files this (earlier) run recorded, and only those; returns their names."""
        removed = []
        for name in sorted(self.files):
            path = self.directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        self.files = set()
        self.save()
        return removed


class _TqdmHandler(logging.Handler):
    """Log lines printed through tqdm.write, so that they do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(logger: logging.Logger, log_file: Path, *, is_main: bool, rank: int, append: bool) -> None:
    """The main process logs to ``log_file`` and to the terminal; the others warnings only."""
    logger.handlers.clear()
    logger.propagate = False
    if is_main:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(log_file, mode="a" if append else "w")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
        stream = _TqdmHandler()
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    else:
        logger.setLevel(logging.WARNING)
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        logger.addHandler(stream)


def close_logging(logger: logging.Logger) -> None:
    """Close the handlers (the log file) that :func:`setup_logging` opened."""
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
