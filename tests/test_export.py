"""ONNX export of the tiny EAVL and onnxruntime against PyTorch (tolerance ONNX_TOLERANCE).

Axes: b batch, l tokens, n queries, S input side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlaligner.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from vlaligner.export import (  # noqa: E402
    ONNX_TOLERANCE,
    check_export_matches,
    example_inputs,
    export_onnx,
    onnx_session,
    run_onnx,
)

IMG = 64


# ``tiny`` (build_eavl_tiny at 64 px, 4 queries, eval mode, one per module) is in conftest.py.


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return export_onnx(tiny, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_graph_inputs_outputs_and_dynamic_axes(exported):
    session = onnx_session(exported, threads=1)
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["image", "input_ids", "attention_mask"]
    assert inputs["image"].shape[1:] == [3, IMG, IMG]
    # batch and sentence length are symbolic (strings), not fixed numbers
    assert isinstance(inputs["image"].shape[0], str)
    assert all(isinstance(d, str) for d in inputs["input_ids"].shape)
    assert [o.name for o in session.get_outputs()] == ["mask_logits", "query_scores"]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [6, 17])
def test_onnxruntime_matches_pytorch(tiny, exported, batch, length):
    session = onnx_session(exported, threads=1)
    image, _, _ = example_inputs(tiny, batch_size=batch, seed=batch + length)
    sentences = ["the dog on the left", "a red car", "the tall man in a long blue coat"][:batch]
    input_ids, attention_mask = tiny.tokenize(sentences, max_length=length)
    got = run_onnx(session, image, input_ids, attention_mask)
    with torch.no_grad():
        want = tiny(image, input_ids, attention_mask)
    assert got["mask_logits"].shape == (batch, 1, IMG // 4, IMG // 4)
    assert got["query_scores"].shape == (batch, 4)
    np.testing.assert_allclose(got["mask_logits"], want.logits.numpy(), atol=ONNX_TOLERANCE, rtol=0)
    np.testing.assert_allclose(got["query_scores"], want.query_scores.numpy(), atol=ONNX_TOLERANCE, rtol=0)
    # Padding really is honoured: the rows differ where the sentences differ.
    if batch > 1:
        assert not np.allclose(got["mask_logits"][0], got["mask_logits"][1])


def test_a_model_with_mask_skips_exports_and_matches(tmp_path):
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=IMG, num_queries=4, mask_skips=True).eval()
    path = export_onnx(model, tmp_path / "skips.onnx")
    image, input_ids, attention_mask = example_inputs(model, batch_size=2, seed=0)
    got = run_onnx(onnx_session(path, threads=1), image, input_ids, attention_mask)
    with torch.no_grad():
        want = model(image, input_ids, attention_mask).logits.numpy()
    np.testing.assert_allclose(got["mask_logits"], want, atol=ONNX_TOLERANCE, rtol=0)


def test_check_export_matches_detects_another_model(tiny, exported):
    assert check_export_matches(tiny, exported, batch_sizes=(2,), lengths=(9,)) <= ONNX_TOLERANCE
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(1)
    other = build_eavl_tiny(img_size=IMG, num_queries=4).eval()
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        check_export_matches(other, exported, batch_sizes=(1,), lengths=(9,))


def test_export_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="opset must be an int >= 17"):
        export_onnx(tiny, tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="model must be an EAVL"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_command_refuses_before_loading(tiny, tmp_path, capsys):
    ckpt = tiny.save_pretrained(tmp_path / "ckpt")
    existing = tmp_path / "have.onnx"
    existing.write_bytes(b"mine")
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(existing)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"mine"
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "x.txt")]) == 2
    assert "must end with .onnx" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "x.onnx"), "--opset", "12"]) == 2
    assert "--opset must be at least 17" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(ckpt / "in.onnx")]) == 2
    assert "inside the checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
def test_export_command_end_to_end(tiny, tmp_path, capsys):
    ckpt = tiny.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eavl.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "opset 18" in printed and "checked with onnxruntime" in printed and out.is_file()
