"""Reusable training and evaluation pieces: evaluation loop, poly schedule, checkpoints, RNG.

Axis legend: b batch, l words, c channels (3 for images), h w logit grid (input size / 4),
S input size (square), H W original image size.

What lives here (used by ``examples/train_eavl.py`` and ``examples/evaluate.py``, and by
anyone who writes their own loop):

- ``evaluate`` / ``predict_masks``: the referring-segmentation evaluation of a model on a
  loader, at the original image size (CRIS, VLT) or at the input size (LAVT), with metric
  sums all-reduced across processes.
- ``poly_lr_factor`` / ``build_poly_scheduler``: polynomial decay per iteration (power 0.9).
- ``ShardedSampler``: a data order that is a pure function of (seed, epoch), split across
  processes without padding duplicates, that can start mid-epoch (exact resume).
- ``save_checkpoint`` / ``load_checkpoint`` / ``resolve_checkpoint_dir``: a checkpoint is a
  folder written atomically (temp sibling, fsync, rename); optimizer, scheduler, scaler and
  RNG states go to ``training_state.safetensors`` (every tensor, flattened) plus
  ``training_state.json`` (everything else), never to pickle.
- ``capture_rng_state`` / ``restore_rng_state`` / ``seed_everything``.
- Reporting: ``format_metrics_table``, ``plot_training_curves``, ``save_prediction_grid``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import METRIC_KEYS

__all__ = [
    "DistEnv",
    "ShardedSampler",
    "PolyDecay",
    "poly_lr_factor",
    "build_poly_scheduler",
    "seed_everything",
    "capture_rng_state",
    "restore_rng_state",
    "flatten_state",
    "unflatten_state",
    "atomic_write_dir",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "unwrap_model",
    "predict_masks",
    "soft_dice_loss",
    "evaluate",
    "format_metrics_table",
    "default_cache_dir",
    "ensure_synthetic_set",
    "check_data_root",
    "plot_training_curves",
    "save_prediction_grid",
    "TRAINING_STATE_JSON",
    "TRAINING_STATE_TENSORS",
    "CHECKPOINT_FORMAT_VERSION",
]

PathLike = Union[str, os.PathLike]

TRAINING_STATE_JSON = "training_state.json"
TRAINING_STATE_TENSORS = "training_state.safetensors"
# Bumped when the layout of training_state.json changes; load_checkpoint reads older versions.
CHECKPOINT_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Distributed environment
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly one-process) run, read from torchrun's variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "DistEnv":
        """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by ``torchrun``); default one process."""
        env = os.environ if environ is None else environ

        def _int(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None

        world = _int("WORLD_SIZE", 1)
        rank = _int("RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=_int("LOCAL_RANK", rank))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------
def poly_lr_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """The factor ``(1 - step / total_steps) ** power`` of polynomial decay, clamped at 0.

    ``step`` counts optimizer steps already taken (0 for the first update), so the first
    update uses the base learning rate and the factor reaches 0 after ``total_steps``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return max(0.0, 1.0 - step / total_steps) ** power


class PolyDecay:
    """A JSON-friendly callable for ``LambdaLR``: polynomial decay per step.

    ``LambdaLR.state_dict`` stores the ``__dict__`` of callable objects (not of functions),
    so ``total_steps`` and ``power`` travel with the scheduler's state.
    """

    def __init__(self, *, total_steps: int, power: float = 0.9) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.total_steps = int(total_steps)
        self.power = float(power)

    def __call__(self, step: int) -> float:
        return poly_lr_factor(step, self.total_steps, self.power)


