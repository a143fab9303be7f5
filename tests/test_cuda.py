"""CUDA paths against the CPU: skipped without a GPU (CI has none; run on a GPU machine with
``pytest -q -k cuda``, as ``benchmarks/gpu_session.sh`` does).

Axis legend: b batch, n queries, c channels, h w space, k kernel size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlaligner.functional import _METHODS, dynamic_conv2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _loop_dynamic_conv(features, weight, bias):
    """The plain loop ``dynamic_conv2d`` stands for: one F.conv2d per sample. (b n h w)"""
    k = weight.shape[-1]
    return torch.cat([F.conv2d(features[i : i + 1], weight[i], bias[i], padding=k // 2)
                      for i in range(features.shape[0])])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("method", sorted(_METHODS) + ["auto"])
def test_cuda_dynamic_conv_matches_the_cpu_loop(method, k):
    if method == "einsum" and k != 1:
        pytest.skip("einsum takes 1x1 kernels only")
    features, weight, bias = torch.randn(3, 16, 9, 11), torch.randn(3, 5, 16, k, k), torch.randn(3, 5)
    expected = _loop_dynamic_conv(features, weight, bias)
    got = dynamic_conv2d(features.cuda(), weight.cuda(), bias.cuda(), method=method)
    assert got.shape == (3, 5, 9, 11) and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)


@pytest.fixture
def full_float32():
    """cuDNN convolutions (and, if set, matmuls) may use TF32, a 10-bit mantissa: compare in
    full float32, and restore the settings after the test."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


def test_cuda_tiny_eavl_matches_cpu_forward_and_gradients(full_float32):
    """Forward and every parameter's gradient on CUDA against the CPU. Gradients are judged
    against a float64 CPU reference: the GPU's float32 error may be at most 10x the CPU's
    float32 error (plus 1e-3 of the gradient), since some gradients are zero up to rounding
    (the estimator's, while the queries' masks are alike) and float32 alone moves them."""
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    cpu = build_eavl_tiny(img_size=64, num_queries=4).eval()
    gpu = build_eavl_tiny(img_size=64, num_queries=4).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    exact = build_eavl_tiny(img_size=64, num_queries=4).eval()
    exact.load_state_dict(cpu.state_dict())
    exact.double()
    ids, mask = cpu.tokenize(["the red circle on the left", "a small blue square"])
    images = torch.randn(2, 3, 64, 64)
    out_cpu = cpu(images, ids, mask)
    out_gpu = gpu(images.cuda(), ids.cuda(), mask.cuda())
    torch.testing.assert_close(out_gpu.logits.cpu(), out_cpu.logits, rtol=1e-3, atol=1e-3)
    out_cpu.logits.sum().backward()
    out_gpu.logits.sum().backward()
    exact(images.double(), ids, mask).logits.sum().backward()
    checked = 0
    for (name, p_cpu), p_gpu, p_exact in zip(cpu.named_parameters(), gpu.parameters(), exact.parameters()):
        if p_cpu.grad is None:
            continue
        reference = p_exact.grad
        cpu_error = (p_cpu.grad.double() - reference).norm()
        gpu_error = (p_gpu.grad.cpu().double() - reference).norm()
        bound = 10 * cpu_error + 1e-3 * reference.norm() + 1e-6
        assert gpu_error <= bound, f"{name}: CUDA gradient error {gpu_error:.2e}, CPU float32's {cpu_error:.2e}"
        checked += 1
    assert checked > 50


def test_cuda_training_with_bf16_autocast_saves_a_checkpoint_the_cpu_reads(tmp_path: Path):
    """Three steps of examples/train_eavl.py on CUDA with --amp bf16; the checkpoint loads on the
    CPU and predicts what the GPU model predicts (float32 on both sides)."""
    from vlaligner.models import EAVL
    from vlaligner.training.commands import train_main

    out = tmp_path / "run"
    small = json.dumps({"dim": 32, "mask_channels": 8, "up_channels": [16, 8], "decoder_layers": 1,
                        "decoder_heads": 2, "ffn_dim": 64})
    argv = ["--model", "tiny", "--model-kwargs", small, "--img-size", "64", "--cache-dir", str(tmp_path / "synthetic"),
            "--synthetic-images", "8", "--train-samples", "6", "--val-samples", "3", "--batch-size", "2",
            "--max-steps", "3", "--epochs", "5", "--num-workers", "0", "--device", "cuda", "--amp", "bf16",
            "--no-progress", "--output-dir", str(out)]
    assert train_main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows and all(torch.isfinite(torch.tensor(float(r["metrics"]["mIoU"]))) for r in rows)
    model_cpu = EAVL.from_pretrained(out / "last")
    model_gpu = EAVL.from_pretrained(out / "last", map_location="cuda")
    ids, mask = model_cpu.tokenize(["the red circle"])
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model_cpu(images, ids, mask).logits
        got = model_gpu(images.cuda(), ids.cuda(), mask.cuda()).logits
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)
