"""Retrofits of the Vision-Language Aligner into other referring-segmentation codebases ("hosts").

Axis legend: b batch, n queries, l words, c channels, d width, h w space.

One sub-package per host: :mod:`adapters.cris` (CRIS.pytorch), :mod:`adapters.lavt`
(LAVT-RIS) and :mod:`adapters.vlt` (a PyTorch re-implementation of VLT). Each has a
``retrofit_<host>(model, *, num_queries, kernel_size, use_estimator, head)`` that takes the
host's model as the host's own code builds it and returns a model with the host's forward
signature and outputs, whose fixed final kernel is replaced by
:class:`vlaligner.VisionLanguageAligner` fed with queries from
:class:`vlaligner.MultiQueryGenerator` over the host's own features; and a run script that
applies the retrofit to a user's checkout at run time and runs the host's own entry point.

This module holds what the three share: argument checks, a shallow module copy (so that a
retrofit never mutates the model it was given), and the runner that executes a host script
with its builder patched, including in the worker processes the script spawns.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, MutableMapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .launch import dependency_message, missing_dependencies, normalize_local_rank, output_suffix

__all__ = [
    "HEADS",
    "check_retrofit_args",
    "check_has_modules",
    "shallow_module_copy",
    "pooled_global_vision",
    "regroup_params",
    "run_host_script",
    "resume_in_spawned_child",
    "split_runner_argv",
    "build_runner_parser",
    "retrofit_settings",
    "normalize_local_rank",
    "missing_dependencies",
    "dependency_message",
    "output_suffix",
    "check_dependencies_or_exit",
    "check_host_or_exit",
]

#: The two heads every retrofit offers: the aligner, or the host's own fixed kernel.
HEADS: Tuple[str, str] = ("aligner", "fixed")


def check_retrofit_args(
    *,
    head: str,
    num_queries: int,
    kernel_size: int,
    use_estimator: bool,
    query_dim: Optional[int] = None,
    num_heads: int = 8,
) -> None:
    """Raise a clear ``ValueError`` / ``TypeError`` for a bad retrofit argument."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be an int >= 1, got {num_queries!r}")
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(f"kernel_size must be a positive odd int (1, 3, ...), got {kernel_size!r}")
    if not isinstance(use_estimator, bool):
        raise TypeError(f"use_estimator must be a bool, got {type(use_estimator).__name__}")
    if query_dim is not None:
        if isinstance(query_dim, bool) or not isinstance(query_dim, int) or query_dim < 1:
            raise ValueError(f"query_dim must be a positive int or None, got {query_dim!r}")
        if use_estimator and query_dim % num_heads:
            # The estimator's self-attention splits the query width over its heads.
            raise ValueError(
                f"query_dim must be divisible by the estimator's num_heads ({num_heads}), "
                f"got query_dim={query_dim}"
            )


def check_has_modules(model: Any, names: Iterable[str], host: str, built_by: str) -> None:
    """Check that ``model`` is an ``nn.Module`` with the named submodules, or say what was received."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be the {host} nn.Module as built by {built_by}, got {type(model).__name__}"
        )
    missing = [name for name in names if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        raise TypeError(
            f"model must be the {host} model as built by {built_by} (with submodules "
            f"{', '.join(names)}); {type(model).__name__} lacks {', '.join(missing)}"
        )


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing every submodule, parameter and buffer.

    Reassigning a child on the copy (``copy.conv = nn.Identity()``) leaves the original
    untouched, while training either trains both: that is how a retrofit swaps one layer of a
    host's head without copying its weights or mutating the model it was given.
    """
    clone = copy.copy(module)
    # copy.copy shares the registries themselves; give the clone its own dicts.
    clone._modules = OrderedDict(module._modules)
    clone._parameters = OrderedDict(module._parameters)
    clone._buffers = OrderedDict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return clone


def pooled_global_vision(feature: torch.Tensor) -> torch.Tensor:
    """The global vision feature ``F_g``: the spatial mean of the deepest map, ``(b c h w) -> (b c)``.

    EAVL reads ``F_g`` from an attention pooling on stage 4; a host has no such token, and the
    spatial mean is the parameter-free feature that stands in for it (the attention pool's
    first query is that same mean).
    """
    return feature.mean(dim=(2, 3))


