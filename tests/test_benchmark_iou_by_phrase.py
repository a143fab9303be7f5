"""benchmarks/iou_by_phrase.py: validation IoU grouped by the sentences' position / size word."""

from __future__ import annotations

import pytest


def test_phrase_group_takes_the_first_position_word_then_a_size_word(load_benchmark):
    bench = load_benchmark("iou_by_phrase")
    assert bench.phrase_group("the red circle on the left") == "left"
    assert bench.phrase_group("The BIG star at the top") == "top"  # position before size
    assert bench.phrase_group("the big star") == "big"
    assert bench.phrase_group("the purple cross") == "none"
    assert bench.phrase_group("leftmost guy") == "none"  # whole words only
    with pytest.raises(TypeError, match="sentence must be a str, got int"):
        bench.phrase_group(3)


def test_group_scores_on_hand_computed_values(load_benchmark):
    bench = load_benchmark("iou_by_phrase")
    sentences = ["the top one", "the circle at the top", "the red star", "the big square"]
    table = bench.group_scores(sentences, [0.2, 0.8, 0.5, 1.0])
    assert list(table) == ["big", "none", "top", "all"]
    assert table["top"] == pytest.approx((2, 50.0, 50.0))
    assert table["none"] == pytest.approx((1, 50.0, 100.0))  # IoU 0.5 counts as found
    assert table["all"] == pytest.approx((4, 62.5, 75.0))
    with pytest.raises(ValueError, match="one IoU per sentence: got 4 sentences and 3 IoUs"):
        bench.group_scores(sentences, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"an IoU must be in \[0, 1\], got 1.5"):
        bench.group_scores(["x"], [1.5])


def test_command_scores_a_checkpoint_like_the_evaluation(load_benchmark, tmp_path, capsys):
    import torch

    from vlaligner.data import RefDataset, collate_ref_batch, generate_synthetic_refcoco
    from vlaligner.metrics import ris_metrics
    from vlaligner.models import EAVL, build_eavl_tiny
    from vlaligner.training.evaluation import predict_masks

    bench = load_benchmark("iou_by_phrase")
    root = generate_synthetic_refcoco(tmp_path / "s", num_images=6, seed=0)
    torch.manual_seed(0)
    build_eavl_tiny(img_size=64, num_queries=2).save_pretrained(tmp_path / "m")
    sentences, ious = bench.sentence_ious(tmp_path / "m", root, "refcoco", "unc", "val", batch_size=3)
    # the same per-sentence IoUs as the evaluation's metrics give
    model = EAVL.from_pretrained(tmp_path / "m").eval()
    data = RefDataset(root, "refcoco", "unc", "val", tokenizer=model.tokenize, img_size=64)
    batch = collate_ref_batch([data[i] for i in range(len(data))])
    with torch.no_grad():
        preds = predict_masks(model, batch, device="cpu")
    expected = ris_metrics(preds, [torch.as_tensor(m).bool() for m in batch["orig_mask"]])
    assert len(ious) == len(data) == len(sentences)
    assert 100 * sum(ious) / len(ious) == pytest.approx(expected["mIoU"])
    assert bench.main([str(tmp_path / "m"), "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "| all | %d |" % len(data) in out


def test_a_folder_that_is_not_a_checkpoint_is_refused(load_benchmark, tmp_path):
    bench = load_benchmark("iou_by_phrase")
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path)])