def build_poly_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, power: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with polynomial decay, to be stepped once per optimizer step (per iteration)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyDecay(total_steps=total_steps, power=power))


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int) -> int:
    # Mix so that (seed, epoch) pairs do not collide the way seed + epoch would.
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63)


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Indices of one process's share of a data set, as a pure function of (seed, epoch).

    Training (``global_batch_size`` given): the permutation of the epoch is cut to a multiple
    of the global batch (every process then takes the same number of steps), and process
    ``rank`` takes positions ``rank, rank + W, ...``. Consecutive chunks of ``G / W`` indices
    of every process then make up exactly the global batch ``perm[s*G:(s+1)*G]`` of step
    ``s``, whatever the number of processes or accumulation steps.

    Evaluation (``global_batch_size=None``, ``shuffle=False``): every sample exactly once over
    all processes (no padding duplicates, unlike ``DistributedSampler``), so summed metrics
    are exact.

    ``set_epoch(epoch, skip=k)`` drops this process's first ``k`` indices: how a resumed run
    continues in the middle of an epoch without loading the skipped samples.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        global_batch_size: Optional[int] = None,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        if global_batch_size is not None:
            if global_batch_size < 1 or global_batch_size % num_replicas:
                raise ValueError(
                    f"global_batch_size must be a positive multiple of num_replicas={num_replicas}, "
                    f"got {global_batch_size}"
                )
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.global_batch_size = global_batch_size
        self.epoch = 0
        self.skip = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (training mode only)."""
        if self.global_batch_size is None:
            raise ValueError("steps_per_epoch needs global_batch_size")
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch (its permutation) and how many of this process's indices to skip."""
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.epoch = int(epoch)
        self.skip = int(skip)

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.global_batch_size is not None:
            order = order[: self.steps_per_epoch * self.global_batch_size]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.skip :])

    def __len__(self) -> int:
        if self.global_batch_size is not None:
            total = self.steps_per_epoch * self.global_batch_size // self.num_replicas
        else:
            total = len(range(self.rank, self.num_samples, self.num_replicas))
        return max(0, total - self.skip)


