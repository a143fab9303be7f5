"""The math of the Vision-Language Aligner as pure functions.

Axis legend: b batch, n queries, c channels, h w space, k kernel size (odd), p flat
parameters per query (c*k*k + 1).

The aligner turns each of n queries into a k x k convolution kernel over c channels plus a
bias (``split_dynamic_params``), applies all of them to the sample's own feature map in one
batched op (``dynamic_conv2d``), and weights the n masks by scores. Because convolution is
linear in its kernel, the weighted sum of n masks equals one convolution with the weighted
kernel (``fuse_dynamic_kernels``): that is the fused fast path.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from ._validation import check_dim, check_input

__all__ = [
    "dynamic_conv2d",
    "split_dynamic_params",
    "fuse_dynamic_kernels",
    "weighted_mask_sum",
    "mixture_of_masks_logits",
    "coord_features",
    "DynamicConvMethod",
]

DynamicConvMethod = Literal["auto", "taps", "grouped", "einsum"]


def _check_dynamic_conv_inputs(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> None:
    check_input("features", features, "b c h w")
    check_input("weight", weight, "b n c k k")
    if weight.device != features.device:
        raise ValueError(
            f"weight must be on the device of features ({features.device}), got {weight.device}"
        )
    b, c = features.shape[:2]
    if weight.shape[0] != b:
        raise ValueError(
            f"weight must have shape (b n c k k) with the batch size of features (b = {b}), "
            f"got weight shape {tuple(weight.shape)} and features shape {tuple(features.shape)}"
        )
    check_dim("weight", weight, "b n c k k", 2, c)
    k, k2 = weight.shape[-2:]
    if k != k2 or k % 2 == 0:
        raise ValueError(
            f"weight must have shape (b n c k k) with a square, odd kernel size k, "
            f"got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        _check_bias(bias, weight)
    if features.dtype != weight.dtype and not _autocast_enabled(features.device.type):
        raise TypeError(
            f"features and weight must have the same dtype outside torch.autocast, "
            f"got {features.dtype} and {weight.dtype}"
        )


def _check_bias(bias: torch.Tensor, weight: torch.Tensor) -> None:
    check_input("bias", bias, "b n")
    if tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(
            f"bias must have shape (b n) = {tuple(weight.shape[:2])}, got shape {tuple(bias.shape)}"
        )
    if bias.device != weight.device:
        raise ValueError(f"bias must be on the device of weight ({weight.device}), got {bias.device}")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument and only reports CUDA
        return torch.is_autocast_enabled()


def _choose_method(n: int, k: int, device_type: str) -> str:
    """Pick the fastest implementation, from ``benchmarks/bench_aligner.py`` measurements.

    A 1x1 kernel is a plain batched matmul. For k > 1 on CPU the "taps" form (one matmul over
    the k*k taps, then k*k shifted adds) beat a grouped convolution with the batch folded
    into channels in every case measured on a 2-core CPU (one thread, c = 256, 120 x 120):
    2.8x for the fused single kernel, 1.3x at n = 24 forward, 1.4x forward+backward. On CUDA
    (one H200, k = 3, c = 256, 120 x 120, batch 8, forward, float32; docs/deployment.md) taps
    won at n = 1 (0.22 against 0.49 ms) and n = 8 (0.30 against 0.36), cuDNN's grouped
    convolution at n = 24 (0.36 against 0.53); in bfloat16 the two were within 3 % from n = 8.
    """
    if k == 1:
        return "einsum"
    if device_type == "cuda" and n > 8:
        return "grouped"
    return "taps"


def _dynamic_conv_einsum(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1x1 kernels: ``masks[b n h w] = sum_c weight[b n c] * features[b c h w]``."""
    b, c, h, w = features.shape
    masks = torch.bmm(weight.reshape(b, -1, c), features.reshape(b, c, h * w))
    return masks.reshape(b, -1, h, w)


def _dynamic_conv_taps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """k x k kernels as one matmul over the k*k taps followed by k*k shifted adds.

    ``taps[b n i j y x] = sum_c weight[b n c i j] * features[b c y x]``, then the shifted
    sum of ``_tap_slices``: exactly ``F.conv2d`` with "same" zero padding.
    """
    b, c, h, w = features.shape
    n, k = weight.shape[1], weight.shape[-1]
    flat_weight = rearrange(weight, "b n c i j -> b (n i j) c")
    taps = torch.bmm(flat_weight, features.reshape(b, c, h * w))
    taps = taps.reshape(b, n, k, k, h, w)
    return _sum_shifted_taps(taps)


