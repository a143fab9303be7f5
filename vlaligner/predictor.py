"""A numpy / PIL in, numpy out facade over a trained EAVL model: one image and one or more
sentences in, a mask per sentence out at the image's own size.

Axes: b batch (sentences for one image, or image-sentence pairs in ``predict_batch``), n queries, l words (tokens), c channels,
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

from .devices import enable_tf32, resolve_device

__all__ = [
    "Prediction",
    "Predictor",
    "CHECKPOINT_FILES",
    "as_rgb_array",
    "check_sentences",
    "check_checkpoint_dir",
    "resolve_device",
    "resolve_dtype",
    "resolve_checkpoint_dir",
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
            image size"; ``vlaligner.training.predict_masks`` does the same), so the
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


def resolve_checkpoint_dir(
    path_or_repo_id: Union[str, os.PathLike], *, revision: Optional[str] = None
) -> Path:
    """A checked checkpoint folder for a local path or a Hugging Face Hub repo id.

    A string that is not an existing path and looks like ``owner/name`` is fetched through
    ``huggingface_hub`` (honouring ``HF_HUB_OFFLINE`` and its cache; see
    :func:`vlaligner.hub.resolve_checkpoint`); anything else must be a local folder.

    Raises:
        FileNotFoundError: see ``check_checkpoint_dir``; or a repo id the Hub (or the cache,
            offline) does not have.
        ImportError: a repo id while ``huggingface_hub`` is not installed.
    """
    from .hub import resolve_checkpoint

    return check_checkpoint_dir(resolve_checkpoint(path_or_repo_id, revision=revision))


# --------------------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------------------


class Predictor:
    """Segment the object a sentence refers to, on any image, with a trained EAVL model.

    Example::

        predictor = Predictor.from_pretrained("runs/demo/best")     # or a Hub repo id
        pred = predictor.predict("photo.jpg", "the dog on the left")
        pred.mask            # (H W) bool at the photo's size
        preds = predictor.predict(image, ["the dog", "the red ball"], return_queries=True)
        preds[1].query_scores, preds[1].word_attention, preds[1].tokens
        many = predictor.predict_batch(["a.jpg", "b.jpg"], ["the cat", ["the sofa", "the lamp"]])

    Args:
        model: an ``vlaligner.models.EAVL`` (or anything with ``img_size``, ``tokenize`` and
            the same ``forward``); it is put in eval mode and moved to ``device``.
        device: 'cpu', 'cuda', 'cuda:N', 'mps', 'auto' (CUDA, then MPS, then CPU) or a
            torch.device.
        dtype: compute dtype, None / 'auto' (float32 on CPU, bfloat16 / float16 on CUDA),
            'float32', 'bfloat16' or 'float16'; lower precision runs under autocast.
        threshold: probability above which a pixel is in ``Prediction.mask``.
        no_target_threshold: no-target probability above which a model with a no-target
            head answers "no target" (an empty mask); default None: the model's own
            ``no_target_threshold`` (the one its training chose on val and its checkpoint
            records; 0.5 for a model without one).
        exif_transpose: apply the EXIF orientation of image files and PIL images (default
            True: a phone photo is segmented upright, as a viewer shows it, and the mask is
            in that upright grid); False keeps the stored pixel grid, as the data loaders.
        compile: True (or a ``torch.compile`` mode such as ``"reduce-overhead"``, CUDA graphs
            on a GPU) to run the image encoder and the decoding through ``torch.compile``; the
            first call of each new batch shape compiles (seconds to minutes), later ones reuse it.
        tf32: allow TensorFloat-32 for float32 matmuls and convolutions on GPUs that have it
            (Ampere and later; :func:`vlaligner.devices.enable_tf32`, process-wide). No effect
            on the CPU or under bfloat16 / float16 autocast.
        batch_size: most image-sentence pairs (and images) run through the model at once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: Union[str, torch.device, None] = "cpu",
        dtype: Union[str, torch.dtype, None] = None,
        threshold: float = 0.5,
        no_target_threshold: Optional[float] = None,
        exif_transpose: bool = True,
        compile: Union[bool, str] = False,
        tf32: bool = True,
        batch_size: int = _SENTENCE_CHUNK,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (EAVL), got {type(model).__name__}")
        for attr in ("img_size", "tokenize"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model must provide .{attr} like vlaligner.models.EAVL; "
                    f"{type(model).__name__} does not"
                )
        _check_compile(compile)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.threshold = _check_threshold(threshold)
        if no_target_threshold is None:
            no_target_threshold = getattr(model, "no_target_threshold", 0.5)
        self.no_target_threshold = _check_threshold(no_target_threshold, "no_target_threshold")
        if not isinstance(exif_transpose, bool):
            raise TypeError(f"exif_transpose must be a bool, got {type(exif_transpose).__name__}")
        self.exif_transpose = exif_transpose
        self.batch_size = batch_size
        self.tf32 = enable_tf32(bool(tf32), self.device) if self.device.type == "cuda" else False
        self.model = model.eval().to(self.device)
        self.compiled = compile
        # torch.compile wrappers of encode_image / forward_features / forward, made once; the
        # eager path looks the methods up on every call.
        self._compiled: Optional[dict] = None
        if compile:
            mode = None if compile is True else str(compile)
            self._compiled = {
                name: torch.compile(fn, mode=mode)
                for name, fn in self._entry_points().items()
                if fn is not None
            }

    def _entry_points(self) -> dict:
        """The model's encode / decode / forward callables (encode and decode None when the
        model cannot reuse an image encoding)."""
        encode = getattr(self.model, "encode_image", None)
        decode = getattr(self.model, "forward_features", None)
        if not (callable(encode) and callable(decode)):
            encode = decode = None
        return {"encode": encode, "decode": decode, "forward": self.model}

    def _fn(self, name: str):
        if self._compiled is not None:
            return self._compiled.get(name)
        return self._entry_points()[name]

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        device: Union[str, torch.device, None] = "cpu",
        dtype: Union[str, torch.dtype, None] = None,
        threshold: float = 0.5,
        compile: Union[bool, str] = False,
        tf32: bool = True,
        batch_size: int = _SENTENCE_CHUNK,
        revision: Optional[str] = None,
        no_target_threshold: Optional[float] = None,
        exif_transpose: bool = True,
    ) -> "Predictor":
        """Load a model saved with ``EAVL.save_pretrained(path)`` and wrap it.

        Args:
            path: the checkpoint folder, or a Hugging Face Hub repo id ``owner/name`` (a
                string that is not an existing path; downloaded once into the Hub cache, or
                read from it with ``HF_HUB_OFFLINE=1``; the weights' SHA-256 is still checked).
            revision: branch, tag or commit of a Hub repo.
            device, dtype, threshold, compile, tf32, batch_size: as in the constructor.
            no_target_threshold: as in the constructor (default: the one the checkpoint
                records, else 0.5).

        Raises:
            FileNotFoundError: ``path`` is missing or lacks model.safetensors / config.json,
                or a repo id that neither the Hub nor the cache has.
            ImportError: the models extra (timm, transformers, safetensors; huggingface_hub
                for repo ids) is not installed.
        """
        # Check device / dtype / threshold before the (slow) load so that a typo fails at once.
        resolved = resolve_device(device)
        resolve_dtype(dtype, resolved)
        _check_threshold(threshold)
        if no_target_threshold is not None:
            _check_threshold(no_target_threshold, "no_target_threshold")
        if not isinstance(exif_transpose, bool):
            raise TypeError(f"exif_transpose must be a bool, got {type(exif_transpose).__name__}")
        _check_compile(compile)
        directory = resolve_checkpoint_dir(path, revision=revision)
        try:
            from vlaligner.models import EAVL
        except ImportError as err:
            raise ImportError(
                f"loading a checkpoint needs the models extra: pip install 'vlaligner[models]' "
                f"({err})"
            ) from err
        model = EAVL.from_pretrained(directory, map_location="cpu")
        return cls(
            model, device=resolved, dtype=dtype, threshold=threshold, compile=compile,
            tf32=tf32, batch_size=batch_size, no_target_threshold=no_target_threshold,
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
    def _encode(self, pixels: torch.Tensor) -> Optional[Any]:
        """``(m 3 S S)`` -> the model's ``ImageFeatures`` for m images, or None when the model
        cannot reuse an encoding (no ``encode_image`` / ``forward_features``)."""
        encode = self._fn("encode")
        if encode is None:
            return None
        with self._autocast():
            return encode(pixels.to(self.device, torch.float32))

    @torch.inference_mode()
    def _run(
        self,
        pixels: torch.Tensor,
        features: Optional[Any],
        rows: Sequence[int],
        sentences: List[str],
        sizes: Sequence[Tuple[int, int]],
        return_queries: bool,
    ) -> List[Prediction]:
        """Decode b image-sentence pairs in one batch.

        Args:
            pixels: ``(m 3 S S)`` the m preprocessed images.
            features: their ``ImageFeatures`` (m images), or None to run the whole model.
            rows: b indices into the m images, one per sentence.
            sentences: the b sentences.
            sizes: b original (H, W) sizes.
        """
        input_ids, attention_mask = self.model.tokenize(sentences)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        index = torch.as_tensor(list(rows), dtype=torch.long)
        same = len(set(rows)) == 1
        with self._autocast():
            if features is not None:  # images encoded once, shared by their sentences
                if same and features.batch_size == 1:
                    pair_features = features.expand(len(sentences))
                else:
                    pair_features = _select_features(features, index.to(self.device))
                out = self._fn("decode")(
                    pair_features, input_ids, attention_mask,
                    return_query_masks=return_queries, return_word_attention=return_queries,
                )
            else:
                images = pixels.to(self.device, torch.float32)
                images = (
                    images[index[:1]].expand(len(sentences), -1, -1, -1)
                    if same
                    else images[index.to(self.device)]
                )
                out = self._fn("forward")(
                    images, input_ids, attention_mask,
                    return_query_masks=return_queries, return_word_attention=return_queries,
                )
        if return_queries and (out.query_masks is None or out.word_attention is None):
            raise ValueError(_NO_QUERIES)
        nt_logits = getattr(out, "no_target_logits", None)
        nt_prob = None if nt_logits is None else torch.sigmoid(nt_logits.float()).cpu().numpy()
        input_size = tuple(pixels.shape[-2:])

        results = []
        for i, sentence in enumerate(sentences):
            size = tuple(sizes[i])
            prob = logits_to_probability(out.logits[i : i + 1], size, input_size=input_size)[0, 0]
            prob = prob.cpu().numpy().astype(np.float32, copy=False)
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
                image is read, preprocessed and encoded once).
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
        pixels = pixels.unsqueeze(0)
        features = self._encode(pixels)
        results: List[Prediction] = []
        for start in range(0, len(sentences), self.batch_size):
            chunk = sentences[start : start + self.batch_size]
            results.extend(
                self._run(pixels, features, [0] * len(chunk), chunk, [size] * len(chunk), bool(return_queries))
            )
        return results[0] if single else results

    def predict_batch(
        self,
        images: Sequence[ImageLike],
        texts: Sequence[Union[str, Sequence[str]]],
        *,
        return_queries: bool = False,
    ) -> List[Union[Prediction, List[Prediction]]]:
        """Segment many images at once, batching across images as well as sentences.

        ``predict_batch(images, texts)[i]`` equals ``predict(images[i], texts[i])`` (up to
        float rounding of the batched math): the images are encoded ``batch_size`` at a time,
        and the image-sentence pairs are decoded ``batch_size`` at a time whichever image
        they belong to.

        Args:
            images: m images (paths, PIL images or uint8 arrays; sizes may differ).
            texts: m entries, ``texts[i]`` a sentence or a list of sentences about ``images[i]``.
            return_queries: also return each query's mask, score and word attention.

        Returns:
            m entries: a ``Prediction`` where ``texts[i]`` is a str, a list where it is a list.

        Raises:
            TypeError / ValueError: ``images`` or ``texts`` is not a list, their lengths differ,
                or an entry is invalid (the message names its index).
        """
        for name, value in (("images", images), ("texts", texts)):
            if isinstance(value, (str, bytes, np.ndarray, Image.Image)) or not isinstance(
                value, Sequence
            ):
                raise TypeError(
                    f"{name} must be a list (one entry per image), got {type(value).__name__}; "
                    f"for a single image use predict(image, text)"
                )
        if len(images) != len(texts):
            raise ValueError(
                f"images and texts must have one entry per image, got {len(images)} images and "
                f"{len(texts)} texts"
            )
        if return_queries and not self.has_queries:
            raise ValueError(_NO_QUERIES)
        parsed = []
        for i, text in enumerate(texts):
            try:
                parsed.append(check_sentences(text))
            except (TypeError, ValueError) as err:
                raise type(err)(f"texts[{i}]: {err}") from None
        results: List[Union[Prediction, List[Prediction]]] = []
        # Work through the images in groups: each group's images are encoded together and its
        # pairs decoded batch_size at a time, so memory stays bounded for long lists.
        for start in range(0, len(images), self.batch_size):
            group = range(start, min(start + self.batch_size, len(images)))
            rgbs, pixels = [], []
            for i in group:
                try:
                    rgb, pix = self.preprocess(images[i])
                except (TypeError, ValueError) as err:
                    raise type(err)(f"images[{i}]: {err}") from None
                rgbs.append(rgb)
                pixels.append(pix)
            batch = torch.stack(pixels)
            features = self._encode(batch)
            pairs = [(j, s) for j, i in enumerate(group) for s in parsed[i][0]]
            flat: List[Prediction] = []
            for p in range(0, len(pairs), self.batch_size):
                chunk = pairs[p : p + self.batch_size]
                rows = [j for j, _ in chunk]
                flat.extend(
                    self._run(
                        batch, features, rows, [s for _, s in chunk],
                        [tuple(rgbs[j].shape[:2]) for j in rows], bool(return_queries),
                    )
                )
            at = 0
            for i in group:
                sentences, single = parsed[i]
                mine = flat[at : at + len(sentences)]
                at += len(sentences)
                results.append(mine[0] if single else mine)
        return results

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, img_size={self.img_size}, "
            f"device={str(self.device)!r}, dtype={str(self.dtype).replace('torch.', '')!r}, "
            f"threshold={self.threshold}, exif_transpose={self.exif_transpose}"
            + (f", no_target_threshold={self.no_target_threshold})" if self.has_no_target_head else ")")
        )


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile(compile: Union[bool, str]) -> None:
    if isinstance(compile, bool):
        return
    if not isinstance(compile, str) or compile not in _COMPILE_MODES:
        raise ValueError(
            f"compile must be True, False or a torch.compile mode {list(_COMPILE_MODES)}, "
            f"got {compile!r}"
        )


def _select_features(features: Any, index: torch.Tensor) -> Any:
    """Rows ``index (b)`` of an ``ImageFeatures`` of m images (one per image-sentence pair)."""
    return type(features)(
        maps=[m.index_select(0, index) for m in features.maps],
        global_vision=features.global_vision.index_select(0, index),
        details=[m.index_select(0, index) for m in getattr(features, "details", [])],
    )
