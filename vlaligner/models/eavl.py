"""The full EAVL model: encoders, Fusion Neck, Multi-Query Generator, decoder and aligner.

Axis legend: b batch, n queries, l words (tokens), c channels, d width, h w the stride-16
grid (H/16, W/16), H W input size, k kernel size.

Data flow (``../shared/spec/eavl.md``, sections 1-5)::

    images (b 3 H W) -> ImageEncoder -> F_v2 (b c2 H/8 W/8), F_v3 (b c3 H/16 W/16),
                                        F_v4 (b c4 H/32 W/32) refined, F_g (b c4)
    input_ids (b l) -> TextEncoder -> F_t (b l d), F_s (b d)
    FusionNeck(F_v2..4, F_s)                      -> F_v (b d h w)
    MultiQueryGenerator(F_v2..4, F_t, mask, F_g)  -> F_q (b n d), attention (b n l)
    TransformerDecoder(F_v, F_q)                  -> F_c (b d h w)
    VisionLanguageAligner(F_c, F_q)               -> logits (b 1 H/4 W/4), scores (b n)

Checkpoints are a folder: ``model.safetensors`` (never pickle), ``config.json`` (builder
name and keyword arguments, library version, format version, SHA-256 of the weights),
``tokenizer/`` and ``text_config/`` (so that reloading never downloads anything).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import __version__
from ..fileio import atomic_write_dir, atomic_write_file, atomic_write_text
from ..fileio import sha256_file as _sha256
from .._validation import check_like, check_nonempty, check_probability, reference_parameter
from ..aligner import FixedKernelHead, VisionLanguageAligner
from ..neck import FusionNeck
from ..no_target import NoTargetHead
from ..query_generator import MultiQueryGenerator
from .decoder import TransformerDecoder
from .image_encoder import ImageEncoder
from .text_encoder import TextEncoder
from .tokenizer import tokenize as _tokenize

__all__ = [
    "EAVL",
    "EAVLOutput",
    "INPUT_MULTIPLE",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "TOKENIZER_DIR",
    "TEXT_CONFIG_DIR",
]

#: Image sides must be multiples of this (the backbone's coarsest stride).
INPUT_MULTIPLE = 32
#: Version of the checkpoint folder layout; bumped when old folders need conversion.
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"
TEXT_CONFIG_DIR = "text_config"
#: The no-target threshold of a model that has not recorded one (``EAVL.no_target_threshold``).
DEFAULT_NO_TARGET_THRESHOLD = 0.5
# Files that hold pickles: refused, since unpickling runs arbitrary code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class EAVLOutput:
    """What :meth:`EAVL.forward` returns, the same in train and eval.

    Attributes:
        logits: ``(b 1 H/4 W/4)`` mask logits (apply ``sigmoid`` for probabilities; the loss
            is :func:`vlaligner.losses.mask_bce_loss`).
        query_scores: ``(b n)`` weight of each query's mask (sums to 1 over n); None with the
            fixed-kernel head.
        query_masks: ``(b n H/4 W/4)`` per-query mask logits when ``return_query_masks=True``
            (aligner head only), else None.
        word_attention: ``(b n l)`` vision-guided word attention of the Multi-Query
            Generator (Eq. 9, zero on padding) when ``return_word_attention=True``, else None.
        no_target_logits: ``(b)`` logits of "the sentence refers to nothing" (gRefCOCO;
            ``sigmoid`` > 0.5 means no target) when the model has a no-target head, else None.
    """

    logits: torch.Tensor
    query_scores: Optional[torch.Tensor] = None
    query_masks: Optional[torch.Tensor] = None
    word_attention: Optional[torch.Tensor] = None
    no_target_logits: Optional[torch.Tensor] = None


@dataclass
class ImageFeatures:
    """An encoded image batch, so that several sentences can reuse one image encoding.

    Attributes:
        maps: three maps ``(b c_i h_i w_i)`` at strides 8, 16 and 32 (stage 4 refined by the
            attention pooling).
        global_vision: ``(b c4)`` the global vision feature ``F_g``.
        details: finer backbone maps for the masks' skips (e.g. ``(b c1 H/4 W/4)``), finest
            first; empty unless the model was built with ``mask_skips``.
    """

    maps: List[torch.Tensor]
    global_vision: torch.Tensor
    details: List[torch.Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.global_vision.shape[0]

    def expand(self, batch_size: int) -> "ImageFeatures":
        """Repeat a single encoded image ``batch_size`` times (a view, no copy)."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs features of one image, got a batch of {self.batch_size}")
        return ImageFeatures(
            maps=[m.expand(batch_size, -1, -1, -1) for m in self.maps],
            global_vision=self.global_vision.expand(batch_size, -1),
            details=[m.expand(batch_size, -1, -1, -1) for m in self.details],
        )


