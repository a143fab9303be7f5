"""The image encoder of EAVL: a timm backbone and the attention pooling on its last stage.

Axis legend: b batch, c channels, h w space, t tokens (1 + h*w), d width.

The backbone is any timm model built with ``features_only``; EAVL reads its last three
stages (strides 8, 16, 32: Swin-B's stages 2-4, ``F_v2, F_v3, F_v4``). The attention pooling
(paper Eq. 1, CLIP's ``AttentionPool2d`` as used by CRIS) prepends the spatial mean of
``F_v4`` to its tokens, runs one multi-head self-attention layer and returns the first output
token as the global vision feature ``F_g`` and the rest, reshaped, as the refined stage-4 map.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["AttentionPool2d", "ImageEncoder", "create_timm_backbone", "load_backbone_weights", "FEATURE_STRIDES",
           "FINE_FEATURE_STRIDES"]

#: Strides of the three backbone maps EAVL uses (stages 2-4 of Swin).
FEATURE_STRIDES: Tuple[int, int, int] = (8, 16, 32)
#: The same one octave finer: a decoder grid at stride 8 (``build_eavl_tiny(grid_stride=8)``).
FINE_FEATURE_STRIDES: Tuple[int, int, int] = (4, 8, 16)


def create_timm_backbone(
    name: str,
    *,
    pretrained: bool = False,
    img_size: Optional[int] = None,
    strides: Tuple[int, int, int] = FEATURE_STRIDES,
    detail_maps: int = 0,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build ``timm.create_model(name, features_only=True)`` returning three consecutive stages.

    ``strides`` are the strides of the three maps: :data:`FEATURE_STRIDES` (8, 16, 32: the last
    three stages, the paper's) or one octave finer, (4, 8, 16), where the stages after the
    stride-16 one are not built (a decoder grid at stride 8 for small inputs).

    ``img_size`` is forwarded (with ``dynamic_img_size=True``, so that any input whose sides
    are multiples of 32 works, not just ``img_size`` squared) to backbones that take it
    (Swin, ViT-like models); CNNs such as ResNet or ConvNeXt do not take it, and for them it
    is dropped. Further keyword arguments go to timm unchanged (e.g. ``embed_dim``,
    ``depths``, ``channels``).

    ``detail_maps`` (0 or 1): also return the stage before the three, at half the first
    stride, first in the list (a finer map for the mask up-projection's skips).

    Raises:
        ValueError: ``strides`` is neither (8, 16, 32) nor (4, 8, 16), or the backbone's stages
            are not at those strides.
    """
    import timm  # an extra: imported where used so the core package imports without it

    strides = tuple(int(s) for s in strides)
    if strides not in (FEATURE_STRIDES, FINE_FEATURE_STRIDES):
        raise ValueError(f"strides must be {FEATURE_STRIDES} or {FINE_FEATURE_STRIDES}, got {strides}")
    if detail_maps not in (0, 1):
        raise ValueError(f"detail_maps must be 0 or 1, got {detail_maps!r}")
    # Stages counted from the last: (8, 16, 32) are the last three, (4, 8, 16) one earlier.
    shift = 0 if strides == FEATURE_STRIDES else 1
    out_indices = tuple(i - shift for i in range(-3 - detail_maps, 0))
    strides = (strides[0] // 2,) * detail_maps + strides
    base = dict(timm_kwargs, pretrained=pretrained, features_only=True, out_indices=out_indices)
    attempts: List[dict] = []
    if img_size is not None:
        # Not every timm model takes these; try the richest set first. A TypeError that does
        # not name one of them is a real error and is re-raised.
        attempts += [dict(img_size=img_size, dynamic_img_size=True), dict(img_size=img_size)]
    attempts.append({})
    last_error: Optional[TypeError] = None
    for extra in attempts:
        try:
            model = timm.create_model(name, **base, **extra)
            break
        except TypeError as error:
            if not any(key in str(error) for key in extra):
                raise
            last_error = error
    else:  # pragma: no cover - the last attempt has no extra keys, so it raises itself
        raise last_error  # type: ignore[misc]
    reductions = tuple(int(r) for r in model.feature_info.reduction())
    if reductions != strides:
        raise ValueError(
            f"backbone {name!r}: EAVL needs {len(strides)} stages at strides {strides}, "
            f"got strides {reductions}"
        )
    return model


def load_backbone_weights(backbone: nn.Module, path: Any) -> Dict[str, int]:
    """Load a local ImageNet weight file into a ``features_only`` timm backbone (offline).

    The file may be in the backbone's own (timm) layout, or in another layout of the same
    network whose tensors come in the same order (torchvision's ``mobilenet_v2-b0353104.pth``
    for timm's ``mobilenetv2_100``, torchvision's ResNets for timm's): then the tensors are
    matched in order, and every pair must have the same shape. Tensors the backbone does not
    have (the classifier, layers after its last stage) are dropped. ``.safetensors`` files
    are read with safetensors; other files with ``torch.load(weights_only=True)``, which
    refuses arbitrary pickled objects.

    Returns:
        ``{"loaded": n, "dropped": m}``: tensors loaded, tensors of the file left unused.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not fit the backbone (names the first mismatch).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {str(path)!r} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"backbone weights {path}: not a readable weight file ({error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {path}: expected a dict of tensors, got {type(state).__name__}")
    own = backbone.state_dict()
    if all(k in state for k in own):
        mapped = {k: state[k] for k in own}
    else:
        theirs = list(state.items())
        if len(theirs) < len(own):
            raise ValueError(
                f"backbone weights {path}: {len(theirs)} tensors, but the backbone has {len(own)}"
            )
        mapped = {}
        for (key, value), (their_key, tensor) in zip(own.items(), theirs):
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"backbone weights {path} do not fit the backbone: in order, {their_key} "
                    f"{tuple(tensor.shape)} would load into {key} {tuple(value.shape)}"
                )
            mapped[key] = tensor
    backbone.load_state_dict(mapped, strict=True)
    return {"loaded": len(mapped), "dropped": len(state) - len(mapped)}


class AttentionPool2d(nn.Module):
    """Multi-head self-attention over ``[mean(x); flatten(x)]`` (paper Eq. 1, CLIP/CRIS).

    Shapes: ``x (b c h w) -> (global (b c), refined (b c h w))``.

    Args:
        channels: c, the stage-4 channels (kept: ``F_g`` has c channels).
        num_heads: attention heads (CLIP's choice: ``c // 64``).
        grid_size: (h, w) of the stage-4 grid at the training size; the learned positional
            embedding is bilinearly resized for other grids.
        residual: add the input tokens to the attention output. The paper and CRIS use the
            attention output alone (False); a residual keeps a pretrained backbone's map
            intact at initialisation (*choice*, off by default).
    """

    def __init__(
        self, *, channels: int, num_heads: int, grid_size: Tuple[int, int], residual: bool = False
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels = channels
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.residual = residual
        # CLIP's initialisation: N(0, 1/sqrt(c)) for the 1 + h*w positions.
        self.positional_embedding = nn.Parameter(
            torch.randn(1 + self.grid_size[0] * self.grid_size[1], channels) / math.sqrt(channels)
        )
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def _positions(self, h: int, w: int) -> torch.Tensor:
        """``(1 + h*w, c)`` positional embedding for an ``h x w`` grid."""
        pos = self.positional_embedding
        if (h, w) == self.grid_size:
            return pos
        spatial = rearrange(pos[1:], "(h w) c -> 1 c h w", h=self.grid_size[0])
        spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([pos[:1], rearrange(spatial, "1 c h w -> (h w) c")], dim=0)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pool ``x (b c h w)`` into ``(F_g (b c), refined map (b c h w))``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"AttentionPool2d expects (b {self.channels} h w), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        tokens = rearrange(x, "b c h w -> b (h w) c")
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self._positions(h, w).to(tokens.dtype)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        if self.residual:
            out = out + tokens
        refined = rearrange(out[:, 1:], "b (h w) c -> b c h w", h=h, w=w)
        return out[:, 0], refined


class ImageEncoder(nn.Module):
    """Backbone maps at strides 8/16/32 plus the global vision feature (and finer maps).

    Shapes: ``images (b 3 H W) -> ([F_v2 (b c2 H/8 W/8), F_v3 (b c3 H/16 W/16),
    F_v4 (b c4 H/32 W/32)], F_g (b c4), details)``; ``F_v4`` is the attention pooling's refined
    map; ``details`` is the list of the ``detail_maps`` finer maps (e.g. ``(b c1 H/4 W/4)``),
    empty by default. (Strides one octave finer with ``create_timm_backbone(strides=(4, 8, 16))``.)

    Args:
        backbone: a timm ``features_only`` model returning ``detail_maps`` + three maps (see
            :func:`create_timm_backbone`); channels-last outputs (timm's Swin returns
            ``(b h w c)``) are converted by reading the backbone's ``output_fmt``.
        pool: the attention pooling on the last map.
        detail_maps: how many of the backbone's first maps are finer maps for the masks.
    """

    def __init__(self, *, backbone: nn.Module, pool: AttentionPool2d, detail_maps: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        all_channels = tuple(int(c) for c in backbone.feature_info.channels())
        if len(all_channels) != 3 + detail_maps:
            raise ValueError(
                f"the backbone must return {3 + detail_maps} maps ({detail_maps} detail + 3), "
                f"it returns {len(all_channels)}"
            )
        self.detail_maps = int(detail_maps)
        #: channels of the detail maps, finest first
        self.detail_channels: Tuple[int, ...] = all_channels[:detail_maps]
        self.channels: Tuple[int, int, int] = all_channels[detail_maps:]  # type: ignore[assignment]
        if pool.channels != self.channels[-1]:
            raise ValueError(
                f"pool has {pool.channels} channels, the backbone's last map {self.channels[-1]}"
            )
        #: channels of the maps at the strides of the mask up-projection's rounds, coarse to fine:
        #: the first of the three maps (half the decoder grid's stride), then the detail maps
        self.skip_channels: Tuple[int, ...] = (self.channels[0],) + tuple(reversed(self.detail_channels))
        fmt = getattr(backbone, "output_fmt", "NCHW")
        self.channels_last = str(getattr(fmt, "value", fmt)).upper() == "NHWC"

    def forward(
        self, images: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        maps = list(self.backbone(images))
        if self.channels_last:
            maps = [rearrange(f, "b h w c -> b c h w") for f in maps]
        for f, c in zip(maps, self.detail_channels + tuple(self.channels)):
            if f.shape[1] != c:  # a wrong output_fmt would silently mix space and channels
                raise RuntimeError(f"backbone map has shape {tuple(f.shape)}, expected {c} channels")
        details, feats = maps[: self.detail_maps], maps[self.detail_maps:]
        global_vision, refined = self.pool(feats[-1])
        feats[-1] = refined
        return feats, global_vision, details

