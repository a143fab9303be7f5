"""Start a retrofitted model from a host's own trained checkpoint (``--init-from-host``).

Axis legend: none (state dicts only).

CRIS and LAVT save their checkpoints with ``torch.save`` (a pickle): CRIS
``{"state_dict": ddp_model.state_dict(), "optimizer": ..., "epoch": ...}`` (keys prefixed
``module.``), LAVT ``{"model": model.state_dict(), "bert_model": ..., "args": Namespace,
...}``. Their own ``--resume`` / ``test.py`` load them strictly into the host's model, which
fails on a retrofitted one (its head differs). :func:`load_host_checkpoint` reads such a file
with ``torch.load(weights_only=True)`` (tensors and plain containers only; ``argparse.Namespace``
and ``collections.Counter``, which the hosts store beside the weights, are allowed by name), and
loads every tensor whose name and shape match the retrofitted model (the host's backbone,
neck and decoder: "loaded"), maps the tensors a retrofit reuses under another name (CRIS's
up-projection: "mapped"), and reports the host's head tensors that have no place any more
("dropped") and the new head's tensors that keep their fresh initialisation ("new").

Loading a pickle is only safe for a file you trust: the user's own host checkpoint, in the
host's own format, is what this is for.
"""

from __future__ import annotations

import argparse
import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["HostInitReport", "read_host_state_dict", "load_host_checkpoint"]

PathLike = Union[str, os.PathLike]


@dataclass
class HostInitReport:
    """What :func:`load_host_checkpoint` did, by tensor name."""

    path: str
    entry: Optional[str]
    stripped_prefix: Optional[str]
    loaded: List[str] = field(default_factory=list)
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    new: List[str] = field(default_factory=list)

    def format(self, max_names: int = 6) -> str:
        """A one-screen report: counts per group of names, a few names of each kind."""
        where = f" (entry {self.entry!r}" if self.entry else " (a bare state dict"
        where += f", prefix {self.stripped_prefix!r} stripped)" if self.stripped_prefix else ")"
        lines = [f"init from host checkpoint {self.path}{where}:"]
        lines.append(f"  loaded  {len(self.loaded):5d} tensors  {_groups(self.loaded)}")
        if self.mapped:
            pairs = "{} -> {}".format(*self.mapped[0])
            lines.append(f"  mapped  {len(self.mapped):5d} tensors  {_groups([b for _, b in self.mapped])} (e.g. {pairs})")
        lines.append(
            f"  dropped {len(self.dropped) + len(self.mismatched):5d} host tensors with no place in the retrofit  "
            + _names(self.dropped + [m[0] for m in self.mismatched], max_names)
        )
        for name, saved, wanted in self.mismatched[:3]:
            lines.append(f"          {name}: shape {list(saved)} in the checkpoint, {list(wanted)} in the model")
        lines.append(f"  new     {len(self.new):5d} tensors keep their fresh initialisation  {_groups(self.new)}")
        return "\n".join(lines)


def _groups(names: Sequence[str]) -> str:
    """Counts per top-level module (per second level when all share one top level)."""
    depth = 1 if len({n.split(".")[0] for n in names}) > 1 else 2
    counts: Dict[str, int] = collections.Counter(".".join(n.split(".")[:depth]) for n in names)
    if not counts:
        return ""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{k}.* {v}" for k, v in items[:6])
    return f"({shown}{', ...' if len(items) > 6 else ''})"


def _names(names: Sequence[str], limit: int) -> str:
    if not names:
        return ""
    return "(" + ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "") + ")"


def read_host_state_dict(
    path: PathLike, *, entries: Sequence[str] = ("state_dict", "model")
) -> Tuple[Dict[str, torch.Tensor], Optional[str], Optional[str], dict]:
    """Read a host checkpoint file: ``(state dict, entry used, prefix stripped, whole file)``.

    ``entries`` are tried in order (CRIS: ``state_dict``, LAVT: ``model``); a file that is
    itself a state dict is used as is. A ``module.`` prefix (a DDP / DataParallel model) is
    stripped when every key has it.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint of tensors (names what was found), or it
            holds objects ``weights_only`` loading refuses (names them).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--init-from-host {str(path)!r}: no such file (a host checkpoint, .pth)")
    safe = [argparse.Namespace, collections.Counter, collections.OrderedDict, collections.defaultdict]
    try:
        with torch.serialization.safe_globals(safe):
            whole = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends, with torch's long explanation
        detail = ""
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            if unsafe:
                detail = f"; it holds objects other than tensors and plain containers: {', '.join(unsafe[:8])}"
        except Exception:
            pass
        raise ValueError(
            f"--init-from-host {str(path)!r} cannot be read as a weights-only torch checkpoint"
            f"{detail} ({type(err).__name__}). Re-save just the weights, e.g. "
            f"torch.save({{'state_dict': ckpt['state_dict']}}, 'weights.pth'), and pass that file"
        ) from None
    entry = None
    state = whole
    if isinstance(whole, Mapping):
        for name in entries:
            if isinstance(whole.get(name), Mapping):
                entry, state = name, whole[name]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(map(str, whole)) if isinstance(whole, Mapping) else type(whole).__name__
        raise ValueError(
            f"--init-from-host {str(path)!r} holds no state dict of tensors under {list(entries)} "
            f"(nor is it one); found {found}"
        )
    prefix = None
    if all(k.startswith("module.") for k in state):
        prefix = "module."
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state), entry, prefix, whole if isinstance(whole, dict) else {}


def load_host_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    entries: Sequence[str] = ("state_dict", "model"),
    key_map: Optional[Mapping[str, str]] = None,
) -> HostInitReport:
    """Load a host's trained weights into a retrofitted ``model`` (in place) and say what happened.

    Args:
        model: the retrofitted model (``retrofit_cris`` / ``retrofit_lavt`` output); its keys
            for the host's parts are the host's.
        path: the host's checkpoint file.
        entries: where the state dict sits in the file (see :func:`read_host_state_dict`).
        key_map: prefix renames for host tensors the retrofit reuses under another name,
            ``{host prefix: model prefix}`` (CRIS: its Projector's up-projection ``proj.vis.``
            becomes the aligner's ``proj.mask_generator.projection.layers.``).

    Returns:
        A :class:`HostInitReport`; ``print(report.format())`` gives the one-screen summary.
    """
    state, entry, prefix, _ = read_host_state_dict(path, entries=entries)
    own = model.state_dict()
    report = HostInitReport(path=str(path), entry=entry, stripped_prefix=prefix)
    to_load: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        target = name if name in own else None
        mapped_from = None
        if target is None and key_map:
            for old, new in key_map.items():
                if name.startswith(old) and new + name[len(old):] in own:
                    target, mapped_from = new + name[len(old):], name
                    break
        if target is None:
            report.dropped.append(name)
        elif tuple(own[target].shape) != tuple(tensor.shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(own[target].shape)))
        else:
            to_load[target] = tensor
            if mapped_from is None:
                report.loaded.append(target)
            else:
                report.mapped.append((mapped_from, target))
    report.new = [k for k in own if k not in to_load]
    model.load_state_dict(to_load, strict=False)
    return report