class EAVL(nn.Module):
    """EAVL for referring image segmentation, assembled from its parts.

    Build it with :func:`vlaligner.models.build_eavl_swin_b` or
    :func:`vlaligner.models.build_eavl_tiny` (they write the paper's numbers out), or pass
    the parts yourself.

    Args:
        image_encoder: backbone + attention pooling (maps at strides 8/16/32 and ``F_g``).
        text_encoder: language model + projections (``F_t``, and ``F_s`` unless built
            without a sentence projection).
        neck: the Fusion Neck; built with ``sentence_dim`` exactly when the text encoder
            makes ``F_s`` (the ablation without ``F_s`` drops both).
        query_generator: the Multi-Query Generator; ``F_g`` is passed to it exactly when it
            was built with ``global_vision_dim``.
        decoder: the transformer decoder (Q from the vision tokens, K/V from the queries).
        head: :class:`~vlaligner.VisionLanguageAligner` or the table-III baseline
            :class:`~vlaligner.FixedKernelHead`.
        tokenizer: a ``transformers`` tokenizer matching the language model.
        img_size: the side the model was built for (training size; the attention pooling's
            positional embedding and the generator's grid are sized for it).
        max_length: default token count of :meth:`tokenize` (17 as RefCOCO; 22 for G-Ref).
        config: ``{"builder": name, "kwargs": {...}}`` recorded by the builders, so that
            :meth:`save_pretrained` can write how to rebuild the model.
        no_target_head: a :class:`~vlaligner.no_target.NoTargetHead` for generalized
            referring segmentation (gRefCOCO: sentences that refer to nothing), or None
            (classic RIS; the default). It reads the aligner's queries and scores, the
            decoder output (when built with ``vision_dim``) and the mask logits (when built
            with ``use_mask_stats``); ``EAVLOutput.no_target_logits`` holds its ``(b)`` logits.
    """

    # nn.Module's state-dict version: bump and convert in _load_from_state_dict on renames.
    _version = 1

    def __init__(
        self,
        *,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        neck: FusionNeck,
        query_generator: MultiQueryGenerator,
        decoder: TransformerDecoder,
        head: Union[VisionLanguageAligner, FixedKernelHead],
        tokenizer: Any,
        img_size: int,
        max_length: int = 17,
        config: Optional[Dict[str, Any]] = None,
        no_target_head: Optional[NoTargetHead] = None,
    ) -> None:
        super().__init__()
        if (text_encoder.sentence_proj is None) != (neck.sentence_proj is None):
            raise ValueError(
                "text_encoder and neck disagree on F_s: build both with a sentence dimension or "
                "both without (the ablation without the global text feature)"
            )
        if tuple(image_encoder.channels) != tuple(neck.in_channels) or tuple(
            image_encoder.channels
        ) != tuple(query_generator.vision_channels):
            raise ValueError(
                f"channels disagree: image encoder {tuple(image_encoder.channels)}, neck "
                f"{tuple(neck.in_channels)}, query generator {tuple(query_generator.vision_channels)}"
            )
        if img_size % INPUT_MULTIPLE:
            raise ValueError(f"img_size must be a multiple of {INPUT_MULTIPLE}, got {img_size}")
        skip_channels = getattr(head, "skip_channels", None)
        if skip_channels is not None:
            available = image_encoder.skip_channels
            if len(skip_channels) > len(available) or any(
                c is not None and c != a for c, a in zip(skip_channels, available)
            ):
                raise ValueError(
                    f"the head's skip_channels {list(skip_channels)} do not fit the image encoder: its "
                    f"maps at the up-projection's strides have channels {list(available)} (the first "
                    "backbone map, then its detail maps, finest last)"
                )
        if no_target_head is not None:
            if not isinstance(no_target_head, NoTargetHead):
                raise TypeError(
                    f"no_target_head must be a vlaligner.no_target.NoTargetHead or None, got "
                    f"{type(no_target_head).__name__}"
                )
            if no_target_head.query_dim != query_generator.dim:
                raise ValueError(
                    f"no_target_head.query_dim ({no_target_head.query_dim}) must equal the query width "
                    f"({query_generator.dim})"
                )
            if no_target_head.vision_dim not in (None, decoder.dim):
                raise ValueError(
                    f"no_target_head.vision_dim ({no_target_head.vision_dim}) must be None or the decoder "
                    f"width ({decoder.dim})"
                )
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.neck = neck
        self.query_generator = query_generator
        self.decoder = decoder
        self.head = head
        # A submodule only when given: classic models keep exactly their tensors.
        self.no_target_head = no_target_head
        self.tokenizer = tokenizer
        self.img_size = int(img_size)
        self.max_length = int(max_length)
        self.num_queries = int(query_generator.num_queries)
        self._config: Dict[str, Any] = dict(config) if config else {"builder": None, "kwargs": {}}
        self._no_target_threshold = DEFAULT_NO_TARGET_THRESHOLD
        #: how :attr:`no_target_threshold` was chosen (saved beside it in config.json)
        self.no_target_threshold_source = "default"

    # ------------------------------------------------------------------ properties
    @property
    def no_target_threshold(self) -> float:
        """The no-target probability above which the model answers "no target" (default 0.5).

        Training on a generalized set records the threshold chosen on its validation split
        (``vlaligner.no_target_threshold``); :meth:`save_pretrained` writes it to
        ``config.json`` (models with a no-target head) and :meth:`from_pretrained` restores
        it. The predictor and ``evaluate.py`` use it unless given another.
        """
        return self._no_target_threshold

    @no_target_threshold.setter
    def no_target_threshold(self, value: float) -> None:
        self._no_target_threshold = check_probability("no_target_threshold", value)

    @property
    def config(self) -> Dict[str, Any]:
        """``{"builder": name, "kwargs": {...}}``: how to rebuild this model (a copy)."""
        return json.loads(json.dumps(self._config))

    @property
    def has_no_target_head(self) -> bool:
        """Whether the model decides "no target" (generalized referring segmentation)."""
        return self.no_target_head is not None

    @property
    def use_global_vision(self) -> bool:
        """Whether ``F_g`` feeds the generator (Eq. 8); False is the ablation without it."""
        return self.query_generator.global_vision_dim is not None

    @property
    def use_global_text(self) -> bool:
        """Whether ``F_s`` gates the neck (Eq. 2); False is the ablation without it."""
        return self.neck.sentence_proj is not None

    # ------------------------------------------------------------------ text
    def tokenize(
        self, sentences: Union[str, Sequence[str]], max_length: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokenize with the model's own tokenizer, padded/truncated to ``max_length``.

        Args:
            sentences: one sentence or a list; any English text (unknown words become
                sub-words or [UNK]); an empty or blank sentence raises ``ValueError``.
            max_length: tokens including [CLS] and [SEP]; default ``self.max_length`` (17).

        Returns:
            ``input_ids (b l)`` and ``attention_mask (b l)`` (int64, 1 = real token), on CPU.
        """
        return _tokenize(
            self.tokenizer, sentences, self.max_length if max_length is None else max_length
        )

    # ------------------------------------------------------------------ forward
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (b 3 H W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor normalised with the ImageNet mean/std, got dtype {images.dtype}"
            )
        check_nonempty("images", images, "b 3 H W")
        check_like("images", images, reference_parameter(self), "the model's weights")
        height, width = images.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            raise ValueError(
                f"image sides must be multiples of {INPUT_MULTIPLE} (the backbone's stride-32 map must "
                f"tile the input exactly), got images of shape {tuple(images.shape)}; resize or pad "
                f"to e.g. {tuple(-(-s // INPUT_MULTIPLE) * INPUT_MULTIPLE for s in (height, width))}"
            )

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int, image_name: str) -> None:
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (b l), got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(
                f"attention_mask must be an integer or bool tensor (1 / True = real token), got dtype "
                f"{attention_mask.dtype} (an additive float mask of 0 / -inf would be read inverted)"
            )
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids (b l) = {tuple(input_ids.shape)}, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        check_nonempty("input_ids", input_ids, "b l")
        reference = reference_parameter(self)
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if reference is not None and value.device != reference.device:
                raise ValueError(
                    f"{name} must be on the model's device ({reference.device}), got a tensor on "
                    f"{value.device}; move it with .to({str(reference.device)!r})"
                )
        if input_ids.shape[0] != batch_size:
            raise ValueError(
                f"batch sizes must match, got {image_name}: {batch_size}, input_ids: {input_ids.shape[0]}"
            )
        limit = getattr(self.text_encoder.language_model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens but the language model has only {limit} "
                f"positions: tokenize with max_length <= {limit}"
            )
        # Token ids are not range-checked here: that would need the values on the host, a
        # device sync on every forward; the embedding lookup raises for out-of-range ids.

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        return_query_masks: bool = False,
        return_word_attention: bool = False,
    ) -> EAVLOutput:
        """Segment what each sentence refers to.

        Args:
            images: ``(b 3 H W)`` normalised with the ImageNet mean/std; H and W multiples
                of 32 (``ValueError`` otherwise, naming the shape received).
            input_ids: ``(b l)`` token ids (from :meth:`tokenize`).
            attention_mask: ``(b l)`` 1 (or True) for real tokens, 0 for padding; ids under
                0 never change the output.
            return_query_masks: also return the n per-query masks (aligner head only).
            return_word_attention: also return the generator's word attention ``(b n l)``.

        Returns:
            :class:`EAVLOutput` with ``logits (b 1 H/4 W/4)`` (and ``no_target_logits (b)``
            with a no-target head).
        """
        self._check_images(images)
        self._check_text(input_ids, attention_mask, images.shape[0], "images")
        return self._decode(
            self._encode_image(images), input_ids, attention_mask,
            return_query_masks=return_query_masks, return_word_attention=return_word_attention,
        )

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Run the image encoder alone: ``(b 3 H W)`` -> :class:`ImageFeatures`.

        With :meth:`forward_features`, one image is encoded once for several sentences
        (``encode_image(img).expand(num_sentences)``), as :class:`vlaligner.Predictor` does.
        """
        self._check_images(images)
        return self._encode_image(images)

    def forward_features(
        self,
        image_features: ImageFeatures,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        return_query_masks: bool = False,
        return_word_attention: bool = False,
    ) -> EAVLOutput:
        """:meth:`forward` from an already encoded image batch (same outputs, exactly)."""
        if not isinstance(image_features, ImageFeatures):
            raise TypeError(
                f"image_features must be the ImageFeatures of encode_image, got {type(image_features).__name__}"
            )
        self._check_text(input_ids, attention_mask, image_features.batch_size, "image_features")
        return self._decode(
            image_features, input_ids, attention_mask,
            return_query_masks=return_query_masks, return_word_attention=return_word_attention,
        )

    def _encode_image(self, images: torch.Tensor) -> ImageFeatures:
        feats, global_vision, details = self.image_encoder(images)
        return ImageFeatures(maps=list(feats), global_vision=global_vision, details=list(details))

    def _mask_skips(self, image_features: ImageFeatures) -> Optional[List[Optional[torch.Tensor]]]:
        """The skip map of each up-projection round (coarse to fine), or None without skips."""
        wanted = getattr(self.head, "skip_channels", None)
        if wanted is None:
            return None
        # the order of ImageEncoder.skip_channels: the first map, then the detail maps, finest last
        available = [image_features.maps[0]] + image_features.details[::-1]
        return [None if c is None else available[i] for i, c in enumerate(wanted)]

    def _decode(
        self,
        image_features: ImageFeatures,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        return_query_masks: bool,
        return_word_attention: bool,
    ) -> EAVLOutput:
        feats, global_vision = image_features.maps, image_features.global_vision
        words, sentence = self.text_encoder(input_ids, attention_mask)
        word_mask = attention_mask.bool()
        fused = self.neck(feats, sentence)
        queries, attention = self.query_generator(
            feats,
            words,
            word_mask,
            global_vision=global_vision if self.use_global_vision else None,
            return_attention=True,
        )
        decoded = self.decoder(fused, queries)
        out = self.head(
            decoded, queries, return_query_masks=return_query_masks, skips=self._mask_skips(image_features)
        )
        no_target_logits = None
        if self.no_target_head is not None:
            head = self.no_target_head
            no_target_logits = head(
                queries,
                out.query_scores,
                features=decoded if head.vision_dim is not None else None,
                mask_logits=out.logits if head.use_mask_stats else None,
            )
        return EAVLOutput(
            logits=out.logits,
            query_scores=out.query_scores,
            query_masks=out.query_masks,
            word_attention=attention if return_word_attention else None,
            no_target_logits=no_target_logits,
        )

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(
        self, directory: Union[str, os.PathLike], *, push_to_hub: Optional[str] = None
    ) -> Path:
        """Write the checkpoint folder; returns its path.

        Files: ``model.safetensors`` (weights; written to a temporary file, then renamed, so a
        crash never leaves a half-written file under the real name), ``tokenizer/``,
        ``text_config/config.json`` and last ``config.json`` (builder, kwargs, versions and the
        SHA-256 of the weights: a folder whose weights were changed afterwards is refused).

        Args:
            directory: the folder to write (created with its parents).
            push_to_hub: a Hugging Face Hub repo id ``owner/name``: after saving, upload the
                folder there (needs ``huggingface_hub`` and a login; see :meth:`push_to_hub`).
        """
        from safetensors.torch import save_file

        if not self._config.get("builder"):
            raise ValueError(
                "this EAVL was not made by a builder (config has no 'builder'), so from_pretrained "
                "could not rebuild it: build it with build_eavl_swin_b/build_eavl_tiny"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = _plain_state_dict(self)
        metadata = {"format": "pt", "vlaligner_version": __version__, "format_version": str(FORMAT_VERSION)}
        atomic_write_file(directory / WEIGHTS_NAME, lambda path: save_file(state, str(path), metadata=metadata))
        atomic_write_dir(directory / TOKENIZER_DIR, lambda path: self.tokenizer.save_pretrained(str(path)))
        atomic_write_dir(
            directory / TEXT_CONFIG_DIR,
            lambda path: self.text_encoder.language_model.config.save_pretrained(str(path)),
        )
        config = {
            "builder": self._config["builder"],
            "kwargs": self._config["kwargs"],
            "vlaligner_version": __version__,
            "format_version": FORMAT_VERSION,
            "weights_sha256": _sha256(directory / WEIGHTS_NAME),
        }
        if self.no_target_head is not None:
            config["no_target_threshold"] = self.no_target_threshold
            config["no_target_threshold_source"] = str(self.no_target_threshold_source)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write_text(directory / CONFIG_NAME, text)
        if push_to_hub is not None:
            from ..hub import push_folder

            push_folder(directory, push_to_hub)
        return directory

    def push_to_hub(
        self, repo_id: str, *, private: Optional[bool] = None, commit_message: str = "Upload EAVL checkpoint"
    ) -> str:
        """Save the checkpoint folder to a temporary folder and upload it to the Hub repo ``repo_id``.

        Needs ``huggingface_hub`` (extra ``models``) and a token (``huggingface-cli login`` or
        ``HF_TOKEN``). The repo is created when missing. Returns the commit URL.
        """
        import tempfile

        from ..hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, private=private, commit_message=commit_message)

    @classmethod
    def from_pretrained(
        cls,
        directory: Union[str, os.PathLike],
        map_location: Union[str, torch.device] = "cpu",
        strict: bool = True,
        *,
        revision: Optional[str] = None,
    ) -> "EAVL":
        """Rebuild a model saved with :meth:`save_pretrained` and load its weights.

        The model is rebuilt by the recorded builder with random initialisation (nothing is
        downloaded: the language model comes from ``text_config/``, the tokenizer from
        ``tokenizer/``), then the safetensors weights are loaded. Pickles are never loaded.
        The model is returned in eval mode (call ``.train()`` to fine-tune).

        Args:
            directory: the checkpoint folder, or a Hugging Face Hub repo id ``owner/name``
                (a string that is not an existing path; fetched with ``huggingface_hub``,
                which honours ``HF_HUB_OFFLINE`` and its cache; see :mod:`vlaligner.hub`).
            map_location: device the model is moved to.
            strict: refuse missing or unexpected tensors (shape mismatches are always refused).
            revision: branch, tag or commit of a Hub repo (repo ids only).

        Raises:
            FileNotFoundError: the folder or one of its files is missing (lists what a folder
                must hold).
            ValueError: pickle-only folder, unreadable/tampered weights or config, missing
                hash, unknown builder or backbone, weights holding NaN / inf, or weights of
                another variant (names the first differing tensors).

        Nothing is downloaded, ever: a ``config.json`` that asks for pretrained weights is
        refused (see :meth:`check_pretrained`).
        """
        from .builders import BUILDERS
        from .registry import recorded_kwargs

        directory = _resolve_checkpoint_location(directory, revision)
        config = cls.check_pretrained(directory)
        builder_name = config["builder"]
        weights = directory / WEIGHTS_NAME
        kwargs = recorded_kwargs(builder_name, dict(config["kwargs"]))
        kwargs["tokenizer"] = str(directory / TOKENIZER_DIR)
        kwargs["text_config"] = str(directory / TEXT_CONFIG_DIR)
        try:
            model = BUILDERS[builder_name](**kwargs)
        except TypeError as error:  # kwargs written by another vlaligner version
            raise ValueError(
                f"{directory / CONFIG_NAME}: builder {builder_name!r} does not accept the recorded arguments "
                f"{sorted(config['kwargs'])} ({error}); was the folder saved by another vlaligner "
                f"version ({config.get('vlaligner_version')!r}, this is {__version__})?"
            ) from error
        except FileNotFoundError:  # names the missing file of the folder itself
            raise
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            # e.g. an unknown timm backbone ("Unknown model"), a bad text_config/ folder.
            raise ValueError(
                f"{directory / CONFIG_NAME}: cannot rebuild the model with builder {builder_name!r} "
                f"and the recorded arguments {json.dumps(config['kwargs'], sort_keys=True)[:300]}: "
                f"{type(error).__name__}: {error}"
            ) from error
        state = _load_safetensors(weights)
        non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if non_finite:
            raise ValueError(
                f"{weights}: {len(non_finite)} tensor(s) hold NaN or inf values, first: {non_finite[:3]}; "
                "the run that saved them had diverged (its loss became NaN / inf): use an earlier checkpoint"
            )
        model.load_checkpoint_state(state, strict=strict, source=str(weights))
        if "no_target_threshold" in config:
            model.no_target_threshold = config["no_target_threshold"]
            model.no_target_threshold_source = str(config.get("no_target_threshold_source", "recorded"))
        # Eval mode, as transformers' from_pretrained: dropout off, BatchNorm on saved statistics.
        return model.to(map_location).eval()

    @staticmethod
    def check_pretrained(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
        """Check a checkpoint folder without building the model; return its config.

        Checks, each error naming the file: the folder and its files exist, ``config.json``
        is complete JSON of the right structure with a known builder, the SHA-256 of
        ``model.safetensors`` is recorded and matches, and the weights' header is readable.
        :meth:`from_pretrained` runs these checks first; ``vlaligner info`` runs them alone.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            ValueError: pickle-only folder, truncated / malformed config.json, unknown builder,
                missing or mismatching hash, unreadable weights.
        """
        from .registry import BUILDERS

        directory = Path(directory)
        expected = f"{CONFIG_NAME}, {WEIGHTS_NAME}, {TOKENIZER_DIR}/ and {TEXT_CONFIG_DIR}/"
        if directory.is_file():
            raise FileNotFoundError(
                f"checkpoint {str(directory)!r} is a file, not a folder (an EAVL checkpoint folder holds "
                f"{expected}); pass the folder that holds it"
            )
        if not directory.is_dir():
            raise FileNotFoundError(
                f"checkpoint folder {str(directory)!r} does not exist (an EAVL checkpoint folder holds {expected})"
            )
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
            if pickles:
                raise ValueError(
                    f"{str(directory)!r} holds pickle files {pickles} but no {WEIGHTS_NAME}: vlaligner never "
                    "loads pickles (unpickling can run arbitrary code). If the file is from a source you "
                    "trust, load it yourself and re-save it with EAVL.save_pretrained"
                )
            raise FileNotFoundError(
                f"{str(directory)!r} has no {WEIGHTS_NAME} (an EAVL checkpoint folder holds {expected}); "
                f"found: {sorted(p.name for p in directory.iterdir())}"
            )
        config_path = directory / CONFIG_NAME
        config = _read_config(config_path, expected)
        builder_name = config["builder"]
        if builder_name not in BUILDERS:
            raise ValueError(
                f"{config_path} names builder {builder_name!r}, which this vlaligner {__version__} does not "
                f"know (known: {sorted(BUILDERS)})"
            )
        for key in ("pretrained", "tokenizer", "text_config"):
            if key in config["kwargs"]:
                raise ValueError(
                    f"{config_path}: kwargs must not hold {key!r} (from_pretrained never downloads and "
                    f"reads the tokenizer and text config from the folder itself); remove it"
                )
        _check_builder_kwargs(config_path, builder_name, BUILDERS[builder_name], config["kwargs"])
        recorded = config.get("weights_sha256")
        if not isinstance(recorded, str) or len(recorded) != 64:
            raise ValueError(
                f"{config_path} has no valid 'weights_sha256' (got {recorded!r}), so {WEIGHTS_NAME} cannot "
                "be checked; a folder written by save_pretrained always has it. If you assembled the "
                f"folder yourself, record the SHA-256 of {WEIGHTS_NAME} (sha256sum) under 'weights_sha256'"
            )
        if _sha256(weights) != recorded:
            raise ValueError(
                f"{weights} does not match the SHA-256 recorded in {config_path}: the weights were changed "
                "after saving (tampered, corrupt or half-copied); refusing to load them"
            )
        _check_safetensors_header(weights)
        for sub in (TOKENIZER_DIR, TEXT_CONFIG_DIR):
            if not (directory / sub).is_dir():
                raise FileNotFoundError(
                    f"{str(directory)!r} has no {sub}/ folder (an EAVL checkpoint folder holds {expected})"
                )
        if not (directory / TEXT_CONFIG_DIR / "config.json").is_file():
            raise FileNotFoundError(f"{directory / TEXT_CONFIG_DIR} has no config.json")
        return config

    def load_checkpoint_state(
        self, state: Dict[str, torch.Tensor], *, strict: bool = True, source: str = "checkpoint"
    ) -> None:
        """``load_state_dict`` with errors that name the differing tensors and their shapes."""
        own = self.state_dict()
        mismatched = [
            (k, tuple(state[k].shape), tuple(v.shape))
            for k, v in own.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        ]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        hint = (
            f"was it saved from another variant than {self._config.get('builder')} "
            f"{self._config.get('kwargs')}? (num_queries, kernel_size, head, dim, backbone and the "
            "ablation switches change the tensors)"
        )
        if mismatched:
            listed = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:5])
            raise ValueError(
                f"{source}: {len(mismatched)} tensors have another shape than in the model, first: "
                f"{listed}. {hint}"
            )
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} missing, first: "
                    + ", ".join(f"{k} {tuple(own[k].shape)}" for k in missing[:5])
                )
            if unexpected:
                parts.append(
                    f"{len(unexpected)} unexpected, first: "
                    + ", ".join(f"{k} {tuple(state[k].shape)}" for k in unexpected[:5])
                )
            raise ValueError(f"{source}: tensors do not match the model: {'; '.join(parts)}. {hint}")
        self.load_state_dict(state, strict=strict)


