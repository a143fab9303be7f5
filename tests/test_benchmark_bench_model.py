"""benchmarks/bench_model.py: the kernel steps it times compute what the heads compute."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("mask_coords", [True, False])
def test_kernel_steps_match_the_heads(load_benchmark, mask_coords):
    bench = load_benchmark("bench_model")
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    kwargs = dict(img_size=64, mask_coords=mask_coords)
    fixed, aligner = build_eavl_tiny(head="fixed", **kwargs).eval(), build_eavl_tiny(**kwargs).eval()
    ids, mask = aligner.tokenize(["the red circle on the left", "the big square"])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fixed_in = bench.capture_head_inputs(fixed, images, ids, mask)
        aligner_in = bench.capture_head_inputs(aligner, images, ids, mask)
        steps = bench.kernel_steps(fixed.head, aligner.head, fixed_in, aligner_in)
        expected_fixed = fixed.head(*fixed_in).logits
        expected = aligner.head(*aligner_in, return_query_masks=True)
        fused_logits, no_masks = steps["aligner (fused)"]()
        unfused_logits, masks = steps["aligner (unfused)"]()
        fixed_logits = steps["fixed"]()
    assert no_masks is None
    torch.testing.assert_close(fixed_logits, expected_fixed)
    torch.testing.assert_close(fused_logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unfused_logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(masks, expected.query_masks, rtol=1e-4, atol=1e-4)
