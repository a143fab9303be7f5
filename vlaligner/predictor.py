"""A numpy / PIL in, numpy out facade over a trained EAVL model: one image and one or more
sentences in, a mask per sentence out at the image's own size.

Axes: b batch (sentences for one image), n queries, l words (tokens), c channels,
h w the model's mask grid (a quarter of the input side), H W the original image,
S the model's square input side (``model.img_size``).

Torch stays inside: the image is read and converted at the edge (numpy / PIL), resized
for the model with the data set's own preprocessing (``vlaligner.data.preprocess_image``,
a plain resize without keeping the aspect ratio, then ImageNet normalisation), and the
logits are mapped back to the original size as the evaluation does (bilinear on logits to
the input size, then to the original size, then sigmoid), so the probabilities line up
pixel for pixel with the image the user gave and the masks are those the metrics measure.

This module imports numpy and PIL at module level; ``vlaligner`` imports it lazily, so the
torch-only core never needs them.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "Prediction",
    "Predictor",
    "CHECKPOINT_FILES",
    "as_rgb_array",
    "check_sentences",
    "check_checkpoint_dir",
    "resolve_device",
    "resolve_dtype",
    "logits_to_probability",
]

#: Files that ``EAVL.save_pretrained`` writes and ``Predictor.from_pretrained`` needs.
CHECKPOINT_FILES: Tuple[str, ...] = ("model.safetensors", "config.json")

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

# Sentences are run through the model in chunks of this many: the image is shared, so the
# cost is the per-sentence fusion and mask head; the chunk bounds peak memory for long lists.
_SENTENCE_CHUNK = 16

_NO_QUERIES = (
    "this model has no per-query masks or word attention (a fixed-kernel head); "
    "call predict without return_queries"
)

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class Prediction:
    """The model's answer for one sentence, at the original image size.

    Fields (numpy, on the CPU):
        sentence: the sentence as given.
        mask: (H W) bool, ``probability > threshold``.
        probability: (H W) float32 in [0, 1], sigmoid of the bilinearly resized logits.
        query_masks: (n H W) float32 probabilities of each query's own mask (before the
            score-weighted sum; the paper's Fig. 4), or None unless ``return_queries``.
        query_scores: (n,) float32 weights of the queries (softmax over n, they sum to one),
            or None.
        word_attention: (n l) float32, each query's attention over the sentence's tokens
            (padding removed, so l == len(tokens)), or None.
        tokens: the l token strings the attention is over (special tokens included), or None.
        threshold: the probability threshold that made ``mask``.
        no_target: True when the model (one with a no-target head, for generalized
            referring segmentation) says the sentence refers to nothing in the image; then
            ``mask`` is all False (``probability`` is still the mask head's map). False when
            it found a target; None for a model without a no-target head.
        no_target_probability: the model's probability that nothing is referred to, or None.
    """

    sentence: str
    mask: np.ndarray
    probability: np.ndarray
    query_masks: Optional[np.ndarray] = None
    query_scores: Optional[np.ndarray] = None
    word_attention: Optional[np.ndarray] = None
    tokens: Optional[List[str]] = None
    threshold: float = 0.5
    no_target: Optional[bool] = None
    no_target_probability: Optional[float] = None

    @property
    def size(self) -> Tuple[int, int]:
        """(H, W) of the original image."""
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def num_queries(self) -> Optional[int]:
        """n, when the per-query outputs were requested."""
        return None if self.query_masks is None else int(self.query_masks.shape[0])


# --------------------------------------------------------------------------------------
# Pure helpers at the numpy / PIL edge
# --------------------------------------------------------------------------------------


def _read_image_file(path: Path, exif_transpose: bool) -> Image.Image:
    """Open an image file with the data set's reader (``vlaligner.data.load_image``).

    Raises FileNotFoundError / ValueError naming the path (missing, a folder, corrupt,
    truncated, a decompression bomb). With ``exif_transpose`` the EXIF orientation is
    applied, so that a phone photo is segmented upright, as a viewer shows it.
    """
    from vlaligner.data.transforms import load_image

    return load_image(path, exif_transpose=exif_transpose)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """(H W 3) uint8 from a PIL image of any mode (``vlaligner.data.transforms.pil_to_rgb``)."""
    from vlaligner.data.transforms import pil_to_rgb

    return np.asarray(pil_to_rgb(img), dtype=np.uint8).copy()


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H W 3) uint8 from a uint8 array (H W), (H W 1), (H W 3) or (H W 4)."""
    expected = "(H W 3) uint8 RGB, or greyscale (H W) / (H W 1), or RGBA (H W 4)"
    if arr.dtype != np.uint8:
        hint = ""
        if np.issubdtype(arr.dtype, np.floating):
            hint = " (for floats in [0, 1] use (image * 255).round().astype(np.uint8))"
        raise TypeError(f"image array must have dtype uint8, got dtype {arr.dtype}{hint}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image array must have shape {expected}, got shape {arr.shape}; it looks "
            f"channels-first, use image.transpose(1, 2, 0)"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must have shape {expected}, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image array must not be empty, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:  # RGBA: composited on white, as an RGBA file
        return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    return np.ascontiguousarray(arr)


def as_rgb_array(image: ImageLike, *, exif_transpose: bool = True) -> np.ndarray:
    """Turn a path, a PIL image or a uint8 array into an (H W 3) uint8 RGB array.

    The result is the picture a viewer shows (``vlaligner.data.transforms.pil_to_rgb``):
    greyscale repeated over the three channels, palettes expanded, alpha composited on
    white, 16-bit and float greyscale scaled to 8 bits (not clipped). With
    ``exif_transpose`` (the default) the EXIF orientation of a file or PIL image is applied
    (a phone photo comes out upright); ``False`` keeps the stored pixel grid, as the data
    loaders do.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a path that is not a readable image, or an array of the wrong shape.
        TypeError: an array that is not uint8, or an unsupported type.
    """
    if not isinstance(exif_transpose, bool):
        raise TypeError(f"exif_transpose must be a bool, got {type(exif_transpose).__name__}")
    if isinstance(image, (str, os.PathLike)):
        if isinstance(image, str) and not image.strip():
            raise ValueError("image path is empty")
        return _pil_to_rgb(_read_image_file(Path(image), exif_transpose))
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image must not be empty, got size {image.size}")
        if exif_transpose:
            from PIL import ImageOps

            try:
                image = ImageOps.exif_transpose(image)
            except Exception as err:  # noqa: BLE001 - PIL raises many types for malformed EXIF
                raise ValueError(
                    f"the image's EXIF orientation is unreadable ({type(err).__name__}: {err}); "
                    "pass exif_transpose=False"
                ) from None
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, torch.Tensor):
        raise TypeError(
            "image must be a path, a PIL.Image or an (H W 3) uint8 numpy array, got a "
            "torch.Tensor; pass tensor.permute(1, 2, 0).cpu().numpy() as uint8, or call the "
            "model directly for tensors"
        )
    raise TypeError(
        f"image must be a path (str / pathlib.Path), a PIL.Image or an (H W 3) uint8 numpy "
        f"array, got {type(image).__name__}"
    )


def check_sentences(text: Union[str, Sequence[str]]) -> Tuple[List[str], bool]:
    """Validate ``text``; return (sentences, was_single).

    Raises:
        TypeError: not a str or a list / tuple of str.
        ValueError: an empty list, or an empty / whitespace-only sentence.
    """
    if isinstance(text, str):
        sentences, single = [text], True
    elif isinstance(text, (list, tuple)):
        sentences, single = list(text), False
        if not sentences:
            raise ValueError("text must be a sentence or a non-empty list of sentences, got []")
    else:
        raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(
                f"text[{i}] must be a str, got {type(sentence).__name__} ({sentence!r})"
            )
        if not sentence.strip():
            where = "text" if single else f"text[{i}]"
            raise ValueError(
                f"{where} is an empty sentence ({sentence!r}); give the words that describe "
                f"the object to segment, e.g. 'the dog on the left'"
            )
    return sentences, single


def check_checkpoint_dir(path: Union[str, os.PathLike]) -> Path:
    """Check that ``path`` is a directory written by ``EAVL.save_pretrained``.

    Raises:
        FileNotFoundError: the directory is missing, or lacks model.safetensors / config.json.
    """
    directory = Path(path)
    hint = "expected a directory written by EAVL.save_pretrained (model.safetensors + config.json)"
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {str(directory)!r}; {hint}")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint must be a directory, got the file {str(directory)!r}; {hint}; "
            f"pass its parent directory if the file is model.safetensors"
        )
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        pickles = sorted(
            p.name for p in directory.iterdir() if p.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt")
        )
        extra = (
            f" (it holds {', '.join(pickles)}: a training checkpoint or another library's "
            f"weights; load that model and call save_pretrained to make a checkpoint directory)"
            if pickles
            else ""
        )
        raise FileNotFoundError(
            f"checkpoint directory {str(directory)!r} is missing {', '.join(missing)}{extra}; {hint}"
        )
    return directory


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'mps', 'auto' (CUDA when available) or a torch.device.

    Raises:
        ValueError: an unknown name, or an accelerator that this machine does not have.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but CUDA is not available on this machine "
                f"(torch.cuda.is_available() is False); use device 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} was requested but MPS is not available")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The compute dtype: None / 'auto' is float32 on CPU, bfloat16 on CUDA when the card
    supports it (else float16). Weights stay float32; lower precision runs under autocast.

    Raises:
        ValueError: an unknown name, or float16 on a CPU (slow and poorly supported there).
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise ValueError(
                f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'"
            )
        resolved = _DTYPE_NAMES[dtype.lower()]
    elif isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        raise TypeError(f"dtype must be a str or torch.dtype, got {type(dtype).__name__}")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {resolved}")
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError("dtype float16 needs a GPU; on the CPU use 'bfloat16' or 'float32'")
    return resolved


