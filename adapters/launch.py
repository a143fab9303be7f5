"""What the run scripts do before a host script runs: launcher flags, dependencies, output names.

- :func:`normalize_local_rank`: torch's launchers say where a process sits in three ways:
  ``--local_rank=N`` (``torch.distributed.launch`` before torch 2.0), ``--local-rank=N`` (it
  since torch 2.0) and the ``LOCAL_RANK`` environment variable (``torchrun``, which passes no
  flag). A host's argument parser knows at most one spelling (LAVT's ``args.py``:
  ``--local_rank`` only; CRIS's ``train.py``: none, it starts its own workers), so the run
  scripts take every form out of the command line and hand the host the one it understands.
- :func:`missing_dependencies` / :func:`dependency_message`: the third-party modules a host's
  scripts import, checked before the host runs, so that a missing one is reported in one line
  that names what to ``pip install`` instead of an ``ImportError`` deep inside the host.
- :func:`output_suffix`: the suffix a retrofitted run adds to the host's experiment name, so
  that its checkpoints and logs never overwrite those of a plain host run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "LOCAL_RANK_FLAGS",
    "normalize_local_rank",
    "missing_dependencies",
    "dependency_message",
    "output_suffix",
]

#: The spellings of the local-rank flag that torch's launchers have used.
LOCAL_RANK_FLAGS: Tuple[str, str] = ("--local-rank", "--local_rank")


def normalize_local_rank(
    argv: Sequence[str],
    *,
    host_flag: Optional[str],
    environ: Optional[Mapping[str, str]] = None,
) -> Tuple[List[str], Optional[int]]:
    """Take every local-rank form out of ``argv`` and put back the one the host understands.

    Args:
        argv: the command line (run-script and host arguments together).
        host_flag: the flag the host's parser knows (``"--local_rank"`` for LAVT), or None when
            the host takes none (CRIS): then the flag is dropped.
        environ: where ``LOCAL_RANK`` is read when no flag is given (default ``os.environ``).

    Returns:
        ``(argv, local_rank)``: ``argv`` without any local-rank flag, plus
        ``host_flag=N`` right at the front when ``host_flag`` is given and a rank is known;
        ``local_rank`` is the rank found (the last flag wins, as argparse would have it; else
        ``LOCAL_RANK``), or None.

    Raises:
        ValueError: a local-rank flag without an integer value, naming what was received.
    """
    env = os.environ if environ is None else environ
    out: List[str] = []
    rank: Optional[str] = None
    args = list(argv)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in LOCAL_RANK_FLAGS:  # before or after a bare --: the launcher puts it first
            if not eq:
                if i + 1 >= len(args):
                    raise ValueError(f"{name} needs an integer value (the process's local rank), got nothing")
                value = args[i + 1]
                i += 1
            rank = value
        else:
            out.append(args[i])
        i += 1
    if rank is None and env.get("LOCAL_RANK") not in (None, ""):
        rank = env["LOCAL_RANK"]
    local_rank: Optional[int] = None
    if rank is not None:
        try:
            local_rank = int(rank)
        except ValueError:
            raise ValueError(f"the local rank must be an integer, got {rank!r}") from None
    if host_flag is not None and local_rank is not None:
        out.insert(0, f"{host_flag}={local_rank}")
    return out, local_rank


def missing_dependencies(
    modules: Mapping[str, str], *, find: Callable[[str], object] = importlib.util.find_spec
) -> List[Tuple[str, str]]:
    """``(module, pip package)`` pairs of ``modules`` that cannot be imported here.

    Args:
        modules: import name -> the pip package that provides it (``{"cv2": "opencv-python"}``).
        find: how a module is looked up (``importlib.util.find_spec``; a test passes its own).
    """
    missing = []
    for module, package in modules.items():
        try:
            found = find(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            missing.append((module, package))
    return missing


def dependency_message(host: str, script: str, missing: Sequence[Tuple[str, str]]) -> str:
    """The one line a run script prints when the host's imports are missing."""
    modules = ", ".join(m for m, _ in missing)
    packages = " ".join(sorted({p for _, p in missing}))
    return (
        f"{host}'s {script} imports modules that are not installed ({modules}): "
        f"pip install {packages}  (or pass --skip-deps-check)"
    )


def output_suffix(head: str, suffix: Optional[str]) -> str:
    """The experiment-name suffix of a retrofitted run: ``suffix``, or ``_aligner`` / ``_fixed``.

    A run with ``--head fixed`` trains the host's own model, but through the adapter: it gets
    its own suffix too, so that no run of the adapter writes into a plain host run's files.
    """
    if suffix is None:
        return f"_{head}"
    if not suffix or any(sep in suffix for sep in ("/", "\\")) or suffix in (".", ".."):
        raise ValueError(
            f"--output-suffix must be a non-empty name without path separators (it is appended to "
            f"the host's experiment name), got {suffix!r}"
        )
    return suffix
