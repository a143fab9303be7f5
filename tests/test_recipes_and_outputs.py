"""Recipe resolution (model and flags -> the recipe a run uses and records), the warm-up of the
schedule, and the output folder's ownership rules (a run never touches files it did not write).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vlaligner.fileio import read_jsonl, rewrite_jsonl
from vlaligner.training.options import UsageError, resolve_train_args
from vlaligner.training.outputs import MANIFEST_NAME, OutputDirError, RunManifest, check_output_dir
from vlaligner.training.recipes import RECIPES, resolve_recipe
from vlaligner.training.schedule import PolyDecay, build_poly_scheduler


# ------------------------------------------------------------------------------ recipes
def test_each_model_gets_its_recipe():
    assert resolve_recipe("swin-b") == RECIPES["paper-finetune"]
    assert resolve_recipe("tiny") == RECIPES["scratch-small"]
    paper = RECIPES["paper-finetune"]
    assert (paper.optimizer, paper.lr, paper.warmup_steps, paper.dice_weight) == ("adam", 5e-5, 0, 0.0)
    small = RECIPES["scratch-small"]
    assert (small.optimizer, small.lr, small.weight_decay, small.warmup_steps, small.clip_grad, small.dice_weight) == (
        "adamw", 5e-4, 0.01, 200, 1.0, 1.0)
    # the from-scratch recipes take the loss where the evaluation reads the masks; the paper's as CRIS
    assert RECIPES["scratch-small"].upsample_logits and RECIPES["demo"].upsample_logits
    assert not paper.upsample_logits and not RECIPES["adam-poly"].upsample_logits
    # the flip with left/right swap: the tiny default's and (since session 12) the demo's
    assert RECIPES["scratch-small"].augment and RECIPES["demo"].augment
    assert not any(RECIPES[name].augment for name in ("paper-finetune", "adam-poly"))
    # the demo's recipe is scratch-small under the name the demo has always recorded
    assert dataclasses.replace(RECIPES["demo"], name="scratch-small") == RECIPES["scratch-small"]


def test_explicit_fields_override_and_rename_the_recipe():
    recipe = resolve_recipe("tiny", None, {"lr": 1e-3, "clip_grad": None})
    assert recipe.lr == 1e-3 and recipe.clip_grad == 1.0 and recipe.name == "scratch-small+custom"
    # a field given with the recipe's own value changes nothing
    assert resolve_recipe("tiny", None, {"lr": 5e-4}).name == "scratch-small"
    assert resolve_recipe("tiny", "paper-finetune").optimizer == "adam"


@pytest.mark.parametrize("name, overrides, message", [
    ("nope", {}, "unknown recipe 'nope'"),
    (None, {"momentum": 0.9}, "unknown recipe fields"),
    (None, {"lr": -1.0}, "lr must be positive"),
    (None, {"optimizer": "sgd"}, "optimizer must be 'adam' or 'adamw'"),
])
def test_bad_recipes_are_refused(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_recipe("tiny", name, overrides)


def test_command_line_resolves_and_records_the_recipe(tmp_path):
    args = resolve_train_args(["--model", "tiny", "--device", "cpu", "--output-dir", str(tmp_path / "a")])
    assert args.recipe == "scratch-small" and args.optimizer == "adamw" and args.warmup_steps == 200
    assert args.recipe_fields["mask_bias_init"] == pytest.approx(-2.2)
    args = resolve_train_args(["--model", "tiny", "--recipe", "paper-finetune", "--warmup-steps", "10",
                               "--device", "cpu", "--output-dir", str(tmp_path / "b")])
    assert (args.recipe, args.optimizer, args.lr, args.warmup_steps) == ("paper-finetune+custom", "adam", 5e-5, 10)
    with pytest.raises(UsageError, match="lr must be positive"):
        resolve_train_args(["--model", "tiny", "--lr", "0", "--device", "cpu", "--output-dir", str(tmp_path / "c")])
    args = resolve_train_args(["--model", "tiny", "--no-upsample-logits", "--device", "cpu",
                               "--output-dir", str(tmp_path / "d")])
    assert args.recipe == "scratch-small+custom" and args.recipe_fields["upsample_logits"] is False
    assert "on the logits' grid" in resolve_recipe("tiny", None, {"upsample_logits": False}).describe()
    assert "at the input size" in resolve_recipe("tiny").describe()
    # --augment / --no-augment are recipe fields too, and reach the loader's switch
    assert args.augment is True and "flip with left/right swap" in resolve_recipe("tiny").describe()
    args = resolve_train_args(["--model", "tiny", "--no-augment", "--device", "cpu", "--output-dir", str(tmp_path / "e")])
    assert (args.recipe, args.augment, args.recipe_fields["augment"]) == ("scratch-small+custom", False, False)
    args = resolve_train_args(["--demo", "--no-augment", "--output-dir", str(tmp_path / "f")])
    assert (args.recipe, args.augment) == ("demo+custom", False)
    assert resolve_train_args(["--demo", "--output-dir", str(tmp_path / "g")]).augment is True
    assert "no augmentation" in resolve_recipe("swin-b").describe()


# ------------------------------------------------------------------------------ schedule
def test_warmup_then_poly_decay():
    decay = PolyDecay(total_steps=100, power=1.0, warmup_steps=10)
    assert decay(0) == pytest.approx(0.1 * 1.0)
    assert decay(4) == pytest.approx(0.5 * 0.96)
    assert decay(10) == pytest.approx(0.9)
    assert decay(100) == 0.0
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_poly_scheduler(opt, total_steps=20, power=0.9, warmup_steps=5)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == sorted(seen[:5]) and seen[4] == max(seen)
    assert seen[5:] == sorted(seen[5:], reverse=True)
    # the warm-up travels with the scheduler's state (exact resume)
    assert sched.state_dict()["lr_lambdas"][0]["warmup_steps"] == 5


# ------------------------------------------------------------------------------ outputs
def _snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_fresh_or_empty_folder_is_fine(tmp_path):
    check_output_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", resume=False, overwrite=False)


def test_an_earlier_run_needs_resume_or_overwrite_and_overwrite_removes_only_its_files(tmp_path):
    manifest = RunManifest(tmp_path)
    manifest.add("losses.jsonl", "last")
    (tmp_path / "losses.jsonl").write_text("{}\n")
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "model.safetensors").write_bytes(b"w")
    with pytest.raises(OutputDirError, match="pass --resume to continue it or --overwrite"):
        check_output_dir(tmp_path, resume=False, overwrite=False)
    check_output_dir(tmp_path, resume=True, overwrite=False)
    check_output_dir(tmp_path, resume=False, overwrite=True)
    assert RunManifest(tmp_path).remove_own_files() == ["last", "losses.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_files_a_run_did_not_write_are_refused_whatever_the_options(tmp_path):
    RunManifest(tmp_path).add("train.log")
    (tmp_path / "train.log").write_text("run\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "best").mkdir()  # a name a run uses, but not recorded as this run's
    (tmp_path / "best" / "model.safetensors").write_bytes(b"mine")
    before = _snapshot(tmp_path)
    for resume, overwrite in ((False, False), (True, False), (False, True)):
        with pytest.raises(OutputDirError, match=r"holds files no vlaligner run wrote \(best, notes.txt\)"):
            check_output_dir(tmp_path, resume=resume, overwrite=overwrite)
    assert _snapshot(tmp_path) == before
    with pytest.raises(OutputDirError, match="is a file"):
        check_output_dir(tmp_path / "notes.txt", resume=False, overwrite=False)


def test_manifest_refuses_names_a_run_does_not_write(tmp_path):
    with pytest.raises(ValueError, match="not a file a training run writes"):
        RunManifest(tmp_path).add("photo.jpg")


def test_rewrite_jsonl_is_atomic_and_keeps_rows(tmp_path):
    path = tmp_path / "losses.jsonl"
    rewrite_jsonl(path, [{"step": 1}, {"step": 2}])
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    rewrite_jsonl(path, [])
    assert path.read_text() == "" and not list(tmp_path.glob(".*.tmp"))
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')  # cut by a kill
    assert read_jsonl(path) == [{"step": 1}]


def test_evaluating_on_the_other_kind_of_set_uses_that_kind_of_cache(tmp_path):
    from vlaligner.data.cache import default_cache_dir
    from vlaligner.training.options import resolve_eval_args

    ckpt = tmp_path / "best"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    gref_cache = tmp_path / "gref-cache"
    (ckpt / "training_state.json").write_text(json.dumps(
        {"args": {"dataset": "grefcoco", "split_by": "unc", "cache_dir": str(gref_cache), "synthetic_images": 40}}
    ))
    same = resolve_eval_args(["--checkpoint", str(ckpt), "--device", "cpu"])
    assert same.dataset == "grefcoco" and same.cache_dir == gref_cache
    # a generalized checkpoint scored on the classic set must not regenerate its gRefCOCO folder
    other = resolve_eval_args(["--checkpoint", str(ckpt), "--dataset", "refcoco", "--device", "cpu"])
    assert other.cache_dir == default_cache_dir(generalized=False) != gref_cache
    assert other.synthetic_images == 40


def test_resume_names_every_changed_recipe_field_and_the_loss_of_older_runs(tmp_path):
    from vlaligner.training.trainer import changed_run_args

    args = resolve_train_args(["--model", "tiny", "--device", "cpu", "--output-dir", str(tmp_path / "a")])
    saved = {k: v for k, v in vars(args).items() if k in ("model", "recipe", "lr", "dice_weight", "upsample_logits")}
    assert changed_run_args(saved, args) == []
    saved.update(lr=1e-3, dice_weight=0.0)
    assert changed_run_args(saved, args) == [("lr", 5e-4, 1e-3), ("dice_weight", 1.0, 0.0)]
    # a checkpoint saved before the field existed trained on the logits' grid
    del saved["upsample_logits"]
    assert ("upsample_logits", True, False) in changed_run_args(saved, args)