def regroup_params(
    param_groups: Sequence[MutableMapping[str, Any]],
    new_model: nn.Module,
    *,
    anchor: Sequence[nn.Parameter] = (),
) -> List[Dict[str, Any]]:
    """Fit a host's optimizer parameter groups to the retrofitted model.

    Parameters no longer in ``new_model`` (the replaced fixed kernel) are dropped; parameters
    new in ``new_model`` (aligner, query generator) join the group that held any of ``anchor``
    (the replaced kernel's parameters, so that the aligner takes the learning rate of the head it
    replaces), or the last group when none did. Each group's other keys are kept.
    """
    present = {id(p) for p in new_model.parameters()}
    anchor_ids = {id(p) for p in anchor}
    groups: List[Dict[str, Any]] = []
    seen: set[int] = set()
    target = None
    for group in param_groups:
        params = list(group["params"])
        if target is None and any(id(p) in anchor_ids for p in params):
            target = len(groups)
        kept = [p for p in params if id(p) in present]
        seen.update(id(p) for p in params)
        groups.append({**group, "params": kept})
    if not groups:
        raise ValueError("param_groups is empty: the host's builder returned no parameter groups")
    new_params = [p for p in new_model.parameters() if id(p) not in seen]
    groups[len(groups) - 1 if target is None else target]["params"].extend(new_params)
    return groups


# --- running a host's own script with its builder patched ---------------------------------

Patch = Callable[[Dict[str, Any]], None]


