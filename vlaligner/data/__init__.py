"""Referring segmentation data: RefCOCO / RefCOCO+ / G-Ref / gRefCOCO from disk, transforms, a synthetic set.

Axis legend: b batch, c channels, h w space (model input), H W space (original image),
l words.

Needs the ``[data]`` extra (pillow; pycocotools for decoding polygons, imported where used).
"""
from __future__ import annotations

from typing import Any

from .cache import default_cache_dir, ensure_synthetic_set
from .check import DataCheckReport, DataProblem, check_data
from .collate import collate_ref_batch
from .layout import check_data_root
from .memory import SampleCacheTooLarge, available_memory_bytes, sample_cache_bytes
from .refer import (
    DATASET_SPLITS,
    DEFAULT_MAX_LENGTH,
    GENERALIZED_DATASETS,
    RefDataset,
    RefSample,
    UnsafePickleError,
    decode_segmentation,
    load_refs,
    load_refs_json,
    missing_data_files,
    target_ann_ids,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    hflip_sample,
    load_image,
    pil_to_rgb,
    preprocess_image,
    resize_mask,
    swap_left_right,
)

__all__ = [
    "RefDataset",
    "RefSample",
    "DATASET_SPLITS",
    "DEFAULT_MAX_LENGTH",
    "UnsafePickleError",
    "load_refs",
    "load_refs_json",
    "target_ann_ids",
    "missing_data_files",
    "GENERALIZED_DATASETS",
    "decode_segmentation",
    "collate_ref_batch",
    "check_data_root",
    "default_cache_dir",
    "ensure_synthetic_set",
    "generate_synthetic_refcoco",
    "generate_synthetic_grefcoco",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_image",
    "pil_to_rgb",
    "preprocess_image",
    "check_data",
    "DataCheckReport",
    "DataProblem",
    "resize_mask",
    "swap_left_right",
    "hflip_sample",
    "SampleCacheTooLarge",
    "sample_cache_bytes",
    "available_memory_bytes",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so that ``python -m vlaligner.data.synthetic`` does not find the module
    # already in sys.modules (runpy warns about that) when the package is imported first.
    if name == "generate_synthetic_refcoco":
        from .synthetic import generate_synthetic_refcoco

        return generate_synthetic_refcoco
    if name == "generate_synthetic_grefcoco":
        from .synthetic import generate_synthetic_grefcoco

        return generate_synthetic_grefcoco
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