def _tap_slices(k: int, h: int, w: int):
    """Yield ``(i, j, out_slice, tap_slice)``: ``out[out_slice] += taps[i, j][tap_slice]``.

    ``masks[y, x] = sum_ij taps[i, j, y + i - k//2, x + j - k//2]`` (zero outside the map),
    which is the cross-correlation ``F.conv2d`` computes with "same" zero padding.
    """
    p = k // 2
    for i in range(k):
        for j in range(k):
            di, dj = i - p, j - p
            if abs(di) >= h or abs(dj) >= w:
                continue
            y0, y1 = max(0, -di), h - max(0, di)
            x0, x1 = max(0, -dj), w - max(0, dj)
            yield i, j, (slice(y0, y1), slice(x0, x1)), (slice(y0 + di, y1 + di), slice(x0 + dj, x1 + dj))


class _SumShiftedTaps(torch.autograd.Function):
    """``(b n k k h w)`` per-tap responses -> ``(b n h w)`` "same"-padded convolution output.

    A custom backward: autograd through nine in-place slice adds would materialise a full
    zero tensor of the taps' size per tap, which made the backward pass ~10x the forward.
    """

    @staticmethod
    def forward(ctx, taps: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, n, k, _, h, w = taps.shape
        ctx.kernel_size = k
        out = taps.new_zeros(b, n, h, w)
        for i, j, out_slice, tap_slice in _tap_slices(k, h, w):
            out[:, :, out_slice[0], out_slice[1]] += taps[:, :, i, j, tap_slice[0], tap_slice[1]]
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ScatterTaps.apply(grad_out, ctx.kernel_size)


class _ScatterTaps(torch.autograd.Function):
    """The adjoint of ``_SumShiftedTaps`` (``(b n h w)`` -> ``(b n k k h w)``), for double backward."""

    @staticmethod
    def forward(ctx, grad_out: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        b, n, h, w = grad_out.shape
        grad_taps = grad_out.new_zeros(b, n, k, k, h, w)
        for i, j, out_slice, tap_slice in _tap_slices(k, h, w):
            grad_taps[:, :, i, j, tap_slice[0], tap_slice[1]] = grad_out[:, :, out_slice[0], out_slice[1]]
        return grad_taps

    @staticmethod
    def backward(ctx, grad_taps: torch.Tensor):  # type: ignore[override]
        return _SumShiftedTaps.apply(grad_taps), None


def _sum_shifted_taps(taps: torch.Tensor) -> torch.Tensor:
    """``(b n k k h w)`` per-tap responses -> ``(b n h w)``; see ``_tap_slices``."""
    return _SumShiftedTaps.apply(taps)


def _dynamic_conv_grouped(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """k x k kernels as one grouped convolution with the batch folded into channels."""
    b, c, h, w = features.shape
    n, k = weight.shape[1], weight.shape[-1]
    masks = F.conv2d(
        features.reshape(1, b * c, h, w),
        weight.reshape(b * n, c, k, k),
        padding=k // 2,
        groups=b,
    )
    return masks.reshape(b, n, h, w)


_METHODS = {
    "einsum": _dynamic_conv_einsum,
    "taps": _dynamic_conv_taps,
    "grouped": _dynamic_conv_grouped,
}


def dynamic_conv2d(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    method: DynamicConvMethod = "auto",
) -> torch.Tensor:
    """Apply per-sample, per-query convolution kernels with "same" padding, in one batched op.

    Sample ``i``'s kernels touch only sample ``i``'s features. Equal (up to float rounding)
    to looping ``F.conv2d(features[i:i+1], weight[i], bias[i], padding=k // 2)`` over the batch.

    Args:
        features: ``(b c h w)`` feature maps.
        weight: ``(b n c k k)`` kernels, ``k`` odd.
        bias: ``(b n)`` biases, or None.
        method: ``"auto"`` (measured choice), ``"taps"`` (one matmul over the k*k taps plus
            shifted adds), ``"grouped"`` (grouped convolution, batch folded into channels) or
            ``"einsum"`` (1x1 kernels only).

    Returns:
        ``(b n h w)`` masks (logits).
    """
    _check_dynamic_conv_inputs(features, weight, bias)
    n, k = weight.shape[1], weight.shape[-1]
    if method == "auto":
        method = _choose_method(n, k, features.device.type)
    if method not in _METHODS:
        raise ValueError(f"method must be one of 'auto', {sorted(_METHODS)}, got {method!r}")
    if method == "einsum" and k != 1:
        raise ValueError(f"method 'einsum' needs 1x1 kernels, got kernel size {k}")
    masks = _METHODS[method](features, weight)
    if bias is not None:
        # In place: no method's backward needs its own output, and it saves a (b n h w) copy.
        masks.add_(bias[:, :, None, None].to(masks.dtype))
    return masks


def split_dynamic_params(
    params: torch.Tensor, in_channels: int, kernel_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split flat per-query parameters into convolution kernels and biases.

    The first ``c*k*k`` numbers of each query's vector are its kernel (channel-major, then
    kernel rows, then columns); the last one is its bias.

    Args:
        params: ``(b n p)`` with ``p == in_channels * kernel_size**2 + 1``.
        in_channels: ``c``.
        kernel_size: ``k`` (odd).

    Returns:
        ``weight (b n c k k)`` and ``bias (b n)``.
    """
    check_input("params", params, "b n p")
    for arg, value in (("in_channels", in_channels), ("kernel_size", kernel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    expected = in_channels * kernel_size * kernel_size + 1
    if params.shape[-1] != expected:
        raise ValueError(
            f"params must have shape (b n p) with p = in_channels * kernel_size**2 + 1 = "
            f"{in_channels} * {kernel_size}**2 + 1 = {expected}, got shape {tuple(params.shape)}"
        )
    weight = rearrange(
        params[..., :-1], "b n (c i j) -> b n c i j", c=in_channels, i=kernel_size, j=kernel_size
    )
    return weight, params[..., -1]


def _check_scores(scores: torch.Tensor, batch_queries: Tuple[int, int], other: torch.Tensor, other_name: str) -> None:
    check_input("scores", scores, "b n")
    if scores.device != other.device:
        raise ValueError(f"scores must be on the device of {other_name} ({other.device}), got {scores.device}")
    if tuple(scores.shape) != tuple(batch_queries):
        raise ValueError(
            f"scores must have shape (b n) = {tuple(batch_queries)}, got shape {tuple(scores.shape)}"
        )


def fuse_dynamic_kernels(
    weight: torch.Tensor, bias: Optional[torch.Tensor], scores: torch.Tensor
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fold n score-weighted kernels into one kernel per sample.

    ``dynamic_conv2d(x, *fuse_dynamic_kernels(w, b, s))`` equals
    ``weighted_mask_sum(dynamic_conv2d(x, w, b), s)`` exactly in exact arithmetic, with n
    times fewer multiply-adds, because convolution is linear in its kernel.

    Args:
        weight: ``(b n c k k)`` kernels.
        bias: ``(b n)`` biases, or None.
        scores: ``(b n)`` weights (softmax scores in the aligner).

    Returns:
        ``weight (b 1 c k k)`` and ``bias (b 1)`` (None when ``bias`` is None).
    """
    check_input("weight", weight, "b n c k k")
    _check_scores(scores, weight.shape[:2], weight, "weight")
    scores = scores.to(weight.dtype)
    fused_weight = torch.einsum("bncij,bn->bcij", weight, scores).unsqueeze(1)
    fused_bias = None
    if bias is not None:
        _check_bias(bias, weight)
        fused_bias = (bias * scores.to(bias.dtype)).sum(dim=1, keepdim=True)
    return fused_weight, fused_bias


def weighted_mask_sum(masks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Aggregate n masks by their scores (paper Eq. 14).

    Args:
        masks: ``(b n h w)`` per-query logits.
        scores: ``(b n)`` weights.

    Returns:
        ``(b 1 h w)`` logits ``sum_i scores_i * masks_i``.
    """
    check_input("masks", masks, "b n h w")
    _check_scores(scores, masks.shape[:2], masks, "masks")
    return torch.einsum("bnhw,bn->bhw", masks, scores.to(masks.dtype)).unsqueeze(1)


def coord_features(
    batch: int,
    height: int,
    width: int,
    *,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Normalised pixel coordinates, as CoordConv and CRIS append them.

    Returns:
        ``(b 2 h w)``: channel 0 is x and channel 1 is y, each running from -1 to 1.
    """
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0).expand(batch, -1, -1, -1)


def mixture_of_masks_logits(masks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Logits of the score-weighted mean of the masks' probabilities: ``logit(sum_i s_i sigmoid(m_i))``.

    The "probabilities" reading of Eq. 14: each query's mask is a whole prediction and the
    estimator's scores mix them. Computed in log space (``logsumexp`` of ``log s_i +
    logsigmoid(+-m_i)``), so it stays finite for any logits, in at least float32.

    Args:
        masks: ``(b n H W)`` per-query mask logits.
        scores: ``(b n)`` non-negative weights summing to 1 over n.

    Returns:
        ``(b 1 H W)`` logits whose sigmoid is ``sum_i s_i sigmoid(m_i)``.
    """
    check_input("masks", masks, "b n H W")
    _check_scores(scores, tuple(masks.shape[:2]), masks, "masks")
    compute = torch.promote_types(masks.dtype, torch.float32)
    m = masks.to(compute)
    log_s = scores.to(compute).clamp_min(torch.finfo(compute).tiny).log()[:, :, None, None]
    log_p = torch.logsumexp(log_s + F.logsigmoid(m), dim=1, keepdim=True)
    log_q = torch.logsumexp(log_s + F.logsigmoid(-m), dim=1, keepdim=True)
    return (log_p - log_q).to(masks.dtype)
