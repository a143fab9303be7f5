"""Image and mask preprocessing shared by the data sets, the predictor and the synthetic set.

Axis legend: b batch, c channels (3 for RGB), h w space (input size), H W space (original
image size), l words.

Conventions (LAVT's, the host the paper's evaluation follows):
- images are resized to the model's input size with a *plain* resize: the aspect ratio is
  NOT kept (a 640 x 427 photo becomes 480 x 480), bilinear, then scaled to [0, 1] and
  normalised with the ImageNet mean and standard deviation;
- masks are resized with nearest neighbour by pixel centres (PIL's ``NEAREST`` rule, computed
  exactly);
- a left-right flip is only ever applied together with swapping the words "left" and
  "right" in the sentence, otherwise the augmented sample would teach the wrong answer.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_image",
    "pil_to_rgb",
    "preprocess_image",
    "resize_mask",
    "nearest_indices",
    "swap_left_right",
    "hflip_sample",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float64))).to(torch.float32).view(3, 1, 1)
_SHIFT = (-torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / torch.tensor(IMAGENET_STD, dtype=torch.float64)).to(
    torch.float32
).view(3, 1, 1)

ImageLike = Union[Image.Image, np.ndarray]
Size = Union[int, tuple[int, int]]


def _as_hw(size: Size, *, name: str = "size") -> tuple[int, int]:
    """(h, w) from an int (square) or a pair; rejects non-positive sizes."""
    if isinstance(size, bool):
        raise TypeError(f"{name} must be an int or a (h, w) pair of ints, got {size!r}")
    if isinstance(size, (int, np.integer)):
        hw = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size
    ):
        hw = (int(size[0]), int(size[1]))
    else:
        raise TypeError(f"{name} must be an int or a (h, w) pair of ints, got {size!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return hw


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _high_bit_to_grey(img: Image.Image) -> np.ndarray:
    """(H W) uint8 from a 16-bit, 32-bit integer or float greyscale image, scaled, never clipped.

    16-bit modes (and 32-bit integer images whose values fit in 0..65535, which is how PIL
    opens many 16-bit PNGs) are scaled by 255/65535, as a viewer shows them; a 16-bit copy of
    an 8-bit picture (``v * 257``) gives back exactly the 8-bit picture. Float images with
    values in [0, 1] are scaled by 255. Anything else (negative or larger values) is
    stretched from its minimum to its maximum.
    """
    arr = np.asarray(img, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if img.mode.startswith("I") and lo >= 0 and hi <= 65535:
        scaled = arr * (255.0 / 65535.0)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """The RGB picture a viewer shows for a PIL image of any mode.

    - ``RGB``: unchanged (a copy).
    - ``1``, ``L``, ``CMYK``, ``YCbCr``, ``HSV``, palette ``P`` without transparency: PIL's
      conversion (greyscale repeated over three channels, palette expanded).
    - alpha (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, ``P`` with a transparent colour):
      composited on white, as a viewer shows a transparent area (the colours stored under
      a fully transparent pixel are not shown).
    - 16-bit / 32-bit / float greyscale (``I;16``, ``I``, ``F``): scaled to 8 bits, not
      clipped (see :func:`_high_bit_to_grey`).

    Raises:
        ValueError: a mode PIL cannot convert to RGB (the message names it).
    """
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_high_bit_to_grey(img)).convert("RGB")
    try:
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            img.mode == "P" and "transparency" in img.info
        ):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert an image of mode {img.mode!r} to RGB: {err}") from err


def _exif_transpose(img: Image.Image, path: Path) -> Image.Image:
    """``ImageOps.exif_transpose``; a broken EXIF block raises ``ValueError`` naming the file."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for malformed EXIF
        raise ValueError(
            f"image file {path} has an unreadable EXIF orientation ({type(err).__name__}: {err}); "
            "read it without applying it (exif_transpose=False, --no-exif-transpose)"
        ) from None


def load_image(path: Union[str, os.PathLike], *, exif_transpose: bool = False) -> Image.Image:
    """Read an image file as the RGB PIL image a viewer shows (see :func:`pil_to_rgb`).

    By default the EXIF orientation is deliberately ignored: COCO's polygons are given in
    the stored pixel grid, so rotating the pixels would misalign every annotation (the data
    sets call it this way). The predictor passes ``exif_transpose=True`` to see a photo
    upright, as a viewer shows it.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: the file exists but cannot be decoded (corrupt, truncated, not an image,
            a folder, a decompression bomb over PIL's pixel limit); the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"expected an image file, got a directory: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            # load() forces the full decode so that truncated files fail here, naming the file,
            # instead of later inside a worker with a bare PIL message.
            img.load()
            if exif_transpose:
                img = _exif_transpose(img, path)
            return pil_to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"image file {path} is too large to decode safely (a decompression bomb?): {err}"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"corrupt or unreadable image file {path}: {err}") from err


def _to_rgb_pil(image: ImageLike) -> Image.Image:
    """RGB PIL image from a PIL image or a uint8 array (H W 3), (H W) or (H W 4)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(
                f"image array must be uint8 (values 0-255), got dtype {image.dtype}; "
                "convert with (x * 255).round().astype(np.uint8) if it holds [0, 1] floats"
            )
        if image.ndim == 2:
            return Image.fromarray(image).convert("RGB")
        if image.ndim == 3 and image.shape[2] in (1, 3, 4):
            if image.shape[2] == 1:
                return Image.fromarray(np.ascontiguousarray(image[:, :, 0])).convert("RGB")
            if image.shape[2] == 4:  # RGBA: composited on white, as for RGBA files
                return pil_to_rgb(Image.fromarray(np.ascontiguousarray(image)))
            return Image.fromarray(np.ascontiguousarray(image))
        raise ValueError(
            f"image array must have shape (H W 3), (H W 4) or (H W), got {tuple(image.shape)}"
        )
    raise TypeError(
        f"image must be a PIL.Image.Image or a numpy uint8 array, got {type(image).__name__}"
    )


