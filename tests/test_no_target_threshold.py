"""The no-target threshold chosen on a validation split: the pure functions, the evaluation,
the checkpoint, the predictor and the training run that records it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlaligner.gres_metrics import GRESMetricAccumulator
from vlaligner.no_target_threshold import (
    DEFAULT_THRESHOLD_GRID,
    balanced_no_target_threshold,
    gres_scores_at_thresholds,
)


def test_balanced_threshold_by_hand() -> None:
    # no-target samples at 0.9 and 0.3; targeted ones at 0.2, 0.05 and 0.6
    prob = [0.9, 0.3, 0.2, 0.05, 0.6]
    flags = torch.tensor([True, True, False, False, False])
    # 0.1: N 2/2, T 1/3 -> 66.7; 0.25: N 2/2, T 2/3 -> 83.3; 0.5: N 1/2, T 2/3 -> 58.3
    chosen = balanced_no_target_threshold(prob, flags, [0.1, 0.25, 0.5])
    assert chosen.threshold == 0.25
    assert chosen.n_acc == 100.0 and chosen.t_acc == pytest.approx(200 / 3)
    assert chosen.balanced_accuracy == pytest.approx(250 / 3)
    # 0.3 and 0.35 tie (0.3 > 0.3 is False): the highest wins, in any order of the grid
    assert balanced_no_target_threshold(prob, flags, [0.3, 0.35]).threshold == 0.35
    assert balanced_no_target_threshold(prob, flags, [0.35, 0.3]).threshold == 0.35
    # the default grid: every P in [0.2, 0.3) gives N 2/2, T 2/3 (83.3), the best; [0.6, 0.9) N 1/2,
    # T 3/3 (75): the highest of the tied wins
    chosen = balanced_no_target_threshold(prob, flags)
    assert chosen.threshold == 0.29 and chosen.n_acc == 100.0 and chosen.t_acc == pytest.approx(200 / 3)
    assert DEFAULT_THRESHOLD_GRID[0] == 0.01 and DEFAULT_THRESHOLD_GRID[-1] == 0.99 and len(DEFAULT_THRESHOLD_GRID) == 99


def test_scores_at_thresholds_equal_relas_accumulator() -> None:
    """One batched op over the grid against the accumulator run once per threshold."""
    g = torch.Generator().manual_seed(3)
    s = 40
    flags = torch.rand(s, generator=g) < 0.3
    targets = torch.rand(s, 8, 8, generator=g) > 0.5
    targets[flags] = False
    targets[~flags, 0, 0] = True  # every targeted sample has a target
    preds = torch.rand(s, 8, 8, generator=g) > 0.5
    preds[3] = False  # an empty prediction of a targeted or no-target sample
    prob = torch.rand(s, generator=g)
    inter = (preds & targets).sum(dim=(1, 2)).double()
    union = (preds | targets).sum(dim=(1, 2)).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    grid = [0.05, 0.3, 0.5, 0.77]
    fast = gres_scores_at_thresholds(prob, flags, iou, grid)
    for k, t in enumerate(grid):
        acc = GRESMetricAccumulator()
        acc.update(preds, targets, prob.double() > t, flags)
        plain = acc.compute()
        for key in ("gIoU", "N-acc", "T-acc"):
            assert float(fast[key][k]) == pytest.approx(plain[key], abs=1e-6), (t, key)
    assert fast["threshold"].tolist() == grid


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="needs both kinds of samples; the split has 0 no-target and 2 targeted"):
        balanced_no_target_threshold([0.1, 0.2], torch.tensor([False, False]))
    with pytest.raises(TypeError, match=r"no_target must be bool \(True = no target\), got dtype torch.int64"):
        balanced_no_target_threshold([0.1, 0.2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"no_target_probability must be in \[0, 1\], got values from 0.1 to 1.5"):
        balanced_no_target_threshold([0.1, 1.5], torch.tensor([False, True]))
    with pytest.raises(ValueError, match=r"one value per sample in each: no_target_probability \(2,\), no_target \(3,\)"):
        gres_scores_at_thresholds([0.1, 0.2], torch.tensor([False, True, True]), [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"thresholds must be a non-empty sequence of numbers in \(0, 1\)"):
        balanced_no_target_threshold([0.1, 0.2], torch.tensor([False, True]), [0.0, 0.5])
    with pytest.raises(ValueError, match=r"shape \(s\), got shape \(1, 2\)"):
        balanced_no_target_threshold([[0.1, 0.2]], torch.tensor([False, True]))


def test_gres_evaluate_chooses_the_threshold_it_then_scores() -> None:
    """The balanced keys equal a plain evaluation at the chosen threshold, and no grid point does better."""
    from test_no_target import _FakeGRESModel, _fake_gres_batches

    from vlaligner.gres_eval import BALANCED_KEYS, gres_evaluate

    batches = _fake_gres_batches(n_batches=6, b=5)
    result = gres_evaluate(_FakeGRESModel(), batches, at_original_size=False, choose_no_target_threshold=True)
    assert set(BALANCED_KEYS) <= set(result)
    chosen = result["balanced_threshold"]
    at = gres_evaluate(_FakeGRESModel(), batches, at_original_size=False, no_target_threshold=chosen)
    assert result["gIoU@balanced"] == pytest.approx(at["gIoU"], abs=1e-6)
    assert result["N-acc@balanced"] == pytest.approx(at["N-acc"]) and result["T-acc@balanced"] == pytest.approx(at["T-acc"])
    best = result["N-acc@balanced"] + result["T-acc@balanced"]
    for t in (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        plain = gres_evaluate(_FakeGRESModel(), batches, at_original_size=False, no_target_threshold=t)
        assert plain["N-acc"] + plain["T-acc"] <= best + 1e-9, t
    # without the option the keys are absent; a split without no-target samples gives nan
    assert "balanced_threshold" not in gres_evaluate(_FakeGRESModel(), batches, at_original_size=False)
    targeted = [dict(b, no_target=torch.zeros_like(b["no_target"]), num_targets=b["num_targets"].clamp(min=1))
                for b in batches]
    for b in targeted:
        b["mask"][:, 0, 0] = 1.0
    assert math.isnan(gres_evaluate(_FakeGRESModel(), targeted, at_original_size=False,
                                    choose_no_target_threshold=True)["balanced_threshold"])


# ------------------------------------------------------------------------------ checkpoint
def test_the_threshold_travels_with_the_checkpoint(tmp_path: Path) -> None:
    from vlaligner.models import EAVL, build_eavl_tiny
    from vlaligner.predictor import Predictor

    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=64, num_queries=2, no_target=True)
    assert model.no_target_threshold == 0.5 and model.no_target_threshold_source == "default"
    model.no_target_threshold = 0.07
    model.no_target_threshold_source = "max (N-acc + T-acc) / 2 on val at step 3"
    folder = model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["no_target_threshold"] == 0.07
    loaded = EAVL.from_pretrained(folder)
    assert loaded.no_target_threshold == 0.07
    assert loaded.no_target_threshold_source == "max (N-acc + T-acc) / 2 on val at step 3"
    assert Predictor(loaded).no_target_threshold == 0.07  # the predictor's default
    assert Predictor(loaded, no_target_threshold=0.5).no_target_threshold == 0.5  # unless given
    assert Predictor.from_pretrained(folder).no_target_threshold == 0.07
    # a classic model records none and predicts with 0.5
    classic = build_eavl_tiny(img_size=64, num_queries=2).save_pretrained(tmp_path / "classic")
    assert "no_target_threshold" not in json.loads((classic / "config.json").read_text())
    # a bad value is refused, naming the file and the value
    config["no_target_threshold"] = 1.5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: no_target_threshold must be a probability in \(0, 1\), got 1.5"):
        EAVL.from_pretrained(folder)
    config["no_target_threshold"] = "0.3"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: no_target_threshold must be a probability in \(0, 1\), got str '0.3'"):
        EAVL.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"no_target_threshold must be a probability in \(0, 1\), got 0"):
        model.no_target_threshold = 0
    with pytest.raises(TypeError, match=r"no_target_threshold must be a probability in \(0, 1\), got bool True"):
        model.no_target_threshold = True


# ------------------------------------------------------------------------------ training and evaluate.py
def test_training_records_and_evaluate_uses_the_chosen_threshold(tmp_path: Path, capsys) -> None:
    from test_train import _argv

    from vlaligner.data.cache import ensure_synthetic_set
    from vlaligner.training.commands import evaluate_main, train_main

    gsynth = ensure_synthetic_set(tmp_path / "gset", num_images=8, seed=0, generalized=True)
    out = tmp_path / "gres"
    # testA of this 8-image set holds both kinds of sentences (val none without a target)
    argv = _argv(gsynth, out, "--max-steps", "2", "--dataset", "grefcoco", "--eval-every", "1",
                 "--val-split", "testA", "--val-samples", "9")
    argv[argv.index("--cache-dir") + 1] = str(gsynth)
    assert train_main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["metrics"]
    config = json.loads((out / "last" / "config.json").read_text())
    assert config["no_target_threshold"] == last["balanced_threshold"]
    assert config["no_target_threshold_source"] == f"max (N-acc + T-acc) / 2 on testA at step {rows[-1]['step']}"
    best_step = json.loads((out / "best" / "training_state.json").read_text())["best_step"]
    best_row = next(r for r in rows if r["step"] == best_step)
    # best/ is picked by gIoU at the threshold it records (the first of equal scores wins)
    assert best_row["metrics"]["gIoU@balanced"] == max(r["metrics"]["gIoU@balanced"] for r in rows)
    assert best_step == next(r["step"] for r in rows if r["metrics"]["gIoU@balanced"] == best_row["metrics"]["gIoU@balanced"])
    assert json.loads((out / "best" / "config.json").read_text())["no_target_threshold"] == (
        best_row["metrics"]["balanced_threshold"]
    )
    log = (out / "train.log").read_text()
    assert "no-target threshold chosen on testA" in log
    assert f"new best (gIoU@balanced {rows[0]['metrics']['gIoU@balanced']:.2f})" in log
    assert "balanced_threshold gIoU@balanced N-acc@balanced T-acc@balanced" in log  # the final table
    # evaluate.py on that split with the recorded threshold reproduces the training's balanced numbers
    capsys.readouterr()
    common = ["--checkpoint", str(out / "last"), "--split", "testA", "--num-workers", "0", "--no-progress"]
    assert evaluate_main(common + ["--output", str(tmp_path / "rec.json")]) == 0
    err = capsys.readouterr().err
    assert f"no-target threshold {config['no_target_threshold']:g} (the checkpoint's: max (N-acc + T-acc)" in err
    recorded = json.loads((tmp_path / "rec.json").read_text())["testA"]
    assert recorded["no_target_threshold"] == config["no_target_threshold"]
    for key in ("N-acc", "T-acc", "gIoU"):
        assert recorded[key] == pytest.approx(last[f"{key}@balanced"], abs=1e-6), key
    assert evaluate_main(common + ["--no-target-threshold", "0.5", "--output", str(tmp_path / "half.json")]) == 0
    assert "no-target threshold 0.5 (--no-target-threshold)" in capsys.readouterr().err
    half = json.loads((tmp_path / "half.json").read_text())["testA"]
    for key in ("N-acc", "T-acc", "gIoU"):
        assert half[key] == pytest.approx(last[key], abs=1e-6), key
    # --no-choose-no-target-threshold: the checkpoints keep 0.5
    off = tmp_path / "off"
    argv = _argv(gsynth, off, "--max-steps", "1", "--dataset", "grefcoco", "--no-choose-no-target-threshold",
                 "--val-split", "testA", "--val-samples", "9")
    argv[argv.index("--cache-dir") + 1] = str(gsynth)
    assert train_main(argv) == 0
    assert json.loads((off / "last" / "config.json").read_text())["no_target_threshold"] == 0.5
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(off / "last"), "--split", "testA", "--num-workers", "0",
                          "--no-progress", "--output", str(tmp_path / "off.json")]) == 0
    assert "no-target threshold 0.5 (the default: no threshold was chosen for this checkpoint)" in capsys.readouterr().err


def test_best_is_picked_at_the_recorded_threshold() -> None:
    from vlaligner.training.trainer import selection_key

    chosen = {"gIoU": 40.0, "cIoU": 35.0, "gIoU@balanced": 44.0, "balanced_threshold": 0.2}
    assert selection_key(chosen, "gIoU") == "gIoU@balanced"
    assert selection_key(chosen, "cIoU") == "cIoU"  # no cIoU at the chosen threshold: at 0.5
    none_chosen = {"gIoU": 40.0, "gIoU@balanced": math.nan}  # val without one of the two kinds
    assert selection_key(none_chosen, "gIoU") == "gIoU"
    assert selection_key({"gIoU": 40.0}, "gIoU") == "gIoU"  # --no-choose-no-target-threshold
    assert selection_key({"mIoU": 50.0, "oIoU": 48.0}, "mIoU") == "mIoU"
    with pytest.raises(KeyError, match="best metric 'oIoU' is not among the evaluation's metrics"):
        selection_key({"gIoU": 1.0}, "oIoU")


def test_resume_restores_the_recorded_threshold(tmp_path: Path) -> None:
    """Until the next evaluation chooses again, a resumed run saves the threshold last/ recorded."""
    from types import SimpleNamespace

    from vlaligner.models import build_eavl_tiny
    from vlaligner.training.trainer import Trainer

    torch.manual_seed(0)
    saved = build_eavl_tiny(img_size=64, num_queries=2, no_target=True)
    saved.no_target_threshold, saved.no_target_threshold_source = 0.13, "max (N-acc + T-acc) / 2 on val at step 7"
    folder = saved.save_pretrained(tmp_path / "last")
    fresh = build_eavl_tiny(img_size=64, num_queries=2, no_target=True)
    Trainer._restore_no_target_threshold(SimpleNamespace(model=fresh), folder)
    assert fresh.no_target_threshold == 0.13
    assert fresh.no_target_threshold_source == "max (N-acc + T-acc) / 2 on val at step 7"
    # a folder without the key (a classic checkpoint) leaves the model's as it is
    classic = build_eavl_tiny(img_size=64, num_queries=2).save_pretrained(tmp_path / "classic")
    Trainer._restore_no_target_threshold(SimpleNamespace(model=fresh), classic)
    assert fresh.no_target_threshold == 0.13


def test_a_probability_may_be_any_real_number_type_but_not_a_bool_or_text() -> None:
    import numpy as np

    from vlaligner._validation import check_probability

    assert check_probability("p", np.float32(0.25)) == pytest.approx(0.25)
    assert check_probability("p", torch.tensor(0.75)) == 0.75 and check_probability("p", np.float64(0.5)) == 0.5
    for bad, error in ((True, TypeError), (np.bool_(False), TypeError), ("0.3", TypeError),
                       (torch.tensor([0.1, 0.2]), TypeError), (float("nan"), ValueError), (1, ValueError)):
        with pytest.raises(error, match="p must be a probability in \\(0, 1\\)"):
            check_probability("p", bad)