# --------------------------------------------------------------------------------------------
# Seeds and RNG states
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Every global generator's state: python, numpy, torch CPU and (if any) CUDA devices.

    Tensors stay tensors (uint8), so that ``flatten_state`` stores them in safetensors.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` (also accepts the state after a JSON round trip)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        # A run resumed on fewer devices restores those it has.
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), index)


# --------------------------------------------------------------------------------------------
# State flattening: nested python structures with tensors <-> (JSON, {name: tensor})
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Atomic folders
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _save_model(model: nn.Module, directory: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))


def load_model_weights(model: nn.Module, directory: PathLike) -> None:
    """Load ``model.safetensors`` of a checkpoint folder into an existing ``model`` (in place).

    Uses the model's own ``load_checkpoint_state`` when it has one (EAVL's: errors that name
    the differing tensors), else ``load_state_dict(strict=True)``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has no model.safetensors")
    bare = unwrap_model(model)
    state = load_file(str(weights))
    if hasattr(bare, "load_checkpoint_state"):
        bare.load_checkpoint_state(state, strict=True, source=str(weights))
    else:
        bare.load_state_dict(state, strict=True)


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
        "args": _jsonable(dict(args or {})),
        "state": skeleton,
    }

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        _save_model(model, tmp)
        save_file(tensors, str(tmp / TRAINING_STATE_TENSORS), metadata={"format": "vlaligner-training-state"})
        # The JSON last: a folder with it is complete (the rename makes that atomic anyway).
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
    from safetensors.torch import load_file

    resolved = resolve_checkpoint_dir(path)
    if resolved is None:
        raise FileNotFoundError(f"no checkpoint folder at {path} (nor {_old_sibling(Path(path))})")
    json_path = resolved / TRAINING_STATE_JSON
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{resolved} has no {TRAINING_STATE_JSON}: it is a model folder, not a training checkpoint"
        )
    with open(json_path) as handle:
        document = json.load(handle)
    if document.get("format") != "vlaligner-training-state":
        raise ValueError(f"{json_path} is not a vlaligner training state (format={document.get('format')!r})")
    if int(document.get("version", 0)) > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has version {document['version']}, newer than this vlaligner "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade vlaligner to resume from it"
        )
    tensors = load_file(str(resolved / TRAINING_STATE_TENSORS))
    state = unflatten_state(document.pop("state"), tensors)
    document.update(state)
    document["path"] = str(resolved)
    return document


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# --------------------------------------------------------------------------------------------
# Data locations
# --------------------------------------------------------------------------------------------
SYNTHETIC_MARKER = "vlaligner-synthetic.json"
SYNTHETIC_VERSION = 1


def default_cache_dir() -> Path:
    """Where the synthetic set is cached: ``$VLALIGNER_CACHE`` or ``$XDG_CACHE_HOME/vlaligner``
    (``~/.cache/vlaligner``), sub-folder ``synthetic-v1``."""
    base = os.environ.get("VLALIGNER_CACHE")
    if base is None:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlaligner")
    return Path(base) / f"synthetic-v{SYNTHETIC_VERSION}"


def ensure_synthetic_set(
    cache_dir: PathLike, *, num_images: int, seed: int = 0, log: Optional[Callable[[str], None]] = None
) -> Path:
    """Generate the synthetic RefCOCO-layout set into ``cache_dir`` once; return the data root.

    The folder records its generation parameters in ``vlaligner-synthetic.json``; a folder
    made with other parameters is regenerated. Generation goes to a temporary sibling that is
    renamed into place (a killed generation never leaves a half set), under a file lock so
    that concurrent processes (torchrun ranks, parallel runs) generate it once.
    """
    from .data import generate_synthetic_refcoco

    cache_dir = Path(cache_dir).expanduser()
    wanted = {"version": SYNTHETIC_VERSION, "num_images": int(num_images), "seed": int(seed)}

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
            log(f"{what} the synthetic set ({num_images} images, seed {seed}) in {cache_dir}")

        def write(tmp: Path) -> None:
            generate_synthetic_refcoco(tmp, num_images=int(num_images), seed=int(seed))
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


# --------------------------------------------------------------------------------------------
# Losses beyond the paper's BCE
# --------------------------------------------------------------------------------------------
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """``1 - Dice`` of ``sigmoid(logits)`` and the target, averaged over the batch.

    Not in the paper (BCE only): an option for short runs, where BCE alone first learns to
    predict background everywhere (the referred object covers a few percent of the pixels)
    and Dice, which only counts the object, pulls the foreground in from the first steps.

    Args:
        logits: ``(b 1 h w)`` predicted logits.
        target: ``(b H W)`` or ``(b 1 H W)`` binary mask, resized to ``h x w`` (nearest).
        eps: smoothing added to both sides of the ratio (an empty target and an empty
            prediction then give a loss near 0).

    Returns:
        scalar tensor (float32).
    """
    from .losses import resize_target

    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (b 1 h w), got {tuple(logits.shape)}")
    target = resize_target(target, tuple(logits.shape[-2:])).to(logits.device)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes must match, got logits: {logits.shape[0]}, target: {target.shape[0]}")
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    dice = (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)
    return (1 - dice).mean()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def predict_masks(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    device: Union[str, torch.device],
    at_original_size: bool = True,
    threshold: float = 0.5,
    amp_dtype: Optional[torch.dtype] = None,
) -> list[torch.Tensor]:
    """Binary masks predicted for a collated batch, on CPU.

    The logits ``(b 1 h w)`` are upsampled (bilinear) to the input size ``S x S``; with
    ``at_original_size`` each is then resized to its image's original ``H x W`` (from
    ``batch["orig_size"]``) before thresholding the probability at ``threshold``.

    Args:
        batch: ``image (b 3 S S)``, ``input_ids (b l)``, ``attention_mask (b l)``,
            ``orig_size (b 2)`` (needed with ``at_original_size``).

    Returns:
        ``b`` bool tensors, ``(H W)`` each, or ``(S S)`` each without ``at_original_size``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    device = torch.device(device)
    images = batch["image"].to(device, non_blocking=True)
    if images.dim() != 4:
        raise ValueError(f"batch['image'] must have shape (b 3 S S), got {tuple(images.shape)}")
    with _autocast(device, amp_dtype):
        out = model(images, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    logits = out.logits if hasattr(out, "logits") else out
    logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    # sigmoid(x) > t  <=>  x > log(t / (1 - t)); avoids a sigmoid over every pixel.
    cut = math.log(threshold / (1.0 - threshold))
    if not at_original_size:
        return list((logits[:, 0] > cut).cpu())
    sizes = batch["orig_size"]
    masks = []
    for i in range(logits.shape[0]):
        h, w = (int(v) for v in sizes[i])
        resized = F.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
        masks.append((resized[0, 0] > cut).cpu())
    return masks


def _targets(batch: Mapping[str, Any], at_original_size: bool) -> list[torch.Tensor]:
    if at_original_size:
        return [torch.as_tensor(m).bool() for m in batch["orig_mask"]]
    return list(batch["mask"] > 0.5)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    device: Union[str, torch.device],
    at_original_size: bool = True,
    threshold: float = 0.5,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    description: str = "eval",
) -> dict:
    """oIoU, mIoU and Pr@0.5-0.9 (percent) of ``model`` over ``loader``, summed over processes.

    In a distributed run each process should see a disjoint share of the split (e.g. with
    ``ShardedSampler(shuffle=False)``); the metric sums are all-reduced, so every process
    returns the metrics of the whole split. The model's training mode and the global RNG
    states are restored afterwards, so evaluating never changes a training run's course.

    Returns:
        ``{"oIoU": ..., "mIoU": ..., "Pr@0.5": ..., ..., "Pr@0.9": ..., "num_samples": n}``.
    """
    from .metrics import RISMetricAccumulator

    device = torch.device(device)
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    accumulator = RISMetricAccumulator()
    rank = torch.distributed.get_rank() if _dist_ready() else 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            for batch in loader:
                preds = predict_masks(
                    bare, batch, device=device, at_original_size=at_original_size,
                    threshold=threshold, amp_dtype=amp_dtype,
                )
                accumulator.update(preds, _targets(batch, at_original_size))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        bare.train(was_training)
    accumulator.all_reduce()
    metrics = dict(accumulator.compute())
    metrics["num_samples"] = accumulator.count
    return metrics


def format_metrics_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per split, columns oIoU, mIoU, Pr@0.5-0.9 (percent)."""
    keys = list(METRIC_KEYS)
    width = max([5] + [len(s) for s in results])
    header = f"{'split':<{width}} " + " ".join(f"{k:>7}" for k in keys)
    lines = [header, "-" * len(header)]
    for split, metrics in results.items():
        cells = []
        for k in keys:
            value = metrics.get(k)
            cells.append(f"{value:7.2f}" if isinstance(value, (int, float)) else f"{'-':>7}")
        lines.append(f"{split:<{width}} " + " ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
    return rows


def plot_training_curves(
    losses_path: PathLike, metrics_path: PathLike, out_path: PathLike, *, metric: str = "mIoU"
) -> Path:
    """Plot the training loss per step and the validation ``metric`` per evaluation to a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    losses = _read_jsonl(Path(losses_path))
    evals = [r for r in _read_jsonl(Path(metrics_path)) if metric in r.get("metrics", {})]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        steps = [r["step"] for r in losses]
        values = [r["loss"] for r in losses]
        ax_loss.plot(steps, values, lw=0.8, alpha=0.5, label="loss")
        if len(values) >= 10:
            window = max(2, len(values) // 20)
            kernel = np.ones(window) / window
            smooth = np.convolve(values, kernel, mode="valid")
            ax_loss.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
        ax_loss.legend()
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    for split in sorted({r.get("split", "val") for r in evals}):
        rows = [r for r in evals if r.get("split", "val") == split]
        ax_metric.plot([r["step"] for r in rows], [r["metrics"][metric] for r in rows], "o-", label=split)
    if evals:
        ax_metric.legend()
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"{metric} (%)")
    ax_metric.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def save_prediction_grid(
    out_path: PathLike,
    images: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    sentences: Sequence[str],
    *,
    ious: Optional[Sequence[float]] = None,
) -> Path:
    """A PNG with one panel per sample: the prediction lit and outlined, the truth outlined.

    Outside the predicted mask the image is darkened (whatever the objects' colours, the
    prediction stands out); the prediction's outline is cyan, the ground truth's dashed lime.

    Args:
        images: ``(H W 3)`` uint8 each.
        preds, targets: ``(H W)`` bool each, the size of their image.
        sentences: the referring expression of each sample (the panel title).
        ious: optional IoU (0-1) of each sample, shown under its sentence.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import textwrap

    n = len(images)
    if not (len(preds) == len(targets) == len(sentences) == n) or n == 0:
        raise ValueError(
            f"need as many images, preds, targets and sentences (>= 1), got {n}, {len(preds)}, "
            f"{len(targets)}, {len(sentences)}"
        )
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        image = np.asarray(images[i]).astype(np.float32) / 255.0
        pred = np.asarray(preds[i]).astype(bool)
        target = np.asarray(targets[i]).astype(bool)
        if pred.shape != image.shape[:2] or target.shape != image.shape[:2]:
            raise ValueError(
                f"sample {i}: image (H W 3) = {image.shape}, pred {pred.shape} and target {target.shape} "
                "must share H W"
            )
        shown = np.where(pred[..., None], image, 0.3 * image)
        ax.imshow(shown)
        if pred.any() and not pred.all():
            ax.contour(pred.astype(float), levels=[0.5], colors=["cyan"], linewidths=1.4)
        if target.any() and not target.all():
            ax.contour(target.astype(float), levels=[0.5], colors=["lime"], linewidths=1.4, linestyles="dashed")
        title = textwrap.fill(sentences[i], 32)
        if ious is not None:
            title += f"\nIoU {100 * ious[i]:.1f}%"
        ax.set_title(title, fontsize=8)
    fig.suptitle("lit + cyan: prediction, dashed lime: ground truth", fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