def preprocess_image(image: ImageLike, size: Size) -> torch.Tensor:
    """Resize an image to the model's input size and normalise it with the ImageNet statistics.

    Plain (bilinear) resize to exactly ``size``: the aspect ratio is NOT kept, as in LAVT.

    Args:
        image: PIL image (any mode, see :func:`pil_to_rgb`) or numpy uint8 array
            ``(H W 3)``, ``(H W 4)`` (RGBA, composited on white) or ``(H W)`` (greyscale).
        size: ``int`` for a square ``(size, size)`` output, or ``(h, w)``.

    Returns:
        ``(3 h w)`` float32 tensor, ``(x / 255 - mean) / std``.
    """
    h, w = _as_hw(size)
    pil = _to_rgb_pil(image)
    if pil.size != (w, h):
        pil = pil.resize((w, h), resample=Image.BILINEAR)
    arr = np.array(pil, dtype=np.uint8)  # a writable copy (PIL's buffer is read-only)
    x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    # One multiply-add instead of /255, -mean, /std: the loader's hottest lines.
    return x.mul_(_SCALE).add_(_SHIFT)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel under nearest-neighbour resizing by pixel centres.

    ``floor((i + 0.5) * in_size / out_size)`` computed in integers, so it is exact at every
    size (PIL's NEAREST accumulates the coordinate in floating point and can land one pixel
    lower at exact ties; torch's "nearest-exact" rounds its scale).
    """
    return (2 * np.arange(out_size, dtype=np.int64) + 1) * in_size // (2 * out_size)


def resize_mask(mask: Union[np.ndarray, torch.Tensor, Image.Image], size: Size) -> torch.Tensor:
    """Resize a binary mask with nearest neighbour by pixel centres (see :func:`nearest_indices`).

    Args:
        mask: ``(H W)`` bool / integer / float array or tensor (non-zero = foreground), or a
            PIL image of mode "1" or "L".
        size: ``int`` (square) or ``(h, w)``.

    Returns:
        ``(h w)`` bool tensor on the input tensor's device (CPU for numpy / PIL input).
    """
    h, w = _as_hw(size)
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"mask must have shape (H W), got {tuple(mask.shape)}")
        fg_np = mask != 0
        # numpy fancy indexing is ~4x faster than torch.index_select here (CPU data loading).
        rows = nearest_indices(fg_np.shape[0], h)
        cols = nearest_indices(fg_np.shape[1], w)
        return torch.from_numpy(np.ascontiguousarray(fg_np[rows][:, cols]))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mask must be a numpy array, torch tensor or PIL image, got {type(mask).__name__}"
        )
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H W), got {tuple(mask.shape)}")
    fg = mask != 0
    H, W = fg.shape
    if (H, W) == (h, w):
        return fg.clone()
    rows = torch.from_numpy(nearest_indices(H, h)).to(fg.device)
    cols = torch.from_numpy(nearest_indices(W, w)).to(fg.device)
    return fg.index_select(0, rows).index_select(1, cols)


_LEFT_RIGHT = re.compile(r"\b(left|right)", flags=re.IGNORECASE)


def swap_left_right(sentence: str) -> str:
    """Swap "left" and "right" (also inside "leftmost", "right-hand", ...), keeping case.

    Used with every horizontal flip: the flipped image's left is the original right.
    Words that merely contain the letters ("bright", "upright") are left alone.
    """

    def _swap(match: re.Match) -> str:
        word = match.group(0)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        if word[0].isupper():
            return new.capitalize()
        return new

    return _LEFT_RIGHT.sub(_swap, sentence)


def hflip_sample(
    image: torch.Tensor, mask: torch.Tensor, sentence: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Flip an image and its mask left-right and swap "left"/"right" in the sentence.

    Args:
        image: ``(c h w)`` tensor.
        mask: ``(h w)`` tensor (or ``(H W)``: any 2-D mask, flipped on its last axis).
        sentence: the referring expression.

    Returns:
        ``(image (c h w), mask, sentence)`` flipped together.
    """
    if image.ndim != 3:
        raise ValueError(f"image must have shape (c h w), got {tuple(image.shape)}")
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (h w), got {tuple(mask.shape)}")
    return image.flip(-1), mask.flip(-1), swap_left_right(sentence)
