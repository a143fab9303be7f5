"""Hostile inputs into the aligner core, the functional ops and EAVL.forward (issue 13).

Table-driven: each case builds one call and states the outcome, either the right result
(checked against a reference) or an error of the expected type whose message names the
offending argument and what was expected / received. "meta" tensors stand for a tensor on
another device (a CPU-only machine has no second device).

Axes: b batch, n queries, l words, c channels, d width, h w space, k kernel size.
"""

from __future__ import annotations

import pytest
import torch

from vlaligner import FixedKernelHead, FusionNeck, MultiMaskGenerator, MultiQueryEstimator, MultiQueryGenerator, VisionLanguageAligner
from vlaligner.functional import dynamic_conv2d, fuse_dynamic_kernels, split_dynamic_params, weighted_mask_sum

B, N, C, D, T = 2, 4, 16, 16, 12
CH = (8, 16, 32)


def _feats(b=B, dtype=torch.float32, sizes=((16, 16), (8, 8), (4, 4)), device="cpu"):
    return [torch.randn(b, c, *hw, dtype=dtype, device=device) for c, hw in zip(CH, sizes)]


@pytest.fixture(scope="module")
def mods():
    torch.manual_seed(0)
    return {
        "aligner": VisionLanguageAligner(in_channels=C, query_dim=D, num_heads=4).eval(),
        "aligner_noest": VisionLanguageAligner(in_channels=C, query_dim=D, use_estimator=False).eval(),
        "estimator": MultiQueryEstimator(query_dim=D, num_heads=4).eval(),
        "maskgen": MultiMaskGenerator(in_channels=C, query_dim=D).eval(),
        "fixed": FixedKernelHead(in_channels=C).eval(),
        "neck": FusionNeck(in_channels=CH, dim=D, sentence_dim=T).eval(),
        "gen": MultiQueryGenerator(
            vision_channels=CH, text_dim=T, dim=D, num_queries=N, global_vision_dim=32, grid_size=(4, 4)
        ).eval(),
    }


def x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype) if device == "cpu" else torch.empty(*shape, dtype=dtype, device=device)


WM = torch.ones(B, 5, dtype=torch.bool)