# ---------------------------------------------------------------------- file helpers
def _resolve_checkpoint_location(directory: Union[str, os.PathLike], revision: Optional[str]) -> Path:
    """A local folder for ``from_pretrained``: the path itself, or a Hub repo id's snapshot.

    Downloads only for a string that is not an existing path and looks like ``owner/name``
    (see :func:`vlaligner.hub.resolve_checkpoint`); the folder is then checked as any other.
    """
    from ..hub import resolve_checkpoint

    return resolve_checkpoint(directory, revision=revision)


def _plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing memory are cloned (safetensors refuses them)."""
    state: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if pointer is not None and pointer in seen:
            tensor = tensor.clone()
        elif pointer is not None:
            seen.add(pointer)
        state[key] = tensor
    return state


def _read_config(path: Path, expected: str) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path.parent)!r} has no {CONFIG_NAME} (an EAVL checkpoint folder holds {expected})"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {error}") from error
    except OSError as error:
        raise ValueError(f"{path} cannot be read: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("builder"), str) or not isinstance(
        config.get("kwargs"), dict
    ):
        raise ValueError(
            f"{path} must be a JSON object with 'builder' (str) and 'kwargs' (object), got {str(config)[:200]}"
        )
    if "no_target_threshold" in config:
        try:
            check_probability(f"{path}: no_target_threshold", config["no_target_threshold"])
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from error
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this vlaligner {__version__} reads format_version "
            f"<= {FORMAT_VERSION} (saved by vlaligner {config.get('vlaligner_version')!r}: upgrade vlaligner)"
        )
    return config


def _check_builder_kwargs(config_path: Path, name: str, builder: Any, kwargs: Dict[str, Any]) -> None:
    """Refuse recorded arguments the builder does not take, and a timm backbone timm does not know."""
    import inspect

    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in kwargs if k not in params)
        if unknown:
            raise ValueError(
                f"{config_path}: builder {name!r} does not accept the recorded arguments {unknown}; was the "
                f"folder saved by another vlaligner version (this is {__version__})?"
            )
    backbone = kwargs.get("backbone")
    if backbone is not None:
        import timm

        if not isinstance(backbone, str) or (":" not in backbone and not timm.is_model(backbone)):
            raise ValueError(
                f"{config_path}: backbone {backbone!r} is not a model this timm {timm.__version__} knows; "
                "cannot rebuild the model (was it saved with another timm version?)"
            )


def _check_safetensors_header(path: Path) -> None:
    """Read the safetensors header (cheap: no tensor data) or raise ``ValueError`` naming ``path``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            list(handle.keys())
    except Exception as error:  # SafetensorError, OSError, ValueError
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt, truncated or tampered): {error}"
        ) from error


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError and OSError/ValueError
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt, truncated or tampered): {error}"
        ) from error

