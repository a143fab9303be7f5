"""Training checkpoints: a folder written atomically, read back with integrity checks.

A checkpoint folder holds the model (``EAVL.save_pretrained``'s files, so that
``EAVL.from_pretrained(folder)`` loads it: ``model.safetensors`` + ``config.json`` with its
SHA-256) and the training state: every tensor of the optimizer / scheduler / scaler / RNG
states in ``training_state.safetensors``, everything else in ``training_state.json`` (with the
SHA-256 of the tensors file). Nothing is pickled, so loading a checkpoint cannot run code;
every load checks the recorded hashes and names the file in its errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write_dir, read_json_file, resolve_checkpoint_dir, sha256_file
from .distributed import unwrap_model

__all__ = [
    "TRAINING_STATE_JSON",
    "TRAINING_STATE_TENSORS",
    "CHECKPOINT_FORMAT_VERSION",
    "flatten_state",
    "unflatten_state",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "check_recorded_hash",
    "read_safetensors",
    "resolve_checkpoint_dir",
    "jsonable",
]

PathLike = Union[str, "os.PathLike[str]"]

TRAINING_STATE_JSON = "training_state.json"
TRAINING_STATE_TENSORS = "training_state.safetensors"
# Bumped when the layout of training_state.json changes; load_checkpoint reads older versions.
CHECKPOINT_FORMAT_VERSION = 1


def read_safetensors(path: PathLike) -> dict:
    """``safetensors.torch.load_file`` on CPU, with an error naming the file when it is unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ValueError
        raise ValueError(f"{path} is not a readable safetensors file (corrupt, truncated or tampered): {error}") from error