def _check_host_root(host_root: Path, required: Sequence[str], host: str) -> Path:
    host_root = Path(host_root).expanduser().resolve()
    if not host_root.is_dir():
        raise FileNotFoundError(f"--host-root {str(host_root)!r} is not a directory ({host} checkout)")
    missing = [name for name in required if not (host_root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"--host-root {str(host_root)!r} does not look like a {host} checkout: "
            f"missing {', '.join(missing)}"
        )
    return host_root


def _enter_host(host_root: Path, chdir: bool) -> None:
    if str(host_root) not in sys.path:
        sys.path.insert(0, str(host_root))
    if chdir:
        # The hosts' configs and scripts use paths relative to the checkout's root.
        os.chdir(host_root)


def run_host_script(
    main_globals: Dict[str, Any],
    *,
    host: str,
    host_root: Path,
    script: str,
    argv: Sequence[str],
    settings: Dict[str, Any],
    patch: Patch,
    env_key: str,
    required: Sequence[str] = (),
    chdir: bool = True,
) -> None:
    """Run ``host_root/script`` as ``__main__`` with ``argv`` after ``patch(settings)``.

    The script is executed in ``main_globals``, the namespace of the run script's own
    ``__main__`` module, rather than with ``runpy``: a script that starts workers with the
    ``spawn`` method (CRIS's ``train.py`` does, through ``torch.multiprocessing.spawn``) then
    makes each worker re-import the run script, not the host script, and the run script calls
    :func:`resume_in_spawned_child` there, so the workers build the retrofitted model too.
    ``settings`` travel to them (and to any subprocess) in the environment variable
    ``env_key`` as JSON. The user's files are never edited.
    """
    host_root = _check_host_root(Path(host_root), [script, *required], host)
    script_path = host_root / script
    os.environ[env_key] = json.dumps(
        {"host_root": str(host_root), "script": script, "settings": settings, "chdir": chdir}
    )
    _enter_host(host_root, chdir)
    patch(settings)
    sys.argv = [str(script_path), *argv]
    code = compile(script_path.read_text(encoding="utf-8"), str(script_path), "exec")
    main_globals["__name__"] = "__main__"
    exec(code, main_globals)


def resume_in_spawned_child(main_globals: Dict[str, Any], *, patch: Patch, env_key: str) -> None:
    """In a worker started with ``spawn``: patch the builder again and define the host script's names.

    The worker imports the run script as ``__mp_main__``; the host script is executed in
    that namespace under the same name, so its ``if __name__ == "__main__"`` block does not
    run, while its functions (the worker entry the parent pickled by name) exist and see the
    patched builder.
    """
    raw = os.environ.get(env_key)
    if not raw:
        return
    state = json.loads(raw)
    host_root = Path(state["host_root"])
    _enter_host(host_root, False)  # the spawned worker already starts in the parent's cwd
    patch(state["settings"])
    script_path = host_root / state["script"]
    code = compile(script_path.read_text(encoding="utf-8"), str(script_path), "exec")
    exec(code, main_globals)


def split_runner_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split ``[runner options] [--] [host args]`` at the first ``--`` (if any)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def build_runner_parser(host: str, checkout: str, own_head: str, *, text_dim: bool = False) -> argparse.ArgumentParser:
    """The command line shared by the run scripts: host checkout, script, and retrofit switches.

    Unknown options (and everything after ``--``) are left for the host's own script.
    """
    parser = argparse.ArgumentParser(
        description=f"Run {host}'s train.py / test.py with the Vision-Language Aligner retrofitted. "
        f"Unknown options (and everything after --) go to {host}'s script.",
        allow_abbrev=False,
    )
    parser.add_argument("--host-root", required=True, type=Path, help=f"path to a {checkout} checkout")
    parser.add_argument("--script", default="train.py", help=f"{host} script to run (train.py or test.py)")
    parser.add_argument("--head", default="aligner", choices=HEADS, help=f"aligner, or {host}'s own {own_head}")
    parser.add_argument("--num-queries", type=int, default=24, help="n, the aligner's queries")
    parser.add_argument("--kernel-size", type=int, default=3, help="odd size of each query kernel")
    parser.add_argument("--no-estimator", action="store_true", help="weight the n masks 1/n each")
    parser.add_argument("--query-dim", type=int, default=None, help="query width (default: decoder width)")
    if text_dim:
        parser.add_argument("--text-dim", type=int, default=None, help="word width (default 768 / BERT's)")
    parser.add_argument("--no-global-vision", action="store_true", help="queries without F_g (ablation)")
    parser.add_argument("--keep-cwd", action="store_true", help="do not cd into the checkout")
    parser.add_argument(
        "--init-from-host", type=Path, default=None, metavar="CKPT",
        help=f"start training from {host}'s own trained checkpoint (its .pth): the host's tensors are "
        "loaded, the new head's are initialised fresh, and a report says which",
    )
    parser.add_argument(
        "--output-suffix", default=None, metavar="SUFFIX",
        help=f"appended to {host}'s experiment name so that this run never writes into a plain "
        f"{host} run's files (default _aligner, or _fixed with --head fixed)",
    )
    parser.add_argument(
        "--skip-deps-check", action="store_true",
        help=f"do not check that {host}'s own third-party imports are installed before it runs",
    )
    return parser


def retrofit_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The JSON-friendly settings a run script hands to its (possibly spawned) patch."""
    retrofit = {
        "head": args.head,
        "num_queries": args.num_queries,
        "kernel_size": args.kernel_size,
        "use_estimator": not args.no_estimator,
        "query_dim": args.query_dim,
        "use_global_vision": not args.no_global_vision,
    }
    if hasattr(args, "text_dim"):
        retrofit["text_dim"] = args.text_dim
    init = getattr(args, "init_from_host", None)
    return {
        "host_root": str(Path(args.host_root).expanduser().resolve()),
        "retrofit": retrofit,
        "init_from_host": None if init is None else str(Path(init).expanduser().resolve()),
        "output_suffix": output_suffix(args.head, getattr(args, "output_suffix", None)),
    }


def check_dependencies_or_exit(host: str, script: str, modules: Dict[str, str]) -> None:
    """Print one line naming what to ``pip install`` and exit (status 2) if any of ``modules`` is missing."""
    missing = missing_dependencies(modules)
    if missing:
        print(dependency_message(host, script, missing), file=sys.stderr, flush=True)
        raise SystemExit(2)


def check_host_or_exit(
    prog: str, host: str, host_root: Path, script: str, layout: Sequence[str], modules: Dict[str, str],
    *, check_dependencies: bool = True,
) -> None:
    """Before anything else: ``host_root`` holds ``script`` and ``layout`` (else exit with one line
    naming what is missing), then the host's own imports ``modules`` (see
    :func:`check_dependencies_or_exit`) unless ``check_dependencies`` is False."""
    try:
        _check_host_root(Path(host_root), [script, *layout], host)
    except FileNotFoundError as err:
        raise SystemExit(f"{prog}: {err}") from None
    if check_dependencies:
        check_dependencies_or_exit(host, script, modules)
