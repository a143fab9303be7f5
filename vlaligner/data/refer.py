"""RefCOCO, RefCOCO+, G-Ref and gRefCOCO read from the layouts of ``refer`` / ReLA's ``grefer``.

Axis legend: c channels (3), h w space at the model's input size (S x S by default),
H W space of the original image, l words (tokens).

Expected layout under ``root`` (only these exact names are ever opened)::

    root/refcoco/refs(unc).p          root/refcoco/instances.json
    root/refcoco+/refs(unc).p         root/refcoco+/instances.json
    root/refcocog/refs(umd).p         root/refcocog/refs(google).p   root/refcocog/instances.json
    root/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg ...

gRefCOCO (generalized referring expressions, ReLA's ``grefer.py``)::

    root/grefcoco/grefs(unc).p or root/grefcoco/grefs(unc).json    root/grefcoco/instances.json
    root/images/train2014/COCO_train2014_*.jpg   (or root/images/mscoco/images/train2014/)

A gRefCOCO ref's ``ann_id`` is a list of annotation ids: every listed object is a target
(the sample's mask is their union), and ``[-1]`` (or an empty list) means the sentence
refers to nothing in the image (``no_target``, an empty mask).

The refs files are Python pickles (the published format). Unpickling arbitrary data can run
code, so they are read with a restricted unpickler that only builds lists, dicts, strings and
numbers and refuses anything else with a clear error.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .memory import CACHE_MEMORY_FRACTION, SampleCacheTooLarge, available_memory_bytes, format_bytes, sample_cache_bytes
from .transforms import hflip_sample, load_image, preprocess_image, resize_mask

__all__ = [
    "RefDataset",
    "RefSample",
    "DATASET_SPLITS",
    "DEFAULT_MAX_LENGTH",
    "IMAGE_SUBDIR",
    "UnsafePickleError",
    "load_refs",
    "load_refs_json",
    "ref_problems",
    "sentence_text",
    "read_instances",
    "annotation_problems",
    "image_entry_problems",
    "decode_segmentation",
    "GENERALIZED_DATASETS",
    "target_ann_ids",
    "missing_data_files",
]

# Splits as published: RefCOCO / RefCOCO+ (UNC): testA = people, testB = other objects.
DATASET_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
    # gRefCOCO (ReLA): the UNC splits of RefCOCO's images.
    "grefcoco": {"unc": ("train", "val", "testA", "testB")},
}
# Paper (and LAVT / CRIS practice): 17 tokens for RefCOCO / RefCOCO+, 22 for G-Ref;
# ReLA's MAX_TOKENS for gRefCOCO is 20.
DEFAULT_MAX_LENGTH: dict[str, int] = {"refcoco": 17, "refcoco+": 17, "refcocog": 22, "grefcoco": 20}
IMAGE_SUBDIR = Path("images") / "mscoco" / "images" / "train2014"
#: Data sets whose refs name any number of objects (a list ``ann_id``; ``[-1]`` = none).
GENERALIZED_DATASETS = frozenset({"grefcoco"})
# Where gRefCOCO's images are looked for, in this order: ReLA's layout, then RefCOCO's.
_GREF_IMAGE_SUBDIRS = (Path("images") / "train2014", IMAGE_SUBDIR)

Tokenizer = Callable[[list, int], tuple]
PathLike = Union[str, "os.PathLike[str]"]


class RefSample(NamedTuple):
    """One sample of the data set: one sentence of one ref."""

    ref_id: int
    sent_id: int
    sentence: str


class UnsafePickleError(ValueError):
    """A refs pickle asked for something other than plain lists, dicts, strings and numbers."""


class _RefsUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild the plain containers a refer refs file consists of.

    Lists, dicts, tuples, strings and numbers have their own pickle opcodes and never go
    through ``find_class``; every callable a malicious pickle needs to run code does. Sets
    and OrderedDicts are harmless and allowed in case a re-saved file contains them.
    """

    _ALLOWED = {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
        ("collections", "OrderedDict"),
    }

    def __init__(self, file: io.BufferedIOBase, *, path: Path, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {self._path}: the pickle asks for the global '{module}.{name}', "
            "but a refer refs file holds only lists, dicts, strings and numbers. Pickles can "
            "run code when loaded; use refs files only from the official refer release."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"refusing to load {self._path}: it uses pickle persistent ids, which a refer "
            "refs file never does"
        )


