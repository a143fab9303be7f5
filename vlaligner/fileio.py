"""Files written so that a crash never leaves half of one, and read with errors that name them.

Used by the checkpoints of the models (``EAVL.save_pretrained``) and of training runs, and by
the run logs. Nothing here imports torch.

- ``atomic_write_file`` / ``atomic_write_dir``: write aside, fsync, rename into place.
- ``resolve_checkpoint_dir``: the complete folder, or its ``.old`` twin after a crash.
- ``sha256_file``: the digest recorded beside weights and checked on every load.
- ``read_json_file``: JSON with the file's path in every error.
- ``read_jsonl`` / ``append_jsonl`` / ``rewrite_jsonl``: the run logs (one JSON object a line).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

__all__ = [
    "atomic_write_file",
    "atomic_write_text",
    "atomic_write_dir",
    "resolve_checkpoint_dir",
    "sha256_file",
    "read_json_file",
    "read_jsonl",
    "append_jsonl",
    "rewrite_jsonl",
]

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write_file(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through a temporary sibling, then ``os.replace`` it into place.

    ``write(tmp)`` creates the file at ``tmp``. A crash (or an exception in ``write``) leaves
    the old file, if any, untouched, and removes the temporary one.
    """
    path = Path(path)
    # A plain name (not mkstemp's 0600 file), so the result gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``atomic_write_file`` for a UTF-8 text."""
    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _old_sibling(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def atomic_write_dir(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder so that ``path`` is, at every moment, either the old or the new one.

    ``write(tmp)`` fills a temporary sibling ``<name>.tmp-XXXX``; its files are fsynced, then
    the old folder is renamed to ``<name>.old``, the new one renamed to ``<name>``, and the old
    one deleted. A crash (or an exception in ``write``) before the first rename leaves the old
    folder untouched; one between the two renames leaves ``<name>.old``, which
    ``resolve_checkpoint_dir`` falls back to. Stale temporary siblings from crashed writes are
    removed at the next write.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _old_sibling(path)
    if path.exists():
        if old.exists():
            # Only possible after a crash that completed both renames but not the delete.
            shutil.rmtree(old)
        os.replace(path, old)
    # If ``path`` is missing but ``old`` exists, an earlier write crashed between the renames:
    # ``old`` is then the only complete copy and stays until the new one is in place.
    os.replace(tmp, path)
    _fsync_path(parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint_dir(path: PathLike) -> Optional[Path]:
    """The complete checkpoint folder at ``path``, or its ``.old`` twin after a crash, or None."""
    path = Path(path)
    for candidate in (path, _old_sibling(path)):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    return None


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: PathLike, *, what: str = "file") -> Any:
    """Parse a JSON file; ``ValueError`` naming the path when it is unreadable or truncated."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON (truncated or corrupt?): {error}") from error


def read_jsonl(path: PathLike) -> list:
    """The JSON objects of a ``.jsonl`` log, one a line; a line cut by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def append_jsonl(path: PathLike, row: Any) -> None:
    """Append one JSON object as a line (a crash can at worst cut this last line)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def rewrite_jsonl(path: PathLike, rows: Iterable[Any]) -> Path:
    """Replace a ``.jsonl`` log atomically (write aside, then rename): never left empty."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    return atomic_write_text(path, text)