# (id, call(mods), expected exception, regex the message must match)
ERROR_CASES = [
    # --- VisionLanguageAligner
    ("aligner-int-features", lambda m: m["aligner"](x(B, C, 8, 8, dtype=torch.int64), x(B, N, D)), TypeError, r"features must be a floating-point tensor, got dtype torch.int64"),
    ("aligner-bool-features", lambda m: m["aligner"](x(B, C, 8, 8) > 0, x(B, N, D)), TypeError, r"features .*torch.bool.*bool mask"),
    ("aligner-float64-features", lambda m: m["aligner"](x(B, C, 8, 8, dtype=torch.float64), x(B, N, D)), TypeError, r"features must have the dtype of the VisionLanguageAligner|features must have the dtype of the MultiMaskGenerator.*float32.*got dtype torch.float64"),
    ("aligner-float64-queries", lambda m: m["aligner"](x(B, C, 8, 8), x(B, N, D, dtype=torch.float64)), TypeError, r"queries must have the dtype .*float32.* got dtype torch.float64"),
    ("aligner-float16-outside-autocast", lambda m: m["aligner"](x(B, C, 8, 8, dtype=torch.float16), x(B, N, D, dtype=torch.float16)), TypeError, r"features must have the dtype .*float32.*float16.*autocast"),
    ("aligner-zero-queries", lambda m: m["aligner"](x(B, C, 8, 8), x(B, 0, D)), ValueError, r"queries must have shape \(b n d\) with every axis at least 1, got shape \(2, 0, 16\) \(empty: n = 0\)"),
    ("aligner-noest-zero-queries", lambda m: m["aligner_noest"](x(B, C, 8, 8), x(B, 0, D)), ValueError, r"queries .*n = 0"),
    ("aligner-zero-height", lambda m: m["aligner"](x(B, C, 0, 8), x(B, N, D)), ValueError, r"features .*h = 0"),
    ("aligner-zero-batch", lambda m: m["aligner"](x(0, C, 8, 8), x(0, N, D)), ValueError, r"features .*b = 0"),
    ("aligner-zero-width-queries", lambda m: m["aligner"](x(B, C, 8, 8), x(B, N, 0)), ValueError, r"queries .*d = 0"),
    ("aligner-rank3-features", lambda m: m["aligner"](x(C, 8, 8), x(B, N, D)), ValueError, r"features must have shape \(b c h w\) with 4 dimensions, got shape \(16, 8, 8\)"),
    ("aligner-wrong-channels", lambda m: m["aligner"](x(B, C + 1, 8, 8), x(B, N, D)), ValueError, r"features .*c = 16, got shape \(2, 17, 8, 8\)"),
    ("aligner-wrong-query-dim", lambda m: m["aligner"](x(B, C, 8, 8), x(B, N, D + 2)), ValueError, r"queries .*d = 16"),
    ("aligner-batch-mismatch", lambda m: m["aligner"](x(B, C, 8, 8), x(B + 1, N, D)), ValueError, r"batch sizes must match, got features: 2, queries: 3"),
    ("aligner-list-features", lambda m: m["aligner"]([[0.0]], x(B, N, D)), TypeError, r"features must be a torch.Tensor, got list"),
    ("aligner-numpy-queries", lambda m: m["aligner"](x(B, C, 8, 8), x(B, N, D).numpy()), TypeError, r"queries must be a torch.Tensor, got ndarray"),
    ("aligner-features-other-device", lambda m: m["aligner"](x(B, C, 8, 8, device="meta"), x(B, N, D)), ValueError, r"features must be on the device of .*\(cpu\), got a tensor on meta"),
    ("aligner-queries-other-device", lambda m: m["aligner"](x(B, C, 8, 8), x(B, N, D, device="meta")), ValueError, r"queries must be on the device .*got a tensor on meta"),
    # --- MultiQueryEstimator / MultiMaskGenerator / FixedKernelHead
    ("estimator-int-queries", lambda m: m["estimator"](x(B, N, D, dtype=torch.int32)), TypeError, r"queries must be a floating-point tensor, got dtype torch.int32"),
    ("estimator-zero-queries", lambda m: m["estimator"](x(B, 0, D)), ValueError, r"queries .*n = 0"),
    ("estimator-float64", lambda m: m["estimator"](x(B, N, D, dtype=torch.float64)), TypeError, r"queries must have the dtype of the MultiQueryEstimator's weights \(torch.float32\)"),
    ("estimator-rank2", lambda m: m["estimator"](x(N, D)), ValueError, r"queries must have shape \(b n d\) with 3 dimensions"),
    ("maskgen-bool-queries", lambda m: m["maskgen"](x(B, C, 8, 8), x(B, N, D) > 0), TypeError, r"queries must be a floating-point tensor, got dtype torch.bool"),
    ("maskgen-zero-queries", lambda m: m["maskgen"](x(B, C, 8, 8), x(B, 0, D)), ValueError, r"n = 0"),
    ("fixed-int-features", lambda m: m["fixed"](x(B, C, 8, 8, dtype=torch.uint8)), TypeError, r"features must be a floating-point tensor, got dtype torch.uint8"),
    ("fixed-float64-features", lambda m: m["fixed"](x(B, C, 8, 8, dtype=torch.float64)), TypeError, r"FixedKernelHead's weights \(torch.float32\)"),
    ("fixed-zero-width", lambda m: m["fixed"](x(B, C, 8, 0)), ValueError, r"w = 0"),
    ("fixed-queries-not-tensor", lambda m: m["fixed"](x(B, C, 8, 8), "the dog"), TypeError, r"queries must be a torch.Tensor, got str"),
    # --- FusionNeck
    ("neck-two-maps", lambda m: m["neck"](_feats()[:2], x(B, T)), ValueError, r"vision_feats must hold three maps .*got 2"),
    ("neck-tensor-not-list", lambda m: m["neck"](x(B, 8, 4, 4), x(B, T)), TypeError, r"vision_feats must be a list or tuple .*got Tensor"),
    ("neck-int-map", lambda m: m["neck"]([f.long() for f in _feats()], x(B, T)), TypeError, r"vision_feats\[0\] must be a floating-point tensor, got dtype torch.int64"),
    ("neck-float64-maps", lambda m: m["neck"](_feats(dtype=torch.float64), x(B, T)), TypeError, r"vision_feats\[0\] must have the dtype of the FusionNeck's weights"),
    ("neck-empty-map", lambda m: m["neck"](_feats(sizes=((16, 16), (0, 8), (4, 4))), x(B, T)), ValueError, r"vision_feats\[1\] .*h = 0"),
    ("neck-sentence-int", lambda m: m["neck"](_feats(), torch.ones(B, T, dtype=torch.long)), TypeError, r"sentence must be a floating-point tensor"),
    ("neck-sentence-width", lambda m: m["neck"](_feats(), x(B, T + 1)), ValueError, r"sentence must have shape \(b d\) with d = 12"),
    ("neck-sentence-missing", lambda m: m["neck"](_feats()), ValueError, r"pass sentence"),
    ("neck-map-other-device", lambda m: m["neck"]([x(B, c, s, s, device="meta") for c, s in zip(CH, (16, 8, 4))], x(B, T)), ValueError, r"vision_feats\[0\] must be on the device"),
    # --- MultiQueryGenerator
    ("gen-int-words", lambda m: m["gen"](_feats(), torch.ones(B, 5, T, dtype=torch.long), WM, x(B, 32)), TypeError, r"words must be a floating-point tensor, got dtype torch.int64"),
    ("gen-float64-words", lambda m: m["gen"](_feats(), x(B, 5, T, dtype=torch.float64), WM, x(B, 32)), TypeError, r"words must have the dtype of the MultiQueryGenerator's weights"),
    ("gen-zero-words", lambda m: m["gen"](_feats(), x(B, 0, T), torch.ones(B, 0, dtype=torch.bool), x(B, 32)), ValueError, r"words .*l = 0"),
    ("gen-int-word-mask", lambda m: m["gen"](_feats(), x(B, 5, T), torch.ones(B, 5, dtype=torch.long), x(B, 32)), TypeError, r"word_mask must be a bool tensor .*got dtype torch.int64"),
    ("gen-word-mask-shape", lambda m: m["gen"](_feats(), x(B, 5, T), torch.ones(B, 4, dtype=torch.bool), x(B, 32)), ValueError, r"word_mask must have shape \(b l\) = \(2, 5\), got shape \(2, 4\)"),
    ("gen-word-mask-device", lambda m: m["gen"](_feats(), x(B, 5, T), torch.ones(B, 5, dtype=torch.bool, device="meta"), x(B, 32)), ValueError, r"word_mask must be on the device of words"),
    ("gen-missing-global", lambda m: m["gen"](_feats(), x(B, 5, T), WM), ValueError, r"pass global_vision"),
    ("gen-global-int", lambda m: m["gen"](_feats(), x(B, 5, T), WM, torch.ones(B, 32, dtype=torch.int64)), TypeError, r"global_vision must be a floating-point tensor"),
    ("gen-global-width", lambda m: m["gen"](_feats(), x(B, 5, T), WM, x(B, 31)), ValueError, r"global_vision must have shape \(b global_vision_dim\) with global_vision_dim = 32"),
    ("gen-feats-float64", lambda m: m["gen"](_feats(dtype=torch.float64), x(B, 5, T), WM, x(B, 32)), TypeError, r"vision_feats\[0\] must have the dtype of the MultiQueryGenerator's weights"),
    ("gen-batch-mismatch", lambda m: m["gen"](_feats(b=3), x(B, 5, T), WM, x(B, 32)), ValueError, r"batch sizes must match"),
    # --- functional ops
    ("conv-int-features", lambda m: dynamic_conv2d(x(B, C, 8, 8, dtype=torch.int64), x(B, N, C, 3, 3)), TypeError, r"features must be a floating-point tensor"),
    ("conv-zero-queries", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, 0, C, 3, 3)), ValueError, r"weight .*n = 0"),
    ("conv-zero-map", lambda m: dynamic_conv2d(x(B, C, 0, 0), x(B, N, C, 3, 3)), ValueError, r"features .*h = 0, w = 0"),
    ("conv-dtype-mismatch", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, N, C, 3, 3, dtype=torch.float64)), TypeError, r"features and weight must have the same dtype .*float32 and torch.float64"),
    ("conv-device-mismatch", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, N, C, 3, 3, device="meta")), ValueError, r"weight must be on the device of features \(cpu\), got meta"),
    ("conv-even-kernel", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, N, C, 2, 2)), ValueError, r"odd kernel size"),
    ("conv-bias-shape", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, N, C, 3, 3), x(B, N + 1)), ValueError, r"bias must have shape \(b n\) = \(2, 4\), got shape \(2, 5\)"),
    ("conv-bias-int", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, N, C, 3, 3), torch.ones(B, N, dtype=torch.long)), TypeError, r"bias must be a floating-point tensor"),
    ("conv-channel-mismatch", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, N, C - 1, 3, 3)), ValueError, r"weight .*c = 16"),
    ("conv-unknown-method", lambda m: dynamic_conv2d(x(B, C, 8, 8), x(B, N, C, 3, 3), method="fft"), ValueError, r"method must be one of"),
    ("fuse-int-scores", lambda m: fuse_dynamic_kernels(x(B, N, C, 3, 3), x(B, N), torch.ones(B, N, dtype=torch.long)), TypeError, r"scores must be a floating-point tensor"),
    ("fuse-zero-queries", lambda m: fuse_dynamic_kernels(x(B, 0, C, 3, 3), x(B, 0), x(B, 0)), ValueError, r"weight .*n = 0"),
    ("fuse-bias-shape", lambda m: fuse_dynamic_kernels(x(B, N, C, 3, 3), x(B, N - 1), x(B, N)), ValueError, r"bias must have shape \(b n\) = \(2, 4\)"),
    ("fuse-scores-device", lambda m: fuse_dynamic_kernels(x(B, N, C, 3, 3), None, x(B, N, device="meta")), ValueError, r"scores must be on the device of weight"),
    ("fuse-scores-shape", lambda m: fuse_dynamic_kernels(x(B, N, C, 3, 3), None, x(B, N + 1)), ValueError, r"scores must have shape \(b n\) = \(2, 4\)"),
    ("split-int-params", lambda m: split_dynamic_params(torch.ones(B, N, C * 9 + 1, dtype=torch.long), C, 3), TypeError, r"params must be a floating-point tensor"),
    ("split-zero-queries", lambda m: split_dynamic_params(x(B, 0, C * 9 + 1), C, 3), ValueError, r"params .*n = 0"),
    ("split-zero-channels", lambda m: split_dynamic_params(x(B, N, 1), 0, 3), ValueError, r"in_channels must be a positive int, got 0"),
    ("split-float-kernel", lambda m: split_dynamic_params(x(B, N, C * 9 + 1), C, 3.0), ValueError, r"kernel_size must be a positive int, got 3.0"),
    ("split-wrong-p", lambda m: split_dynamic_params(x(B, N, C * 9), C, 3), ValueError, r"p = in_channels \* kernel_size\*\*2 \+ 1 = 16 \* 3\*\*2 \+ 1 = 145"),
    ("masksum-zero-queries", lambda m: weighted_mask_sum(x(B, 0, 8, 8), x(B, 0)), ValueError, r"masks .*n = 0"),
    ("masksum-int-scores", lambda m: weighted_mask_sum(x(B, N, 8, 8), torch.ones(B, N, dtype=torch.int64)), TypeError, r"scores must be a floating-point tensor"),
]


