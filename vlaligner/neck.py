"""The Fusion Neck of EAVL (paper Eqs. 2-5) and its plain variant for dense vision features (Eq. 6).

Axis legend: b batch, c channels, d width, h w space; maps come at strides s, 2s, 4s (a
host's stride-8/16/32 features) and the output sits at the middle stride 2s.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_input, check_same_batch, check_tensor
from .functional import coord_features
from .layers import NormLayer, conv_norm_act

__all__ = ["FusionNeck", "check_vision_feats"]


def check_vision_feats(
    vision_feats: Sequence[torch.Tensor], channels: Sequence[int], module: Optional[nn.Module] = None
) -> None:
    """Check three ``(b c_i h_i w_i)`` maps against the expected channels ``c_i``.

    Each map must be a non-empty floating-point tensor; with ``module``, also on the device
    and (outside autocast) of the dtype of its weights.
    """
    if isinstance(vision_feats, torch.Tensor) or not isinstance(vision_feats, (list, tuple)):
        raise TypeError(
            "vision_feats must be a list or tuple of three (b c h w) tensors at strides s, 2s, 4s, "
            f"got {type(vision_feats).__name__}"
        )
    if len(vision_feats) != 3:
        raise ValueError(
            f"vision_feats must hold three maps at strides s, 2s, 4s, got {len(vision_feats)}"
        )
    for i, (feat, c) in enumerate(zip(vision_feats, channels)):
        check_tensor(f"vision_feats[{i}]", feat)
        check_input(f"vision_feats[{i}]", feat, "b c h w", sizes={1: c}, module=module)
    check_same_batch(**{f"vision_feats[{i}]": f for i, f in enumerate(vision_feats)})


class FusionNeck(nn.Module):
    """Fuse three backbone maps (and optionally the sentence) into one map at the middle stride.

    Eq. 2: ``F_m4 = relu(conv1x1(F_v4)) * relu(linear(F_s))``, upsampled to the middle grid
    (without the product when ``sentence_dim`` is None: Eq. 6 and the ablation without F_s).
    Eq. 3: ``F_m3 = conv([F_m4, relu(conv1x1(F_v3))])``,
    ``F_m2 = conv([avgpool(relu(conv1x1(F_v2))), F_m3])``. Eq. 4: ``F_m = conv1x1([F_m2,
    F_m3, F_m4])``. Eq. 5 (``use_coords``): append normalised (x, y) and a 3x3 conv.

    Resampling goes to the middle map's exact size (bilinear up, adaptive average down), so
    odd sizes work too; at exact strides it is the paper's 2x upsampling and 2x2 pooling.

    ``fuse_kernel_size`` is the kernel of the two convolutions after each concatenation
    (Eq. 3): 1 as CRIS's ``FPN`` (``f1_v_proj``-style 1x1 ``conv_layer``s), 3 for more spatial
    context in a small from-scratch model.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        dim: int,
        sentence_dim: Optional[int] = None,
        use_coords: bool = True,
        fuse_kernel_size: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if fuse_kernel_size < 1 or fuse_kernel_size % 2 == 0:
            raise ValueError(f"fuse_kernel_size must be a positive odd integer, got {fuse_kernel_size}")
        if len(in_channels) != 3:
            raise ValueError(f"in_channels must list three channel counts, got {in_channels}")
        c2, c3, c4 = (int(c) for c in in_channels)
        self.in_channels = (c2, c3, c4)
        self.dim = dim
        self.proj4 = conv_norm_act(c4, dim, 1, norm_layer=norm_layer)
        self.proj3 = conv_norm_act(c3, dim, 1, norm_layer=norm_layer)
        self.proj2 = conv_norm_act(c2, dim, 1, norm_layer=norm_layer)
        self.sentence_proj = (
            nn.Sequential(nn.Linear(sentence_dim, dim), nn.ReLU()) if sentence_dim else None
        )
        self.fuse_kernel_size = fuse_kernel_size
        self.fuse3 = conv_norm_act(2 * dim, dim, fuse_kernel_size, norm_layer=norm_layer)
        self.fuse2 = conv_norm_act(2 * dim, dim, fuse_kernel_size, norm_layer=norm_layer)
        self.aggregate = conv_norm_act(3 * dim, dim, 1, norm_layer=norm_layer)
        self.coord_conv = (
            conv_norm_act(dim + 2, dim, 3, norm_layer=norm_layer) if use_coords else None
        )

    def forward(
        self, vision_feats: Sequence[torch.Tensor], sentence: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Fuse the maps.

        Args:
            vision_feats: three maps ``(b c_i h_i w_i)`` at strides s, 2s, 4s.
            sentence: ``(b sentence_dim)`` global text feature F_s; required exactly when the
                neck was built with ``sentence_dim``.

        Returns:
            ``(b d h2 w2)`` at the grid of the middle map.
        """
        check_vision_feats(vision_feats, self.in_channels, self)
        f2, f3, f4 = vision_feats
        size = tuple(f3.shape[-2:])
        m4 = self.proj4(f4)
        if self.sentence_proj is not None:
            if sentence is None:
                raise ValueError("this neck gates with the sentence feature: pass sentence (b d_s)")
            check_input(
                "sentence", sentence, "b d", sizes={1: self.sentence_proj[0].in_features}, module=self
            )
            check_same_batch(vision_feats=f4, sentence=sentence)
            m4 = m4 * self.sentence_proj(sentence)[:, :, None, None]
        elif sentence is not None:
            raise ValueError("this neck was built without sentence_dim: pass sentence=None")
        m4 = F.interpolate(m4, size=size, mode="bilinear", align_corners=False)
        m3 = self.fuse3(torch.cat([m4, self.proj3(f3)], dim=1))
        p2 = F.adaptive_avg_pool2d(self.proj2(f2), size)
        m2 = self.fuse2(torch.cat([p2, m3], dim=1))
        fused = self.aggregate(torch.cat([m2, m3, m4], dim=1))
        if self.coord_conv is not None:
            coords = coord_features(
                fused.shape[0], *size, device=fused.device, dtype=fused.dtype
            )
            fused = self.coord_conv(torch.cat([fused, coords], dim=1))
        return fused