def logits_to_probability(
    logits: torch.Tensor, size: Tuple[int, int], *, input_size: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """Map mask logits to probabilities at another size.

    Args:
        logits: (b c h w) logits on the model's grid.
        size: (H, W) target size (the original image).
        input_size: (S, S) the model's input size; when given, the logits are first
            upsampled to it and then resized to ``size``, the two steps of the evaluation
            (spec section 5: "upsampled to the input size, then mapped back to the original
            image size"; ``vlaligner.engine.predict_masks`` does the same), so the
            predictor's masks are the ones the metrics were computed on.

    Returns:
        (b c H W) float32 probabilities: bilinear resize of the logits, then sigmoid
        (resizing logits rather than probabilities keeps the 0.5 boundary where the model
        put it instead of blurring it towards 0.5).
    """
    logits = logits.float()
    for step in (input_size, size):
        if step is not None and tuple(logits.shape[-2:]) != tuple(step):
            logits = F.interpolate(logits, size=tuple(step), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)


def _check_threshold(threshold: float, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(threshold).__name__}")
    if not (0.0 <= float(threshold) <= 1.0) or math.isnan(threshold):
        raise ValueError(f"{name} must be in [0, 1], got {threshold}")
    return float(threshold)


# --------------------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------------------


class Predictor:
    """Segment the object a sentence refers to, on any image, with a trained EAVL model.

    Example::

        predictor = Predictor.from_pretrained("runs/demo/best")
        pred = predictor.predict("photo.jpg", "the dog on the left")
        pred.mask            # (H W) bool at the photo's size
        preds = predictor.predict(image, ["the dog", "the red ball"], return_queries=True)
        preds[1].query_scores, preds[1].word_attention, preds[1].tokens

    Args:
        model: an ``vlaligner.models.EAVL`` (or anything with ``img_size``, ``tokenize`` and
            the same ``forward``); it is put in eval mode and moved to ``device``.
        device: 'cpu', 'cuda', 'cuda:N', 'auto' or a torch.device.
        dtype: compute dtype, None / 'auto' (float32 on CPU, bfloat16 / float16 on CUDA),
            'float32', 'bfloat16' or 'float16'; lower precision runs under autocast.
        threshold: probability above which a pixel is in ``Prediction.mask``.
        no_target_threshold: no-target probability above which a model with a no-target
            head answers "no target" (an empty mask); default 0.5.
        exif_transpose: apply the EXIF orientation of image files and PIL images (default
            True: a phone photo is segmented upright, as a viewer shows it, and the mask is
            in that upright grid); False keeps the stored pixel grid, as the data loaders.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: Union[str, torch.device, None] = "cpu",
        dtype: Union[str, torch.dtype, None] = None,
        threshold: float = 0.5,
        no_target_threshold: float = 0.5,
        exif_transpose: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (EAVL), got {type(model).__name__}")
        for attr in ("img_size", "tokenize"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model must provide .{attr} like vlaligner.models.EAVL; "
                    f"{type(model).__name__} does not"
                )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.threshold = _check_threshold(threshold)
        self.no_target_threshold = _check_threshold(no_target_threshold, "no_target_threshold")
        if not isinstance(exif_transpose, bool):
            raise TypeError(f"exif_transpose must be a bool, got {type(exif_transpose).__name__}")
        self.exif_transpose = exif_transpose
        self.model = model.eval().to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        device: Union[str, torch.device, None] = "cpu",
        dtype: Union[str, torch.dtype, None] = None,
        threshold: float = 0.5,
        no_target_threshold: float = 0.5,
        exif_transpose: bool = True,
    ) -> "Predictor":
        """Load a model saved with ``EAVL.save_pretrained(path)`` and wrap it.

        The folder goes through ``EAVL.from_pretrained``: the recorded SHA-256 of the weights
        is checked, the files' structure too, and nothing is downloaded.

        Raises:
            FileNotFoundError: ``path`` is missing or lacks model.safetensors / config.json.
            ValueError: a damaged folder (truncated config.json, missing or mismatching
                hash, unreadable weights, unknown builder or backbone); names the file.
            ImportError: the models extra (timm, transformers, safetensors) is not installed.
        """
        directory = check_checkpoint_dir(path)
        # Check device / dtype / threshold before the (slow) load so that a typo fails at once.
        resolved = resolve_device(device)
        resolve_dtype(dtype, resolved)
        _check_threshold(threshold)
        _check_threshold(no_target_threshold, "no_target_threshold")
        if not isinstance(exif_transpose, bool):
            raise TypeError(f"exif_transpose must be a bool, got {type(exif_transpose).__name__}")
        try:
            from vlaligner.models import EAVL
        except ImportError as err:
            raise ImportError(
                f"loading a checkpoint needs the models extra: pip install 'vlaligner[models]' "
                f"({err})"
            ) from err
        model = EAVL.from_pretrained(directory, map_location="cpu")
        return cls(
            model, device=resolved, dtype=dtype, threshold=threshold, no_target_threshold=no_target_threshold,
            exif_transpose=exif_transpose,
        )

    # ----------------------------------------------------------------------------------

    @property
    def img_size(self) -> int:
        """S, the square side the model sees."""
        return int(self.model.img_size)

    @property
    def has_no_target_head(self) -> bool:
        """Whether the model can answer "no target" (a generalized, gRefCOCO-style model)."""
        return getattr(self.model, "no_target_head", None) is not None

    @property
    def has_queries(self) -> bool:
        """Whether the model makes per-query masks (False for the fixed-kernel baseline)."""
        from vlaligner.aligner import FixedKernelHead

        return not isinstance(getattr(self.model, "head", None), FixedKernelHead)

    def _autocast(self) -> ContextManager[Any]:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def preprocess(self, image: ImageLike) -> Tuple[np.ndarray, torch.Tensor]:
        """Read ``image`` and prepare it for the model.

        Returns:
            rgb: (H W 3) uint8, the original image as RGB.
            pixels: (3 S S) float32, resized and normalised like the training data.
        """
        rgb = as_rgb_array(image, exif_transpose=self.exif_transpose)
        from vlaligner.data import preprocess_image

        pixels = preprocess_image(rgb, self.img_size)
        return rgb, pixels

    def _token_strings(self, ids: Sequence[int]) -> List[str]:
        """Token strings for ``ids``, from whichever tokenizer the model carries."""
        ids = [int(i) for i in ids]
        for owner in (self.model, getattr(self.model, "tokenizer", None)):
            convert = getattr(owner, "convert_ids_to_tokens", None)
            if callable(convert):
                return [str(t) for t in convert(ids)]
        decode = getattr(getattr(self.model, "tokenizer", None), "decode", None)
        if callable(decode):
            return [str(decode([i])) for i in ids]
        return [str(i) for i in ids]

    @torch.inference_mode()
    def _encode_once(self, pixels: torch.Tensor) -> Optional[Any]:
        """Encode the image a single time when the model can reuse it (``EAVL.encode_image``)."""
        encode = getattr(self.model, "encode_image", None)
        if not callable(encode) or not callable(getattr(self.model, "forward_features", None)):
            return None
        with self._autocast():
            return encode(pixels.to(self.device, torch.float32).unsqueeze(0))

    @torch.inference_mode()
    def _run(
        self,
        pixels: torch.Tensor,
        sentences: List[str],
        size: Tuple[int, int],
        return_queries: bool,
        image_features: Optional[Any] = None,
    ) -> List[Prediction]:
        input_ids, attention_mask = self.model.tokenize(sentences)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        b = len(sentences)
        # One image, b sentences: the same pixels for every row, expanded without a copy.
        images = pixels.to(self.device, torch.float32).unsqueeze(0).expand(b, -1, -1, -1)
        with self._autocast():
            if image_features is not None:  # the image was encoded once for all sentences
                out = self.model.forward_features(
                    image_features.expand(b),
                    input_ids,
                    attention_mask,
                    return_query_masks=return_queries,
                    return_word_attention=return_queries,
                )
            else:
                out = self.model(
                    images,
                    input_ids,
                    attention_mask,
                    return_query_masks=return_queries,
                    return_word_attention=return_queries,
                )
        input_size = tuple(images.shape[-2:])
        probability = logits_to_probability(out.logits, size, input_size=input_size)[:, 0]  # (b H W)
        if return_queries and (out.query_masks is None or out.word_attention is None):
            raise ValueError(_NO_QUERIES)
        nt_logits = getattr(out, "no_target_logits", None)
        nt_prob = None if nt_logits is None else torch.sigmoid(nt_logits.float()).cpu().numpy()

        results = []
        for i, sentence in enumerate(sentences):
            prob = probability[i].cpu().numpy().astype(np.float32, copy=False)
            pred = Prediction(
                sentence=sentence,
                mask=prob > self.threshold,
                probability=prob,
                threshold=self.threshold,
            )
            if nt_prob is not None:
                pred.no_target_probability = float(nt_prob[i])
                pred.no_target = bool(nt_prob[i] > self.no_target_threshold)
                if pred.no_target:  # "nothing is referred to": an empty mask
                    pred.mask = np.zeros_like(pred.mask)
            if return_queries:
                # Per sentence so that only (n H W) is ever held at the original size.
                pred.query_masks = (
                    logits_to_probability(out.query_masks[i : i + 1], size, input_size=input_size)[0]
                    .cpu()
                    .numpy()
                )
                if out.query_scores is not None:
                    pred.query_scores = out.query_scores[i].float().cpu().numpy()
                real = attention_mask[i].bool()
                pred.word_attention = out.word_attention[i][:, real].float().cpu().numpy()
                pred.tokens = self._token_strings(input_ids[i][real].tolist())
            results.append(pred)
        return results

    def predict(
        self,
        image: ImageLike,
        text: Union[str, Sequence[str]],
        *,
        return_queries: bool = False,
    ) -> Union[Prediction, List[Prediction]]:
        """Segment what ``text`` refers to in ``image``.

        Args:
            image: a path, a PIL image, or an (H W 3) / (H W) / (H W 1) / (H W 4) uint8 array
                of any size.
            text: one sentence, or a list of sentences about the same image (batched; the
                image is read and preprocessed once).
            return_queries: also return each query's mask, score and word attention.

        Returns:
            One ``Prediction`` for a str, a list of them (same order) for a list.

        Raises:
            FileNotFoundError, ValueError, TypeError: see ``as_rgb_array`` and
            ``check_sentences``; the message names what was expected and what was received.
        """
        sentences, single = check_sentences(text)
        if return_queries and not self.has_queries:
            raise ValueError(_NO_QUERIES)
        rgb, pixels = self.preprocess(image)
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        image_features = self._encode_once(pixels)
        results: List[Prediction] = []
        for start in range(0, len(sentences), _SENTENCE_CHUNK):
            chunk = sentences[start : start + _SENTENCE_CHUNK]
            results.extend(self._run(pixels, chunk, size, bool(return_queries), image_features))
        return results[0] if single else results

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, img_size={self.img_size}, "
            f"device={str(self.device)!r}, dtype={str(self.dtype).replace('torch.', '')!r}, "
            f"threshold={self.threshold}, exif_transpose={self.exif_transpose}"
            + (f", no_target_threshold={self.no_target_threshold})" if self.has_no_target_head else ")")
        )