@pytest.mark.parametrize("name, call, exc, match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_gives_one_clear_error(mods, name, call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call(mods)
    # One message, not a torch traceback: raised by our checks (vlaligner), not inside torch.
    assert "vlaligner" in info.traceback[-1].path.as_posix() or "_validation" in str(info.traceback[-1].path)


# ------------------------------------------------------------------ right results
def _aligner_reference(aligner, feats, queries):
    out = aligner(feats, queries, return_query_masks=True)
    return out, weighted_mask_sum(out.query_masks, out.query_scores)


RESULT_CASES = ["aligner-one-query", "aligner-bf16-autocast", "gen-all-padding", "aligner-non-contiguous", "conv-1x1-einsum"]


@pytest.mark.parametrize("name", RESULT_CASES)
def test_edge_inputs_give_the_right_result(mods, name):
    if name == "aligner-one-query":  # n = 1: the score is 1 and the mask is the query's own
        out, ref = _aligner_reference(mods["aligner"], x(B, C, 8, 8), x(B, 1, D))
        torch.testing.assert_close(out.query_scores, torch.ones(B, 1))
        torch.testing.assert_close(out.logits, out.query_masks)
    elif name == "aligner-bf16-autocast":  # float32 inputs under CPU autocast: accepted, finite
        feats, queries = x(B, C, 8, 8), x(B, N, D)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mods["aligner"](feats, queries)
        full = mods["aligner"](feats, queries)
        assert torch.isfinite(out.logits).all()
        torch.testing.assert_close(out.logits.float(), full.logits, atol=0.1, rtol=0.1)
    elif name == "gen-all-padding":  # a sentence of padding only: zero queries, never NaN
        mask = WM.clone()
        mask[1] = False
        queries = mods["gen"](_feats(), x(B, 5, T), mask, x(B, 32))
        assert torch.isfinite(queries).all() and (queries[1] == 0).all() and (queries[0] != 0).any()
    elif name == "aligner-non-contiguous":  # a transposed (strided) feature map: same answer
        feats, queries = x(B, C, 8, 8), x(B, N, D)
        strided = feats.transpose(2, 3).contiguous().transpose(2, 3)
        assert not strided.is_contiguous()
        torch.testing.assert_close(mods["aligner"](strided, queries).logits, mods["aligner"](feats, queries).logits)
    elif name == "conv-1x1-einsum":
        feats, weight, bias = x(B, C, 5, 7), x(B, N, C, 1, 1), x(B, N)
        ref = torch.stack([torch.nn.functional.conv2d(feats[i:i + 1], weight[i], bias[i])[0] for i in range(B)])
        torch.testing.assert_close(dynamic_conv2d(feats, weight, bias), ref)


# ------------------------------------------------------------------ EAVL.forward
@pytest.fixture(scope="module")
def eavl():
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    return build_eavl_tiny(img_size=64, num_queries=3).eval()


def _ids(b=1, l=6):
    return torch.randint(1, 100, (b, l)), torch.ones(b, l, dtype=torch.long)


EAVL_CASES = [
    ("eavl-int-images", lambda m: m(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), *_ids()), TypeError, r"images must be a float tensor .*got dtype torch.uint8"),
    ("eavl-float64-images", lambda m: m(x(1, 3, 64, 64, dtype=torch.float64), *_ids()), TypeError, r"images must have the dtype of the model's weights \(torch.float32\) .*got dtype torch.float64"),
    ("eavl-zero-batch", lambda m: m(x(0, 3, 64, 64), *_ids(b=0)), ValueError, r"images .*b = 0"),
    ("eavl-zero-height", lambda m: m(x(1, 3, 0, 64), *_ids()), ValueError, r"images .*H = 0"),
    ("eavl-not-multiple-of-32", lambda m: m(x(1, 3, 60, 64), *_ids()), ValueError, r"multiples of 32"),
    ("eavl-channels-last", lambda m: m(x(1, 64, 64, 3), *_ids()), ValueError, r"images must have shape \(b 3 H W\)"),
    ("eavl-float-ids", lambda m: m(x(1, 3, 64, 64), _ids()[0].float(), _ids()[1]), TypeError, r"input_ids must be an integer tensor, got dtype torch.float32"),
    ("eavl-float-mask", lambda m: m(x(1, 3, 64, 64), _ids()[0], _ids()[1].float()), TypeError, r"attention_mask must be an integer or bool tensor .*torch.float32"),
    ("eavl-ids-outside-vocabulary", lambda m: m(x(1, 3, 64, 64), torch.full((1, 6), 10**6), _ids()[1]), ValueError, r"input_ids must be token ids in \[0, \d+\) .*got values in \[1000000, 1000000\]"),
    ("eavl-negative-ids", lambda m: m(x(1, 3, 64, 64), -_ids()[0], _ids()[1]), ValueError, r"input_ids must be token ids in \[0, \d+\)"),
    ("eavl-zero-tokens", lambda m: m(x(1, 3, 64, 64), *_ids(l=0)), ValueError, r"input_ids .*l = 0"),
    ("eavl-images-other-device", lambda m: m(x(1, 3, 64, 64, device="meta"), *_ids()), ValueError, r"images must be on the device of the model's weights \(cpu\)"),
    ("eavl-ids-other-device", lambda m: m(x(1, 3, 64, 64), _ids()[0].to("meta"), _ids()[1]), ValueError, r"input_ids must be on the model's device \(cpu\)"),
    ("eavl-batch-mismatch", lambda m: m(x(2, 3, 64, 64), *_ids(b=1)), ValueError, r"batch sizes must match, got images: 2, input_ids: 1"),
    ("eavl-too-many-tokens", lambda m: m(x(1, 3, 64, 64), *_ids(l=4000)), ValueError, r"positions"),
]


@pytest.mark.parametrize("name, call, exc, match", EAVL_CASES, ids=[c[0] for c in EAVL_CASES])
def test_eavl_bad_input_gives_one_clear_error(eavl, name, call, exc, match):
    with pytest.raises(exc, match=match):
        call(eavl)


def test_eavl_right_result_for_bool_mask_and_batch(eavl):
    """Accepted variants give the right result: a bool mask equals the int mask."""
    images = x(2, 3, 64, 64)
    ids, mask = _ids(b=2)
    with torch.no_grad():
        ref = eavl(images, ids, mask).logits
        torch.testing.assert_close(eavl(images, ids, mask.bool()).logits, ref)
        torch.testing.assert_close(eavl(images[:1], ids[:1], mask[:1]).logits, ref[:1], atol=1e-5, rtol=1e-4)
