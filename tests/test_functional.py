"""vlaligner.functional: each fast path against the per-sample, per-query F.conv2d loop."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from vlaligner.functional import (
    coord_features,
    dynamic_conv2d,
    fuse_dynamic_kernels,
    split_dynamic_params,
    weighted_mask_sum,
)

METHODS_BY_K = {1: ["auto", "taps", "grouped", "einsum"], 3: ["auto", "taps", "grouped"], 5: ["auto", "taps", "grouped"]}


def reference_dynamic_conv(features, weight, bias):
    """The plain loop: one F.conv2d per sample and per query."""
    b, n = weight.shape[:2]
    k = weight.shape[-1]
    out = torch.empty(b, n, *features.shape[-2:], dtype=features.dtype)
    for i in range(b):
        for j in range(n):
            out[i, j] = F.conv2d(
                features[i : i + 1], weight[i, j : j + 1], None if bias is None else bias[i, j : j + 1],
                padding=k // 2,
            )[0, 0]
    return out


@given(
    b=st.integers(1, 3),
    n=st.integers(1, 5),
    c=st.integers(1, 6),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    k=st.sampled_from([1, 3, 5]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dynamic_conv2d_equals_loop(b, n, c, h, w, k, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(b, n, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(b, n, generator=g, dtype=torch.float64) if with_bias else None
    expected = reference_dynamic_conv(features, weight, bias)
    for method in METHODS_BY_K[k]:
        got = dynamic_conv2d(features, weight, bias, method=method)
        assert got.shape == (b, n, h, w)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=method)


@pytest.mark.parametrize("method", ["taps", "grouped"])
def test_samples_never_touch_each_other(method):
    features = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    weight = torch.randn(3, 2, 4, 3, 3, dtype=torch.float64)
    base = dynamic_conv2d(features, weight, method=method)
    features2 = features.clone()
    features2[1] = torch.randn(4, 6, 6)
    other = dynamic_conv2d(features2, weight, method=method)
    torch.testing.assert_close(other[[0, 2]], base[[0, 2]], rtol=0, atol=0)
    assert not torch.allclose(other[1], base[1])


@given(b=st.integers(1, 3), n=st.integers(1, 6), c=st.integers(1, 5), k=st.sampled_from([1, 3, 5]),
       seed=st.integers(0, 2**16))
def test_fused_equals_unfused(b, n, c, k, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, c, 7, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(b, n, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(b, n, generator=g, dtype=torch.float64)
    scores = torch.randn(b, n, generator=g, dtype=torch.float64).softmax(-1)
    fused = dynamic_conv2d(features, *fuse_dynamic_kernels(weight, bias, scores))
    unfused = weighted_mask_sum(dynamic_conv2d(features, weight, bias), scores)
    assert fused.shape == (b, 1, 7, 5)
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-10)


def test_fuse_without_bias_returns_none_bias():
    weight = torch.randn(2, 3, 4, 1, 1)
    fused_w, fused_b = fuse_dynamic_kernels(weight, None, torch.full((2, 3), 1 / 3))
    assert fused_b is None
    torch.testing.assert_close(fused_w[:, 0], weight.mean(1))


def test_split_dynamic_params_layout():
    c, k = 3, 3
    params = torch.arange(2 * 4 * (c * k * k + 1), dtype=torch.float32).reshape(2, 4, -1)
    weight, bias = split_dynamic_params(params, c, k)
    assert weight.shape == (2, 4, c, k, k) and bias.shape == (2, 4)
    torch.testing.assert_close(weight[1, 2].flatten(), params[1, 2, :-1])
    torch.testing.assert_close(bias, params[..., -1])


def test_split_dynamic_params_wrong_size_names_expected_and_received():
    with pytest.raises(ValueError, match=r"p = in_channels \* kernel_size\*\*2 \+ 1 = 8 \* 3\*\*2 \+ 1 = 73, got shape \(2, 4, 72\)"):
        split_dynamic_params(torch.zeros(2, 4, 72), 8, 3)
    with pytest.raises(ValueError, match="odd"):
        split_dynamic_params(torch.zeros(2, 4, 33), 8, 2)
    with pytest.raises(ValueError, match=r"\(b n p\).*got shape \(4, 73\)"):
        split_dynamic_params(torch.zeros(4, 73), 8, 3)


@pytest.mark.parametrize(
    "features, weight, bias, error, message",
    [
        (torch.zeros(2, 4, 5), torch.zeros(2, 3, 4, 3, 3), None, ValueError, r"features must have shape \(b c h w\).*got shape \(2, 4, 5\)"),
        (torch.zeros(2, 4, 5, 5), torch.zeros(2, 3, 4, 3), None, ValueError, r"weight must have shape \(b n c k k\).*got shape \(2, 3, 4, 3\)"),
        (torch.zeros(2, 4, 5, 5), torch.zeros(3, 3, 4, 3, 3), None, ValueError, r"batch size of features \(b = 2\)"),
        (torch.zeros(2, 4, 5, 5), torch.zeros(2, 3, 5, 3, 3), None, ValueError, r"c = 4, got shape \(2, 3, 5, 3, 3\)"),
        (torch.zeros(2, 4, 5, 5), torch.zeros(2, 3, 4, 2, 2), None, ValueError, "odd kernel size"),
        (torch.zeros(2, 4, 5, 5), torch.zeros(2, 3, 4, 3, 1), None, ValueError, "square, odd"),
        (torch.zeros(2, 4, 5, 5), torch.zeros(2, 3, 4, 3, 3), torch.zeros(2, 4), ValueError, r"bias must have shape \(b n\) = \(2, 3\), got shape \(2, 4\)"),
        (torch.zeros(2, 4, 5, 5, dtype=torch.long), torch.zeros(2, 3, 4, 3, 3), None, TypeError, "floating-point"),
        (torch.zeros(2, 4, 5, 5, dtype=torch.float64), torch.zeros(2, 3, 4, 3, 3), None, TypeError, "same dtype"),
        ("features", torch.zeros(2, 3, 4, 3, 3), None, TypeError, "features must be a torch.Tensor, got str"),
    ],
)
def test_dynamic_conv2d_rejects_bad_input(features, weight, bias, error, message):
    with pytest.raises(error, match=message):
        dynamic_conv2d(features, weight, bias)


def test_dynamic_conv2d_unknown_method_and_einsum_needs_1x1():
    x, w = torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 2, 3, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        dynamic_conv2d(x, w, method="fft")
    with pytest.raises(ValueError, match="1x1"):
        dynamic_conv2d(x, w, method="einsum")


@pytest.mark.parametrize("method", ["taps", "grouped", "einsum"])
def test_dynamic_conv2d_gradcheck(method):
    k = 1 if method == "einsum" else 3
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: dynamic_conv2d(x, w, b, method=method), (features, weight, bias))


def test_fuse_dynamic_kernels_gradcheck():
    weight = torch.randn(2, 3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fuse_dynamic_kernels, (weight, bias, scores))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dynamic_conv2d_half_precision_close_to_float32(dtype):
    features = torch.randn(2, 8, 6, 6)
    weight = torch.randn(2, 3, 8, 3, 3) / 8
    expected = dynamic_conv2d(features, weight)
    got = dynamic_conv2d(features.to(dtype), weight.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.1)


def test_coord_features_range_and_layout():
    coords = coord_features(2, 3, 5)
    assert coords.shape == (2, 2, 3, 5)
    torch.testing.assert_close(coords[0, 0, 0], torch.linspace(-1, 1, 5))  # x varies along width
    torch.testing.assert_close(coords[0, 1, :, 0], torch.linspace(-1, 1, 3))  # y along height


def test_taps_double_backward_matches_grouped():
    features = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: dynamic_conv2d(x, w, method="taps"), (features, weight))