_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def _unpickle_refs(path: Path) -> Any:
    """Unpickle a refs file with the restricted unpickler (no structure check)."""
    if not path.is_file():
        raise FileNotFoundError(f"refs file not found: {path}")
    data = path.read_bytes()
    # The official files were written by Python 2; their str objects are ASCII, so utf-8
    # reads them; latin-1 is the fallback that can decode any byte string.
    for encoding in ("utf-8", "latin1"):
        try:
            return _RefsUnpickler(io.BytesIO(data), path=path, encoding=encoding).load()
        except UnsafePickleError:
            raise
        except UnicodeDecodeError:
            continue
        except Exception as err:  # noqa: BLE001 - any decoding failure means a broken file
            raise ValueError(f"cannot read refs file {path} as a pickle: {err!r}") from err
    raise ValueError(f"cannot read refs file {path}: its strings are neither utf-8 nor latin-1")


def _as_id(value: Any) -> Optional[int]:
    """An integer id (int, or a str / float that is one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def ref_problems(ref: Any, index: int) -> list[str]:
    """What is wrong with entry ``index`` of a refs file (empty list: nothing).

    Checks the keys ``ref_id``, ``ann_id``, ``image_id`` (integers), ``split`` (str) and
    ``sentences`` (a list of dicts, each with an integer ``sent_id`` and ``raw`` or
    ``sent``). Empty sentences are not a structural problem (see :func:`sentence_text`).
    Each message names the entry by its ref id when it has one.
    """
    if not isinstance(ref, dict):
        return [f"entry {index} must be a dict with keys {list(_REF_KEYS)}, got {type(ref).__name__}"]
    missing = [k for k in _REF_KEYS if k not in ref]
    if missing:
        return [
            f"entry {index} must be a dict with keys {list(_REF_KEYS)}; ref_id {ref.get('ref_id')!r} has no "
            f"{missing} (keys: {sorted(map(str, ref))})"
        ]
    name = f"ref {ref['ref_id']!r} (entry {index})"
    problems = [
        f"{name}: {key} must be an integer id, got {ref[key]!r}"
        for key in ("ref_id", "image_id")
        if _as_id(ref[key]) is None
    ]
    ann = ref["ann_id"]  # one id, or (gRefCOCO) a list of ids, [-1] for no target
    if (_as_id(ann) is None) if not isinstance(ann, (list, tuple)) else any(_as_id(a) is None for a in ann):
        problems.append(f"{name}: ann_id must be an integer id (or a list of them), got {ann!r}")
    if not isinstance(ref["split"], str):
        problems.append(f"{name}: split must be a str, got {ref['split']!r}")
    sentences = ref["sentences"]
    if not isinstance(sentences, (list, tuple)):
        problems.append(f"{name}: sentences must be a list, got {type(sentences).__name__}")
        return problems
    for j, sent in enumerate(sentences):
        if not isinstance(sent, dict) or "sent_id" not in sent or not ("raw" in sent or "sent" in sent):
            problems.append(f"{name}: sentence {j} has no 'sent_id' and 'raw'/'sent': {sent!r}"[:300])
        elif _as_id(sent["sent_id"]) is None:
            problems.append(f"{name}: sentence {j} has sent_id {sent['sent_id']!r}, not an integer id")
    return problems


def sentence_text(sent: dict) -> str:
    """The text of a refer sentence dict: ``raw`` (as LAVT), else ``sent``; stripped; "" if none."""
    for key in ("raw", "sent"):
        text = sent.get(key)
        if isinstance(text, str) and text.strip():
            return text.strip()
    return ""


def load_refs(path: PathLike) -> list[dict]:
    """Read a ``refs(<split_by>).p`` file with the restricted unpickler and check its structure.

    Returns:
        the list of ref dicts (keys ``ref_id``, ``ann_id``, ``image_id``, ``split``,
        ``sentences`` [each with ``sent_id`` and ``raw`` / ``sent``], ...).

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError (a ValueError): the pickle references any global (possible code).
        ValueError: the file is not a readable pickle or not a list of ref dicts; the message
            names the file, the entry and its ref id (see :func:`ref_problems`).
    """
    path = Path(path)
    refs = _unpickle_refs(path)
    return _check_refs(refs, path)


def load_refs_json(path: PathLike) -> list[dict]:
    """Read a ``grefs(<split_by>).json`` file (gRefCOCO's published format) and check it.

    Returns and raises as :func:`load_refs` (a file that is not JSON is a ``ValueError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file not found: {path}")
    try:
        refs = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read refs file {path} as JSON: {err}") from err
    return _check_refs(refs, path)


def _check_refs(refs: Any, path: Path) -> list[dict]:
    if not isinstance(refs, list):
        raise ValueError(
            f"refs file {path} must hold a list of ref dicts, got {type(refs).__name__}"
        )
    for i, ref in enumerate(refs):
        problems = ref_problems(ref, i)
        if problems:
            more = f" (and {len(problems) - 1} more in this entry)" if len(problems) > 1 else ""
            raise ValueError(f"refs file {path}: {problems[0]}{more}")
    return refs


def _mask_utils() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding COCO polygons needs pycocotools: pip install 'vlaligner[data]'"
        ) from err
    return mask_utils


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation to a boolean mask exactly as the ``refer`` API does.

    Polygons go through ``pycocotools.mask.frPyObjects``; the parts of a multi-polygon
    annotation are *summed* (refer's ``getMask``) and every pixel covered by any part is
    foreground, i.e. the union. (LAVT then keeps only ``== 1``, which drops pixels where two
    parts overlap; we do not copy that slip.)

    Args:
        segmentation: list of polygons ``[[x0, y0, x1, y1, ...], ...]``, or an RLE dict
            (compressed string or uncompressed list ``counts``).
        height, width: the image size.

    Returns:
        ``(H W)`` bool array.
    """
    mask_utils = _mask_utils()
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            rles = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rles = segmentation
    else:
        raise ValueError(
            "segmentation must be a list of polygons or an RLE dict with 'counts', got "
            f"{type(segmentation).__name__}"
        )
    m = mask_utils.decode(rles)
    if m.ndim == 3:
        m = m.sum(axis=2)
    if m.shape != (height, width):
        raise ValueError(
            f"decoded mask has shape {m.shape}, expected (height, width) = ({height}, {width})"
        )
    return m > 0


def target_ann_ids(ann_id: Any, *, where: str = "ref") -> list[int]:
    """The annotation ids a ref refers to, as gRefCOCO (ReLA's ``grefer.py``) reads them.

    ``ann_id`` may be one id (RefCOCO style) or a list of ids; ``[-1]`` and ``[]`` (and a bare
    ``-1``) mean *no target*: the result is then an empty list. ``-1`` mixed with real ids
    is refused (ReLA asserts the same).

    Raises:
        ValueError: an id that is not an int, or ``-1`` beside other ids (names ``where``).
    """
    ids = ann_id if isinstance(ann_id, (list, tuple)) else [ann_id]
    out: list[int] = []
    for a in ids:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise ValueError(f"{where}: ann_id must hold integer annotation ids, got {ann_id!r}")
        out.append(int(a))
    if -1 in out:
        if len(out) > 1:
            raise ValueError(
                f"{where}: ann_id {ann_id!r} mixes -1 (no target) with annotation ids; a "
                "no-target ref has ann_id [-1]"
            )
        return []
    return out


def missing_data_files(root: PathLike, dataset: str, split_by: str) -> list[str]:
    """What :class:`RefDataset` would miss under ``root`` (file existence only; cheap).

    For RefCOCO / RefCOCO+ / G-Ref: ``<dataset>/refs(<split_by>).p``, ``<dataset>/instances.json``
    and ``images/mscoco/images/train2014/``. For gRefCOCO: ``grefcoco/grefs(<split_by>).json``
    (or ``.p``), ``grefcoco/instances.json`` and ``images/train2014/`` (or the RefCOCO image
    folder). Returns the missing paths as strings (alternatives joined by " or "), empty
    when everything is there.
    """
    root = Path(root).expanduser()
    data = root / dataset
    if dataset in GENERALIZED_DATASETS:
        alternatives = [
            [data / f"grefs({split_by}).json", data / f"grefs({split_by}).p"],
            [data / "instances.json"],
            [root / d for d in _GREF_IMAGE_SUBDIRS],
        ]
    else:
        alternatives = [[data / f"refs({split_by}).p"], [data / "instances.json"], [root / IMAGE_SUBDIR]]
    return [" or ".join(str(p) for p in paths) for paths in alternatives if not any(p.exists() for p in paths)]


def _safe_file_name(name: Any) -> bool:
    """True for a plain file name (no folders, no '..'): we only open files inside root."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and os.path.basename(name) == name
    )


def read_instances(path: Path) -> dict:
    """Read a COCO ``instances.json`` and check its top-level structure.

    Returns:
        the dict, with ``images`` and ``annotations`` lists whose entries are dicts with an
        integer ``id``.

    Raises:
        FileNotFoundError / ValueError naming ``path`` (and the entry at fault).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            instances = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot parse {path} (truncated or not JSON?): {err}") from err
    if not isinstance(instances, dict) or not {"images", "annotations"} <= set(instances):
        keys = sorted(instances) if isinstance(instances, dict) else type(instances).__name__
        raise ValueError(
            f"{path} must be a COCO instances dict with 'images' and 'annotations', got {keys}"
        )
    for key in ("images", "annotations"):
        entries = instances[key]
        if not isinstance(entries, list):
            raise ValueError(f"{path}: '{key}' must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or _as_id(entry.get("id")) is None:
                raise ValueError(
                    f"{path}: {key}[{i}] must be a dict with an integer 'id', got {str(entry)[:200]}"
                )
    return instances


def annotation_problems(ann: dict, *, drop_invalid_polygons: bool = False) -> list[str]:
    """What is wrong with a COCO annotation a ref uses (missing or malformed 'segmentation').

    ``drop_invalid_polygons``: polygons of fewer than 3 points are not a problem (gRefCOCO:
    ReLA's loader drops them, and so does the mask decoding of a generalized set).
    """
    if "segmentation" not in ann:
        return [f"has no 'segmentation' (keys: {sorted(map(str, ann))})"]
    seg = ann["segmentation"]
    if isinstance(seg, list):
        if not all(isinstance(p, (list, tuple)) for p in seg):
            return ["has a 'segmentation' list that is not a list of polygons"]
        if not drop_invalid_polygons and any(len(p) < 6 or len(p) % 2 for p in seg):
            return ["has a polygon with fewer than 3 points or an odd number of coordinates"]
        return []
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        return []
    return [f"has a 'segmentation' that is neither polygons nor an RLE dict: {str(seg)[:100]}"]


def image_entry_problems(info: dict, image_dir: Path) -> list[str]:
    """What is wrong with a COCO image entry (size, file name); not whether the file exists."""
    problems = []
    for key in ("height", "width"):
        value = _as_id(info.get(key))
        if value is None or value <= 0:
            problems.append(f"has {key} {info.get(key)!r}, not a positive integer")
    if not _safe_file_name(info.get("file_name")):
        problems.append(
            f"has file_name {info.get('file_name')!r}; only plain file names inside {image_dir} are opened"
        )
    return problems


class RefDataset(Dataset):
    """One sample per sentence of RefCOCO / RefCOCO+ / G-Ref / gRefCOCO (``refer`` layouts).

    Images are resized to ``img_size x img_size`` with a plain bilinear resize (the aspect
    ratio is NOT kept; LAVT's convention) and normalised with the ImageNet mean / std. The
    target mask is decoded from the COCO polygons with pycocotools (union of the parts) and
    resized to the input size with nearest neighbour; the original-size mask and size are
    returned too, for evaluation at the original resolution.

    Args:
        root: folder holding ``refcoco/``, ``refcoco+/``, ``refcocog/`` and
            ``images/mscoco/images/train2014/``, or ``grefcoco/`` and ``images/train2014/``
            (see docs/data.md).
        dataset: "refcoco", "refcoco+", "refcocog" or "grefcoco" (generalized: a sentence
            may refer to several objects or to none).
        split_by: "unc" (RefCOCO, RefCOCO+, gRefCOCO), "umd" or "google" (G-Ref).
        split: unc: train / val / testA / testB; umd: train / val / test; google: train / val.
        tokenizer: callable ``(list[str], max_length) -> (input_ids (b l), attention_mask
            (b l))`` such as ``EAVL.tokenize``; with None the samples carry no token ids.
        img_size: side of the square model input.
        max_length: tokens per sentence; default 17 (RefCOCO / RefCOCO+), 22 (G-Ref) or
            20 (gRefCOCO, ReLA's value).
        augment: random horizontal flip (p = 0.5) that also swaps "left" / "right" in the
            sentence; off by default (use it for training only).
        cache: keep each preprocessed image (per image), target mask (per ref) and the token
            ids (per sentence) in memory after their first use, so that later epochs skip the
            decoding, resizing and tokenizing (the flip still runs every time). For small sets
            loaded in the training process itself (the demo: 640 images of 3 x 128 x 128
            float32 and their 1,757 masks in train and val, 225 MiB by ``cache_bytes()``);
            each loader process would hold a copy of its own. A set whose full cache would
            take more than half the free memory is refused with ``SampleCacheTooLarge`` (a
            ValueError) when the data set is made.

    Each item is a dict:
        ``image (3 h w)`` float32 normalised; ``input_ids (l)`` long; ``attention_mask (l)``
        long (1 = real token); ``mask (h w)`` float32 0/1; ``orig_mask (H W)`` bool;
        ``orig_size (2)`` long ``(H, W)``; ``sentence`` str; ``ref_id``, ``ann_id``,
        ``sent_id``, ``image_id`` int; ``file_name`` str; ``no_target`` bool (True when the
        sentence refers to nothing in the image; then ``mask`` and ``orig_mask`` are empty;
        always False for RefCOCO / RefCOCO+ / G-Ref).
        gRefCOCO items also carry ``ann_ids`` (list of int, empty for no target) and
        ``num_targets`` int; their ``ann_id`` is the first target's id, -1 for no target, and
        their mask is the union of every target's mask (crowd annotations skipped, as ReLA).
    """

    def __init__(
        self,
        root: PathLike,
        dataset: str,
        split_by: str,
        split: str,
        *,
        tokenizer: Optional[Tokenizer] = None,
        img_size: int = 480,
        max_length: Optional[int] = None,
        augment: bool = False,
        cache: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASET_SPLITS:
            raise ValueError(
                f"unknown dataset {dataset!r}; expected one of {list(DATASET_SPLITS)}"
            )
        if split_by not in DATASET_SPLITS[dataset]:
            raise ValueError(
                f"unknown split_by {split_by!r} for {dataset}; expected one of "
                f"{list(DATASET_SPLITS[dataset])}"
            )
        expected_splits = DATASET_SPLITS[dataset][split_by]
        if split not in expected_splits:
            raise ValueError(
                f"unknown split {split!r} for {dataset} ({split_by}); expected one of "
                f"{list(expected_splits)}"
            )
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        if max_length is None:
            max_length = DEFAULT_MAX_LENGTH[dataset]
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(
                "tokenizer must be a callable (list[str], max_length) -> (input_ids, "
                f"attention_mask), got {type(tokenizer).__name__}"
            )
        if not isinstance(augment, bool):
            raise TypeError(f"augment must be a bool, got {type(augment).__name__}")
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {type(cache).__name__}")

        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.split = split
        self.tokenizer = tokenizer
        self.img_size = img_size
        self.max_length = max_length
        self.augment = augment
        self.cache = cache
        # image_id -> (3 S S) image; ref_id -> ((H W) bool mask, (S S) mask); sentence -> ids, mask
        self._image_cache: dict[int, torch.Tensor] = {}
        self._mask_cache: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        self._token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: With a seed (``set_augment_seed``), the flip of sample i is a pure function of
        #: (seed, i): the same in every loader worker and in a resumed run. None: torch's RNG.
        self.augment_seed: Optional[int] = None

        self.generalized = dataset in GENERALIZED_DATASETS
        if self.generalized:
            layout = (
                f"expected {dataset}/ (with grefs(<split_by>).json or .p and instances.json) and "
                "images/train2014/ (or images/mscoco/images/train2014/); see docs/data.md"
            )
            refs_names = [f"grefs({s}).{ext}" for s in DATASET_SPLITS[dataset] for ext in ("p", "json")]
        else:
            layout = (
                "expected refcoco/, refcoco+/, refcocog/ (each with refs(<split_by>).p and "
                "instances.json) and images/mscoco/images/train2014/; see docs/data.md"
            )
            refs_names = [f"refs({s}).p" for s in DATASET_SPLITS[dataset]]
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root not found: {self.root} ({layout})")
        self.data_dir = self.root / dataset
        if not self.data_dir.is_dir():
            present = sorted(d for d in DATASET_SPLITS if (self.root / d).is_dir())
            raise FileNotFoundError(
                f"data set folder not found: {self.data_dir}; folders present in {self.root}: "
                f"{present or 'none'} ({layout})"
            )
        if self.generalized:
            # ReLA's grefer.py reads the pickle when there is one, else the JSON.
            pickled = self.data_dir / f"grefs({split_by}).p"
            self.refs_file = pickled if pickled.is_file() else self.data_dir / f"grefs({split_by}).json"
        else:
            self.refs_file = self.data_dir / f"refs({split_by}).p"
        if not self.refs_file.is_file():
            present = sorted(n for n in refs_names if (self.data_dir / n).is_file())
            wanted = [f"grefs({split_by}).json", f"grefs({split_by}).p"] if self.generalized else refs_names
            raise FileNotFoundError(
                f"refs file not found: {self.refs_file}; expected {wanted} in {self.data_dir}, "
                f"found {present or 'none'}"
            )
        self.instances_file = self.data_dir / "instances.json"
        if not self.instances_file.is_file():
            raise FileNotFoundError(
                f"annotation file not found: {self.instances_file} (the COCO instances of "
                f"{dataset}, shipped with its refs files)"
            )
        image_dirs = [self.root / d for d in (_GREF_IMAGE_SUBDIRS if self.generalized else (IMAGE_SUBDIR,))]
        found = [d for d in image_dirs if d.is_dir()]
        if not found:
            raise FileNotFoundError(
                f"image folder not found: {' or '.join(str(d) for d in image_dirs)} (expected the "
                "COCO train2014 images, e.g. COCO_train2014_000000000009.jpg)"
            )
        self.image_dir = found[0]

        all_refs = load_refs_json(self.refs_file) if self.refs_file.suffix == ".json" else load_refs(self.refs_file)
        refs = [r for r in all_refs if r["split"] == split]
        if not refs:
            counts: dict[str, int] = {}
            for r in all_refs:
                counts[str(r["split"])] = counts.get(str(r["split"]), 0) + 1
            raise ValueError(
                f"split {split!r} of {dataset} ({split_by}) is empty: {self.refs_file} has no "
                f"refs with split {split!r}; refs per split in the file: {counts or 'none'}"
            )

        instances = read_instances(self.instances_file)
        # ann ids per ref: one for the classic sets, any number (none = no target) for gRefCOCO.
        if self.generalized:
            self._ref_anns: dict[int, list[int]] = {
                int(r["ref_id"]): target_ann_ids(r["ann_id"], where=f"{self.refs_file.name}: ref {r['ref_id']}")
                for r in refs
            }
        else:
            self._ref_anns = {int(r["ref_id"]): [int(r["ann_id"])] for r in refs}
        need_anns = {a for ids in self._ref_anns.values() for a in ids}
        need_imgs = {int(r["image_id"]) for r in refs}
        # Keep only what this split uses: the full G-Ref instances are large and every
        # DataLoader worker holds a copy.
        self.anns: dict[int, dict] = {
            int(a["id"]): a for a in instances["annotations"] if int(a["id"]) in need_anns
        }
        self.images: dict[int, dict] = {
            int(im["id"]): im for im in instances["images"] if int(im["id"]) in need_imgs
        }
        del instances
        problems: list[str] = []
        seen: set[int] = set()
        for r in refs:
            problems += self._ref_link_problems(r)
            if int(r["ref_id"]) in seen:
                problems.append(f"{self.refs_file}: ref {r['ref_id']} appears twice")
            seen.add(int(r["ref_id"]))
        if problems:
            more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise ValueError(
                f"{len(problems)} problem(s) in split {split!r} of {dataset} ({split_by}):\n  "
                + "\n  ".join(problems[:5]) + more
                + (
                    "" if self.generalized else f"\n(run 'vlaligner check-data {self.root} --dataset {dataset} "
                    f"--split-by {split_by}' to list every problem of the folder)"
                )
            )
        if self.generalized:
            # Crowd annotations are not part of the target (ReLA's loader skips them); a ref
            # left with nothing but crowd regions would be neither a target nor a no-target.
            for ref_id, ids in self._ref_anns.items():
                kept = [a for a in ids if not self.anns[a].get("iscrowd", 0)]
                if ids and not kept:
                    raise ValueError(
                        f"{self.refs_file.name}: ref {ref_id} refers only to crowd annotations "
                        f"{ids}; a target ref needs at least one non-crowd object (ann_id [-1] "
                        "marks a no-target ref)"
                    )
                self._ref_anns[ref_id] = kept

        self.refs: dict[int, dict] = {int(r["ref_id"]): r for r in refs}
        self.samples: list[RefSample] = []
        empty: list[tuple[int, int]] = []
        for r in refs:
            for sent in r["sentences"]:
                # LAVT tokenises the raw sentence; the tokenizer lower-cases as it needs.
                text = sentence_text(sent)
                if not text:
                    empty.append((int(r["ref_id"]), int(sent["sent_id"])))
                    continue
                self.samples.append(RefSample(int(r["ref_id"]), int(sent["sent_id"]), text))
        #: (ref_id, sent_id) of the empty sentences that were skipped.
        self.skipped_sentences: list[tuple[int, int]] = empty
        if empty:
            shown = ", ".join(f"ref {a} sentence {b}" for a, b in empty[:5])
            warnings.warn(
                f"{self.refs_file}: skipped {len(empty)} empty sentence(s) of split {split!r} "
                f"({shown}{', ...' if len(empty) > 5 else ''})",
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(
                f"split {split!r} of {dataset} ({split_by}) in {self.refs_file} has {len(refs)} refs "
                f"but no non-empty sentences ({len(empty)} empty)"
            )
        if cache:
            self._check_cache_fits()

    def cache_bytes(self) -> int:
        """Bytes the sample cache of this split holds once every sample has been read.

        With ``augment`` the flipped sentences count too (their tokens are kept as well).
        """
        sizes = [(self.images[int(r["image_id"])]["height"], self.images[int(r["image_id"])]["width"])
                 for r in self.refs.values()]
        texts = len({s.sentence for s in self.samples}) * (2 if self.augment else 1)
        return sample_cache_bytes(len(self.images), self.img_size, sizes, texts, self.max_length)

    def _check_cache_fits(self) -> None:
        """Refuse ``cache=True`` when the full cache would take over half the free memory."""
        need = self.cache_bytes()
        free = available_memory_bytes()
        if free is not None and need > CACHE_MEMORY_FRACTION * free:
            raise SampleCacheTooLarge(
                f"cache=True would keep about {format_bytes(need)} of samples of split {self.split!r} "
                f"({len(self.images)} images of 3 x {self.img_size} x {self.img_size} float32 and "
                f"{len(self.refs)} masks), more than {CACHE_MEMORY_FRACTION:.0%} of the "
                f"{format_bytes(free)} free; the cache is for small sets: turn it off"
            )

    def _ref_link_problems(self, ref: dict) -> list[str]:
        """What is wrong with the annotation and image a ref points to (names file and ids)."""
        ref_id, image_id = int(ref["ref_id"]), int(ref["image_id"])
        sent_ids = [int(s["sent_id"]) for s in ref["sentences"]]
        name = f"ref {ref_id} (sentences {sent_ids[:4]}{'...' if len(sent_ids) > 4 else ''})"
        problems = []
        for ann_id in self._ref_anns[ref_id]:
            ann = self.anns.get(ann_id)
            if ann is None:
                problems.append(
                    f"{self.refs_file}: {name} points to annotation {ann_id}, which "
                    f"{self.instances_file} does not have"
                )
                continue
            problems += [
                f"{self.instances_file}: annotation {ann_id} (of {name}) {p}"
                for p in annotation_problems(ann, drop_invalid_polygons=self.generalized)
            ]
            if "image_id" in ann and _as_id(ann["image_id"]) not in (None, image_id):
                problems.append(
                    f"{self.instances_file}: annotation {ann_id} is on image {ann['image_id']}, but "
                    f"{self.refs_file} says {name} is on image {image_id}"
                )
        info = self.images.get(image_id)
        if info is None:
            problems.append(
                f"{self.refs_file}: {name} points to image {image_id}, which "
                f"{self.instances_file} does not have"
            )
        else:
            problems += [
                f"{self.instances_file}: image {image_id} (of {name}) {p}"
                for p in image_entry_problems(info, self.image_dir)
            ]
        return problems

    def set_augment_seed(self, seed: Optional[int]) -> None:
        """Make the random flips a function of ``(seed, index)`` (a trainer sets one per epoch)."""
        self.augment_seed = None if seed is None else int(seed)

    def _flips(self, index: int) -> bool:
        """Whether sample ``index`` is flipped (probability 0.5)."""
        if self.augment_seed is None:
            return bool(torch.rand(()) < 0.5)
        generator = torch.Generator().manual_seed((self.augment_seed * 1_000_003 + int(index)) % (2**63))
        return bool(torch.rand((), generator=generator) < 0.5)

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dataset={self.dataset!r}, split_by={self.split_by!r}, "
            f"split={self.split!r}, sentences={len(self.samples)}, refs={len(self.refs)}, "
            f"images={len(self.images)}, img_size={self.img_size}, max_length={self.max_length}, "
            f"augment={self.augment}, root={str(self.root)!r})"
        )

    def image_path(self, index: int) -> Path:
        """Path of the image of sample ``index``."""
        ref = self.refs[self.samples[index].ref_id]
        return self.image_dir / self.images[int(ref["image_id"])]["file_name"]

    def ref_ann_ids(self, ref_id: int) -> list[int]:
        """The annotation ids ref ``ref_id`` refers to (empty for a no-target ref)."""
        return list(self._ref_anns[int(ref_id)])

    def ref_mask(self, ref_id: int) -> np.ndarray:
        """``(H W)`` bool mask of a ref at the original image size.

        The union of its polygons; for gRefCOCO the union over every referred object, all
        False for a no-target ref.
        """
        ref = self.refs[int(ref_id)]
        img = self.images[int(ref["image_id"])]
        height, width = int(img["height"]), int(img["width"])
        mask = np.zeros((height, width), dtype=bool)
        for a in self._ref_anns[int(ref_id)]:
            segmentation = self.anns[a]["segmentation"]
            if self.generalized and isinstance(segmentation, list):
                # ReLA's loader drops invalid polygons (fewer than 3 points, odd length).
                segmentation = [p for p in segmentation if len(p) % 2 == 0 and len(p) >= 6]
            mask |= decode_segmentation(segmentation, height, width)
        return mask

    # ------------------------------------------------------------------ samples
    def _tokenize(self, sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer([sentence], self.max_length)  # type: ignore[misc]
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                "tokenizer must return (input_ids (b l), attention_mask (b l)), got "
                f"{type(out).__name__}"
            )
        ids, att = (torch.as_tensor(t) for t in out)
        if ids.ndim != 2 or ids.shape[0] != 1 or att.shape != ids.shape:
            raise ValueError(
                "tokenizer must return input_ids and attention_mask of shape (1 l) for one "
                f"sentence, got {tuple(ids.shape)} and {tuple(att.shape)}"
            )
        return ids[0].to(torch.long), att[0].to(torch.long)

    def _kept(self, store: dict, key: Any, make: Callable[[], Any]) -> Any:
        """``store[key]`` if kept, else ``make()`` (kept in ``store`` when ``cache``)."""
        if key in store:
            return store[key]
        value = make()
        if self.cache:
            store[key] = value
        return value

    def _load_image_tensor(self, info: dict) -> torch.Tensor:
        """``(3 S S)`` preprocessed image of the ``instances.json`` entry ``info``."""
        path = self.image_dir / info["file_name"]
        image = load_image(path)
        height, width = int(info["height"]), int(info["width"])
        if image.size != (width, height):
            raise ValueError(
                f"image {path} is {image.size[0]}x{image.size[1]} (w x h) but "
                f"{self.instances_file.name} says {width}x{height}; the annotations would not "
                "line up"
            )
        return preprocess_image(image, self.img_size)

    def _ref_masks(self, ref_id: int) -> tuple[np.ndarray, torch.Tensor]:
        """``(H W)`` bool mask at the original size and ``(S S)`` resized mask of a ref."""
        orig_np = self.ref_mask(ref_id)
        return orig_np, resize_mask(orig_np, self.img_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref_id, sent_id, sentence = self.samples[index]
        ref = self.refs[ref_id]
        info = self.images[int(ref["image_id"])]
        height, width = int(info["height"]), int(info["width"])
        img_t = self._kept(self._image_cache, int(ref["image_id"]), lambda: self._load_image_tensor(info))
        orig_np, mask_t = self._kept(self._mask_cache, ref_id, lambda: self._ref_masks(ref_id))
        if self.cache:  # the caller owns what it gets: never a view of the cache
            img_t, mask_t, orig_np = img_t.clone(), mask_t.clone(), orig_np.copy()
        ann_ids = self._ref_anns[ref_id]
        orig = torch.from_numpy(orig_np)
        if self.augment and self._flips(index):
            # Flip everything together: the sentence's left becomes right.
            img_t, mask_t, sentence = hflip_sample(img_t, mask_t, sentence)
            orig = orig.flip(-1)
        sample: dict[str, Any] = {"image": img_t}
        if self.tokenizer is not None:
            ids, att = self._kept(self._token_cache, sentence, lambda: self._tokenize(sentence))
            sample["input_ids"], sample["attention_mask"] = (ids.clone(), att.clone()) if self.cache else (ids, att)
        sample.update(
            mask=mask_t.to(torch.float32),
            orig_mask=orig,
            orig_size=torch.tensor([height, width], dtype=torch.long),
            sentence=sentence,
            ref_id=int(ref_id),
            ann_id=int(ann_ids[0]) if ann_ids else -1,
            sent_id=int(sent_id),
            image_id=int(ref["image_id"]),
            file_name=str(info["file_name"]),
            no_target=not ann_ids,
        )
        if self.generalized:
            sample.update(ann_ids=list(ann_ids), num_targets=len(ann_ids))
        return sample