def check_recorded_hash(directory: PathLike) -> None:
    """Refuse a folder whose ``model.safetensors`` differs from the SHA-256 in its ``config.json``.

    A folder without ``config.json`` (a bare model saved by ``save_checkpoint`` for a model
    without ``save_pretrained``) records no hash and passes.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        return
    config = read_json_file(config_path, what="checkpoint config")
    recorded = config.get("weights_sha256") if isinstance(config, dict) else None
    if not isinstance(recorded, str):
        raise ValueError(f"{config_path} records no weights_sha256: cannot check {directory / 'model.safetensors'}")
    if sha256_file(directory / "model.safetensors") != recorded:
        raise ValueError(
            f"{directory / 'model.safetensors'} does not match the SHA-256 recorded in {config_path}: "
            "the weights were changed after saving (tampered, corrupt or half-copied); refusing to load them"
        )


def flatten_state(obj: Any, prefix: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able skeleton and a flat ``{name: tensor}`` dict.

    Tensors become ``{"__tensor__": name}``; NumPy arrays ``{"__ndarray__": name, dtype, shape}``
    (stored as their bytes, uint8); tuples ``{"__tuple__": [...]}``; dicts with non-string keys
    (an optimizer's ``state`` is keyed by int) ``{"__items__": [[key, value], ...]}``.
    Nothing is pickled, so loading a checkpoint cannot run code.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            # safetensors refuses shared or strided storage; a contiguous CPU copy is always safe.
            tensors[path] = value.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            tensors[path] = torch.from_numpy(arr.view(np.uint8).reshape(-1).copy())
            return {"__ndarray__": path, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
                return {k: enc(v, f"{path}.{k}") for k, v in value.items()}
            return {"__items__": [[enc(k, f"{path}.k{i}"), enc(v, f"{path}.{k}")] for i, (k, v) in enumerate(value.items())]}
        raise TypeError(
            f"cannot store a value of type {type(value).__name__} at {path!r} in a checkpoint; "
            "expected tensors, numpy arrays, numbers, strings, None, lists, tuples or dicts"
        )

    return enc(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if isinstance(value, dict):
            if "__tensor__" in value:
                name = value["__tensor__"]
                if name not in tensors:
                    raise KeyError(f"checkpoint is missing tensor {name!r}")
                return tensors[name]
            if "__ndarray__" in value:
                raw = tensors[value["__ndarray__"]].numpy().tobytes()
                return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
            if "__tuple__" in value:
                return tuple(dec(v) for v in value["__tuple__"])
            if "__items__" in value:
                return {_dec_key(dec(k)): dec(v) for k, v in value["__items__"]}
            return {k: dec(v) for k, v in value.items()}
        return value

    return dec(skeleton)


def _dec_key(key: Any) -> Any:
    # JSON turns tuple keys into lists; a dict key must be hashable.
    return tuple(key) if isinstance(key, list) else key


def _save_model(model: nn.Module, directory: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))


def load_model_weights(model: nn.Module, directory: PathLike, *, fresh_prefixes: Sequence[str] = ()) -> List[str]:
    """Load ``model.safetensors`` of a checkpoint folder into an existing ``model`` (in place).

    The SHA-256 recorded in the folder's ``config.json`` (when the folder has one) is checked
    first: a file changed after saving is refused. Uses the model's own
    ``load_checkpoint_state`` when it has one (EAVL's: errors that name the differing
    tensors), else ``load_state_dict(strict=True)``.

    Args:
        model: the model to fill.
        directory: a checkpoint folder.
        fresh_prefixes: names of parts the checkpoint may lack, which then keep the model's
            own (fresh) initialisation, e.g. ``("no_target_head.",)`` to fine-tune a classic
            checkpoint on a generalized set. Every other tensor must be there, and the
            checkpoint may hold nothing the model lacks.

    Returns:
        The names of the tensors that kept their fresh initialisation (empty when the
        checkpoint held every tensor).
    """
    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has no model.safetensors (a checkpoint folder holds it)")
    if isinstance(fresh_prefixes, str):
        raise TypeError(f"fresh_prefixes must be a sequence of name prefixes, got the string {fresh_prefixes!r}")
    check_recorded_hash(directory)
    bare = unwrap_model(model)
    state = read_safetensors(weights)
    fresh = [k for k, v in bare.state_dict().items() if k not in state and k.startswith(tuple(fresh_prefixes))]
    if fresh:
        state = dict(state)
        own = bare.state_dict()
        state.update({k: own[k] for k in fresh})
    if hasattr(bare, "load_checkpoint_state"):
        bare.load_checkpoint_state(state, strict=True, source=str(weights))
    else:
        bare.load_state_dict(state, strict=True)
    return fresh


def save_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    scaler: Optional[Any] = None,
    rng_states: Optional[Sequence[Mapping[str, Any]]] = None,
    args: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    before_commit: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write a training checkpoint folder atomically.

    The folder holds the model (``model.save_pretrained`` when the model has it, so that
    ``EAVL.from_pretrained(path)`` loads it; else ``model.safetensors``) and the training state:
    ``training_state.safetensors`` with every tensor of the optimizer / scheduler / scaler /
    RNG states, flattened, and ``training_state.json`` with the rest (step, epoch, args, ...).

    Args:
        rng_states: one ``capture_rng_state()`` per process (rank order); restored per rank.
        extra: JSON-able fields stored at the top level (``step``, ``epoch``, scores, ...).
        before_commit: called with the temporary folder after all files are written, before
            the rename (a test hook to simulate a crash mid-write).
    """
    model = unwrap_model(model)
    payload: dict[str, Any] = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": list(rng_states) if rng_states is not None else None,
    }
    skeleton, tensors = flatten_state(payload, prefix="state")
    document = {
        "format": "vlaligner-training-state",
        "version": CHECKPOINT_FORMAT_VERSION,
        **dict(extra or {}),
        "args": jsonable(dict(args or {})),
        "state": skeleton,
    }

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        _save_model(model, tmp)
        save_file(tensors, str(tmp / TRAINING_STATE_TENSORS), metadata={"format": "vlaligner-training-state"})
        # The JSON last: a folder with it is complete (the rename makes that atomic anyway).
        document["training_state_sha256"] = sha256_file(tmp / TRAINING_STATE_TENSORS)
        with open(tmp / TRAINING_STATE_JSON, "w") as handle:
            json.dump(document, handle, indent=1)
        if before_commit is not None:
            before_commit(tmp)

    return atomic_write_dir(path, write)


def load_checkpoint(path: PathLike) -> dict:
    """Read ``training_state.{json,safetensors}`` of a checkpoint folder (or its ``.old`` twin).

    Returns the JSON document with ``optimizer``, ``scheduler``, ``scaler`` and ``rng``
    decoded back into state dicts (tensors on CPU), and ``path`` set to the folder read.
    """
    resolved = resolve_checkpoint_dir(path)
    if resolved is None:
        raise FileNotFoundError(f"no checkpoint folder at {path} (nor {path}.old)")
    json_path = resolved / TRAINING_STATE_JSON
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{resolved} has no {TRAINING_STATE_JSON}: it is a model folder, not a training checkpoint"
        )
    document = read_json_file(json_path, what="training state")
    found = document.get("format") if isinstance(document, dict) else type(document).__name__
    if found != "vlaligner-training-state":
        raise ValueError(f"{json_path} is not a vlaligner training state (format={found!r})")
    if int(document.get("version", 0)) > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has version {document['version']}, newer than this vlaligner "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade vlaligner to resume from it"
        )
    tensors_path = resolved / TRAINING_STATE_TENSORS
    recorded = document.get("training_state_sha256")
    if recorded is not None and sha256_file(tensors_path) != recorded:
        raise ValueError(
            f"{tensors_path} does not match the SHA-256 recorded in {json_path}: changed after saving; "
            "refusing to resume from it"
        )
    check_recorded_hash(resolved)
    tensors = read_safetensors(tensors_path)
    state = unflatten_state(document.pop("state"), tensors)
    document.update(state)
    document["path"] = str(resolved)
    return document


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
