"""End-to-end tests of training and evaluation (vlaligner.training, the example scripts and
``vlaligner train``) on a tiny synthetic set.

Axis legend: b batch, S input size (64 here), h w logit grid (S / 4).

Every run uses a shrunken tiny model (width 32) and 64 x 64 inputs, a handful of steps, and a
synthetic set of 8 images generated once per module, so that the file stays well under a
minute on 2 cores. The two-process torchrun run is in ``test_torchrun_two_processes``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("pycocotools")

from safetensors.torch import load_file  # noqa: E402

from vlaligner.data import ensure_synthetic_set  # noqa: E402
from vlaligner.training import checkpoint as ckpt  # noqa: E402
from vlaligner.training import options, trainer  # noqa: E402
from vlaligner.training.commands import evaluate_main, train_main  # noqa: E402
from vlaligner.training.distributed import DistEnv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

#: A tiny model shrunk further for tests (dropout 0.1, so that restoring RNG states matters).
SMALL = json.dumps({
    "dim": 32, "mask_channels": 16, "up_channels": [32, 32], "ffn_dim": 64, "decoder_layers": 1,
    "dropout": 0.1, "backbone": "convnext_atto",
    "backbone_kwargs": {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "set"
    ensure_synthetic_set(root, num_images=8, seed=0)
    return root


def _argv(synthetic: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--model-kwargs", SMALL, "--img-size", "64",
        "--cache-dir", str(synthetic), "--synthetic-images", "8",
        "--train-samples", "6", "--val-samples", "3", "--batch-size", "2",
        "--lr", "1e-3", "--warmup-steps", "0", "--num-workers", "0", "--device", "cpu", "--no-progress",
        "--output-dir", str(out), *extra,
    ]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ fast failures
def _fail(argv, capsys, env=None) -> str:
    """Run resolve-and-exit like main() does; the model must never be built."""
    with pytest.raises(SystemExit) as info:
        train_main(argv) if env is None else _main_with_env(argv, env)
    assert info.value.code == 2
    return capsys.readouterr().err


def _main_with_env(argv, env):
    parser = options.build_train_parser()
    try:
        options.resolve_train_args(argv, env)
    except options.UsageError as err:
        parser.error(str(err))


@pytest.fixture
def no_model(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(trainer, "build_model", boom)
    monkeypatch.setattr(trainer, "ensure_synthetic_set", boom)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "coco"], "unknown --dataset 'coco'; expected one of refcoco, refcoco+, refcocog, grefcoco"),
        (["--data-root", "/nonexistent/refer"], "data root /nonexistent/refer does not exist"),
        (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 is not divisible by world size 1 x --grad-accum 4 = 4"),
        (["--batch-size", "8", "--batch-per-step", "3"], "--batch-size 8 is not divisible by world size 1 x --batch-per-step 3"),
        (["--batch-size", "8", "--batch-per-step", "2", "--grad-accum", "2"], "--grad-accum 2 contradicts --batch-per-step 2"),
        (["--amp", "fp16"], "--amp fp16 needs a CUDA device (got --device cpu); on CPU use --amp bf16"),
        (["--img-size", "70"], "--img-size must be a positive multiple of 32"),
        (["--resume"], "--resume: no checkpoint in"),
        (["--dataset", "refcocog"], "without --data-root a synthetic set is used, which exists as refcoco (unc) and grefcoco"),
        (["--dataset", "refcoco", "--split-by", "umd"], "--split-by 'umd' does not exist for refcoco"),
    ],
)
def test_wrong_arguments_fail_fast(tmp_path, capsys, no_model, extra, message):
    argv = ["--model", "tiny", "--output-dir", str(tmp_path / "out"), "--device", "cpu", *extra]
    err = _fail(argv, capsys)
    assert message in err


def test_divisibility_counts_the_world_size(tmp_path, capsys, no_model):
    env = DistEnv(rank=0, world_size=4, local_rank=0)
    err = _fail(["--batch-size", "6", "--output-dir", str(tmp_path)], capsys, env=env)
    assert "--batch-size 6 is not divisible by world size 4 x --grad-accum 1 = 4" in err
    args = options.resolve_train_args(["--batch-size", "32", "--batch-per-step", "2", "--output-dir", str(tmp_path),
                                    "--device", "cpu"], env)
    assert args.grad_accum == 4 and args.batch_per_step == 2


def test_a_users_own_files_are_never_touched(tmp_path, capsys, no_model):
    (tmp_path / "best").mkdir(parents=True)
    (tmp_path / "best" / "model.safetensors").write_bytes(b"mine")
    (tmp_path / "metrics.jsonl").write_text("my own log\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"], ["--demo"]):
        err = _fail(["--model", "tiny", "--device", "cpu", "--output-dir", str(tmp_path), *extra], capsys)
        assert "holds files no vlaligner run wrote (best, metrics.jsonl)" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_output_dir_may_not_overlap_an_input(tmp_path, capsys, no_model, synthetic):
    err = _fail(["--model", "tiny", "--device", "cpu", "--cache-dir", str(synthetic),
                 "--output-dir", str(synthetic / "runs")], capsys)
    assert "overlaps --cache-dir" in err


def test_no_arguments_is_the_demo_and_options_override_it():
    args = options.resolve_train_args([])
    assert args.demo and args.model == "tiny" and args.data_root is None and args.device == "cpu"
    assert args.recipe == "demo" and args.dice_weight == 1.0 and str(args.output_dir) == "runs/demo"
    assert args.model_kwargs == options.DEMO_MODEL_KWARGS and args.img_size == 128
    args = options.resolve_train_args(["--demo", "--epochs", "1", "--lr", "0.01"])
    assert args.epochs == 1 and args.lr == 0.01 and args.model == "tiny" and args.recipe == "demo+custom"
    paper = options.resolve_train_args(["--device", "cpu"])
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr, paper.poly_power) == ("swin-b", 40, 32, 5e-5, 0.9)
    assert (paper.recipe, paper.optimizer, paper.warmup_steps, paper.clip_grad) == ("paper-finetune", "adam", 0, 0.0)


def test_model_kwargs_mistakes_are_one_line_errors(synthetic, tmp_path, capsys):
    # an argument the builder does not take: refused before anything is built or written
    bad = json.dumps({**json.loads(SMALL), "nonsense": 1})
    argv = _argv(synthetic, tmp_path / "a", "--max-steps", "1")
    argv[argv.index(SMALL)] = bad
    err = _fail(argv, capsys)
    assert "build_eavl_tiny has no argument 'nonsense'" in err and "grid_stride" in err
    assert not (tmp_path / "a").exists()
    # arguments the builder takes but rejects: its message, as one line, exit status 2
    bad = json.dumps({**json.loads(SMALL), "grid_stride": 8})  # SMALL's up_channels has two rounds
    argv = _argv(synthetic, tmp_path / "b", "--max-steps", "1")
    argv[argv.index(SMALL)] = bad
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot build the model with these arguments: up_channels must give one width per upsampling " \
        "round: grid_stride 8 has 1, got [32, 32]" in err and "Traceback" not in err


def test_command_line_error_from_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_eavl.py"), "--dataset", "refcocoX", "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert "unknown --dataset 'refcocoX'" in proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ training runs
def test_train_then_evaluate_writes_everything(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_main(_argv(synthetic, out, "--max-steps", "3", "--eval-every", "2"))
    assert rc == 0
    for name in ("train.log", "losses.jsonl", "metrics.jsonl", "curves.png", "predictions.png"):
        assert (out / name).is_file(), name
    for png in ("curves.png", "predictions.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    losses = _rows(out / "losses.jsonl")
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in losses)
    assert losses[0]["lr"] == pytest.approx(1e-3) and losses[2]["lr"] < losses[1]["lr"] < losses[0]["lr"]
    evals = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in evals] == [2, 3]  # --eval-every 2, and the final model
    for row in evals:
        assert row["split"] == "val" and row["epoch"] == 1
        assert set(row["metrics"]) >= {"oIoU", "mIoU", "Pr@0.5", "Pr@0.9"}
        assert row["metrics"]["num_samples"] == 3
    log = (out / "train.log").read_text()
    assert "eval val at step 3" in log and "saved" in log

    from vlaligner.models import EAVL

    for name in ("last", "best"):
        model = EAVL.from_pretrained(out / name)
        state = ckpt.load_checkpoint(out / name)
        assert state["args"]["lr"] == 1e-3 and state["args"]["batch_size"] == 2
        assert state["optimizer"]["state"], "Adam moments are stored"
        assert isinstance(model, EAVL)
    assert ckpt.load_checkpoint(out / "last")["step"] == 3
    best_metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert "val" in best_metrics

    capsys.readouterr()
    rc = evaluate_main(["--checkpoint", str(out / "last"), "--split", "val", "testA",
                               "--num-workers", "0", "--no-progress", "--batch-size", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "oIoU" in printed and "testA" in printed and "Pr@0.9" in printed
    metrics = json.loads((out / "last" / "metrics.json").read_text())
    assert set(metrics) == {"val", "testA"}
    for split in metrics.values():
        assert set(split) >= {"oIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"}
        assert all(0.0 <= split[k] <= 100.0 for k in ("oIoU", "mIoU", "Pr@0.5", "Pr@0.9"))
        assert 0.0 <= split["query_mask_iou"] <= 1.0 and 0.0 <= split["score_entropy"] <= 1.0 + 1e-6
    # evaluating another split of best/ keeps the val numbers training wrote there
    rc = evaluate_main(["--checkpoint", str(out / "best"), "--split", "testB", "--num-workers", "0",
                        "--no-progress", "--batch-size", "4"])
    assert rc == 0
    after = json.loads((out / "best" / "metrics.json").read_text())
    assert set(after) == {"val", "testB"} and after["val"] == best_metrics["val"]
    # a file at --output that is not a metrics file is refused before any evaluation, untouched
    notes = tmp_path / "notes.json"
    notes.write_text('["my own list"]')
    capsys.readouterr()
    rc = evaluate_main(["--checkpoint", str(out / "best"), "--num-workers", "0", "--no-progress",
                        "--output", str(notes)])
    assert rc == 2 and "is not a metrics file" in capsys.readouterr().err
    assert notes.read_text() == '["my own list"]'
    # the LAVT convention gives its own numbers from the same checkpoint
    rc = evaluate_main(["--checkpoint", str(out), "--split", "val", "--resized", "--num-workers", "0",
                               "--no-progress", "--output", str(tmp_path / "resized.json")])
    assert rc == 0 and set(json.loads((tmp_path / "resized.json").read_text())) == {"val"}


def test_evaluate_fails_fast(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "nothing")])
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "ck").mkdir()
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "ck")])
    assert "holds no model.safetensors" in capsys.readouterr().err


def _model_tensors(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_kill_and_resume_matches_uninterrupted_run(synthetic, tmp_path):
    # 6 training samples / batch 2 = 3 steps per epoch: 4 steps cross an epoch boundary, so
    # the resumed run must skip within epoch 1 and reshuffle for epoch 2 exactly as the
    # uninterrupted one; dropout (0.1 in the tiny model) makes the RNG restore matter.
    common = ["--max-steps", "4", "--save-every", "2", "--epochs", "2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert train_main(_argv(synthetic, ref, *common)) == 0
    assert train_main(_argv(synthetic, cut, *common, "--stop-after-steps", "2")) == 3
    assert ckpt.load_checkpoint(cut / "last")["step"] == 2
    assert not (cut / "curves.png").exists()  # stopped the way a kill would
    # a partial line written after the checkpoint would be dropped on resume; add one
    with open(cut / "losses.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    assert train_main(_argv(synthetic, cut, *common, "--resume")) == 0

    ref_losses = [(r["step"], r["loss"], r["lr"]) for r in _rows(ref / "losses.jsonl")]
    cut_losses = [(r["step"], r["loss"], r["lr"]) for r in _rows(cut / "losses.jsonl")]
    assert [s for s, _, _ in ref_losses] == [1, 2, 3, 4]
    assert cut_losses == ref_losses  # bit-identical loss curve
    assert [r["metrics"] for r in _rows(cut / "metrics.jsonl")] == [r["metrics"] for r in _rows(ref / "metrics.jsonl")]
    a, b = _model_tensors(ref / "last"), _model_tensors(cut / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = ckpt.load_checkpoint(ref / "last"), ckpt.load_checkpoint(cut / "last")
    assert sa["step"] == sb["step"] == 4 and sa["epoch"] == sb["epoch"] == 1
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])


def test_crash_during_checkpoint_write_keeps_previous(synthetic, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = trainer.save_checkpoint

    def crashing(path, **kwargs):
        if Path(path).name == "last" and kwargs["extra"]["step"] == 2:
            def die(tmp):
                assert (tmp / "model.safetensors").is_file()  # half of the new folder exists
                raise OSError("simulated crash while writing the checkpoint")
            kwargs["before_commit"] = die
        return original(path, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        train_main(_argv(synthetic, out, "--max-steps", "3", "--save-every", "1"))
    monkeypatch.setattr(trainer, "save_checkpoint", original)

    assert sorted(p.name for p in out.iterdir() if p.name.startswith("last")) == ["last"]
    assert ckpt.load_checkpoint(out / "last")["step"] == 1
    from vlaligner.models import EAVL

    EAVL.from_pretrained(out / "last")  # still a valid model folder (hash checked)
    assert train_main(_argv(synthetic, out, "--max-steps", "3", "--resume")) == 0
    assert ckpt.load_checkpoint(out / "last")["step"] == 3
    assert [r["step"] for r in _rows(out / "losses.jsonl")] == [1, 2, 3]


def test_torchrun_two_processes(synthetic, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "train_eavl.py"),
        *_argv(synthetic, out, "--max-steps", "2", "--batch-size", "4", "--grad-accum", "2",
               "--debug-param-digest", "--threads", "1"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d0 = (out / "param_digest.rank0.txt").read_text().strip()
    d1 = (out / "param_digest.rank1.txt").read_text().strip()
    assert d0 == d1
    from vlaligner.models import EAVL

    assert trainer.param_digest(EAVL.from_pretrained(out / "last")) == d0
    state = ckpt.load_checkpoint(out / "last")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 2
    # the two processes' dropout streams differ (seed + rank)
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    log = (out / "train.log").read_text()
    assert "2 process(es) x 2 accumulation x 1 per step" in log
    assert "[rank 1]" not in log  # only rank 0 writes the log


def test_overwrite_starts_from_scratch(synthetic, tmp_path):
    out = tmp_path / "run"
    assert train_main(_argv(synthetic, out, "--max-steps", "2", "--save-every", "1")) == 0
    assert train_main(_argv(synthetic, out, "--max-steps", "1", "--overwrite", "--seed", "1")) == 0
    assert [r["step"] for r in _rows(out / "losses.jsonl")] == [1]
    assert ckpt.load_checkpoint(out / "best")["step"] == 1  # no stale best/ of the first run
    assert ckpt.load_checkpoint(out / "last")["args"]["seed"] == 1


def test_the_sample_cache_trains_exactly_as_loading_every_time(synthetic, tmp_path):
    # 3 epochs of 3 steps: epoch 1 fills the cache, epochs 2 and 3 read it under other flips.
    common = ["--max-steps", "9", "--epochs", "3", "--augment", "--eval-every", "0"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert train_main(_argv(synthetic, plain, *common)) == 0
    assert train_main(_argv(synthetic, cached, *common, "--cache-samples")) == 0
    losses = [(r["step"], r["loss"]) for r in _rows(plain / "losses.jsonl")]
    assert len(losses) == 9 and [(r["step"], r["loss"]) for r in _rows(cached / "losses.jsonl")] == losses
    a, b = _model_tensors(plain / "last"), _model_tensors(cached / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["metrics"] for r in _rows(plain / "metrics.jsonl")] == [r["metrics"] for r in _rows(cached / "metrics.jsonl")]


def test_amp_is_refused_where_it_cannot_run():
    from types import SimpleNamespace

    with pytest.raises(options.UsageError, match="--amp bf16 runs on cuda or cpu, got --device meta; use --amp none"):
        options.resolve_device_option(SimpleNamespace(device="meta", amp="bf16"))
    with pytest.raises(options.UsageError, match="--amp fp16 needs a CUDA device \\(got --device meta\\)"):
        options.resolve_device_option(SimpleNamespace(device="meta", amp="fp16"))
    options.resolve_device_option(SimpleNamespace(device="cpu", amp="bf16"))  # accepted


def test_bf16_autocast_trains_and_evaluates_on_the_cpu(synthetic, tmp_path):
    """--amp bf16 on the CPU: finite losses that differ from float32's, float32 weights saved."""
    common = ["--max-steps", "2", "--eval-every", "2"]
    assert train_main(_argv(synthetic, tmp_path / "bf16", *common, "--amp", "bf16")) == 0
    assert train_main(_argv(synthetic, tmp_path / "fp32", *common)) == 0
    bf16, fp32 = _rows(tmp_path / "bf16" / "losses.jsonl"), _rows(tmp_path / "fp32" / "losses.jsonl")
    assert all(math.isfinite(r["loss"]) for r in bf16) and len(bf16) == len(fp32) == 2
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast really ran in bfloat16
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05)
    assert all(t.dtype == torch.float32 for t in _model_tensors(tmp_path / "bf16" / "last").values()
               if t.is_floating_point())
    assert "amp bf16" in (tmp_path / "bf16" / "train.log").read_text()
    assert "mIoU" in _rows(tmp_path / "bf16" / "metrics.jsonl")[-1]["metrics"]


def test_a_sample_cache_too_large_for_memory_is_a_usage_error(synthetic, tmp_path, capsys, monkeypatch):
    import vlaligner.data.refer as refer

    monkeypatch.setattr(refer, "available_memory_bytes", lambda: 1024)
    assert train_main(_argv(synthetic, tmp_path / "run", "--max-steps", "1", "--cache-samples")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("train_eavl.py: error: --cache-samples: cache=True would keep about ")
    assert err[0].endswith("of the 1.0 KiB free; the cache is for small sets: turn it off (--no-cache-samples)")
    assert train_main(_argv(synthetic, tmp_path / "plain", "--max-steps", "1")) == 0  # without the cache: trains


def test_the_start_up_log_says_whether_samples_are_kept(tmp_path):
    demo = options.resolve_train_args(["--demo", "--output-dir", str(tmp_path / "a")])
    assert trainer._cache_note(demo) == " (kept in memory after their first use)"
    demo_workers = options.resolve_train_args(["--demo", "--output-dir", str(tmp_path / "b"), "--num-workers", "1"])
    assert trainer._cache_note(demo_workers) == (
        " (not kept in memory as the demo's are: --num-workers 1 loads them in other processes)"
    )
    plain = options.resolve_train_args(["--model", "tiny", "--output-dir", str(tmp_path / "c"), "--num-workers", "1"])
    assert trainer._cache_note(plain) == ""


def test_resume_is_exact_with_augmentation_and_loader_workers(synthetic, tmp_path):
    # The flips are a function of (seed, epoch, sample), not of a worker's RNG stream, so a
    # resumed run draws the same flips as the uninterrupted one, with loader processes too.
    common = ["--max-steps", "4", "--save-every", "2", "--epochs", "2", "--augment"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    workers = ["--num-workers", "1"]
    assert train_main(_argv(synthetic, ref, *common) + workers) == 0
    assert train_main(_argv(synthetic, cut, *common, "--stop-after-steps", "2") + workers) == 3
    assert train_main(_argv(synthetic, cut, *common, "--resume") + workers) == 0
    ref_losses = [(r["step"], r["loss"]) for r in _rows(ref / "losses.jsonl")]
    assert [(r["step"], r["loss"]) for r in _rows(cut / "losses.jsonl")] == ref_losses
    a, b = _model_tensors(ref / "last"), _model_tensors(cut / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_augmented_flips_are_a_function_of_seed_and_sample(synthetic):
    from vlaligner.data import RefDataset

    ds = RefDataset(synthetic, "refcoco", "unc", "train", img_size=64, augment=True)
    ds.set_augment_seed(5)
    first = [ds._flips(i) for i in range(40)]
    assert first == [ds._flips(i) for i in range(40)]  # repeatable
    assert 5 < sum(first) < 35  # about half
    ds.set_augment_seed(6)
    assert [ds._flips(i) for i in range(40)] != first  # another epoch, other flips


@pytest.mark.parametrize("flag, expected", [("--upsample-logits", True), ("--no-upsample-logits", False)])
def test_the_recipe_decides_where_the_loss_is_taken(synthetic, tmp_path, monkeypatch, flag, expected):
    import vlaligner.training.trainer as trainer_module

    seen = []
    real = trainer_module.mask_bce_loss

    def spy(logits, target, *, upsample_logits=False):
        seen.append((upsample_logits, tuple(target.shape[-2:])))
        return real(logits, target, upsample_logits=upsample_logits)

    monkeypatch.setattr(trainer_module, "mask_bce_loss", spy)
    assert train_main(_argv(synthetic, tmp_path / "run", "--max-steps", "1", "--epochs", "1", flag)) == 0
    assert seen and all(up is expected for up, _ in seen)
    assert all(size == (64, 64) for _, size in seen)  # the target at the input size, either way
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["upsample_logits"] is expected


def test_channels_last_is_the_same_training_in_another_layout(synthetic, tmp_path, monkeypatch):
    """On CPU the default keeps the model channels-last; the losses and weights match the plain layout."""
    import vlaligner.training.trainer as trainer_module

    layouts = []
    real = trainer_module.Trainer._images

    def spy(self, images):
        out = real(self, images)
        layouts.append(out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())
        return out

    monkeypatch.setattr(trainer_module.Trainer, "_images", spy)
    runs = {}
    for name, flags in (("default", ()), ("plain", ("--no-channels-last",))):
        layouts.clear()
        out = tmp_path / name
        assert train_main(_argv(synthetic, out, "--max-steps", "3", "--epochs", "1", "--seed", "3", *flags)) == 0
        recorded = json.loads((out / "run_config.json").read_text())
        runs[name] = (layouts[:], recorded["channels_last"], [r["loss"] for r in _rows(out / "losses.jsonl")],
                      load_file(str(out / "last" / "model.safetensors")))
    assert runs["default"][1] is True and all(runs["default"][0]) and len(runs["default"][0]) == 3
    assert runs["plain"][1] is False and not any(runs["plain"][0])
    # The first loss comes before any update: only the layout differs. Later ones also carry
    # Adam's amplified rounding (below); 4e-4 relative was seen at step 3 on a loaded machine.
    assert runs["default"][2][0] == pytest.approx(runs["plain"][2][0], rel=1e-5)
    assert runs["default"][2] == pytest.approx(runs["plain"][2], rel=2e-3)
    # Adam turns float-rounding differences of near-zero gradients into steps of up to lr (1e-3).
    for key, value in runs["plain"][3].items():
        torch.testing.assert_close(runs["default"][3][key], value, rtol=0, atol=3e-3, msg=key)


def test_the_demo_keeps_the_plain_layout_unless_asked():
    from vlaligner.training.options import resolve_train_args

    assert resolve_train_args([]).channels_last is False  # the demo's measured numbers
    assert resolve_train_args(["--demo", "--channels-last"]).channels_last is True
    assert resolve_train_args(["--model", "tiny"]).channels_last is None  # the trainer decides by device


def test_the_demo_model_is_the_one_its_numbers_were_measured_with():
    # The tiny default appends coordinates for its kernels; the demo pins them off, so its
    # model stays the 2,300,010-parameter one of the README's measurements.
    from vlaligner.models import build_eavl_tiny
    from vlaligner.training.options import DEMO_MODEL_KWARGS, resolve_train_args

    args = resolve_train_args([])
    assert args.model_kwargs["mask_coords"] is False
    model = build_eavl_tiny(img_size=args.img_size, **DEMO_MODEL_KWARGS)
    assert not model.head.mask_generator.append_coords
    assert sum(p.numel() for p in model.parameters()) == 2_300_010


def test_a_classic_checkpoint_starts_a_generalized_run(synthetic, tmp_path):
    """--init-from a classic run on a generalized set: every tensor but the no-target head's."""
    from vlaligner.training.trainer import NO_TARGET_HEAD_PREFIX

    classic = tmp_path / "classic"
    assert train_main(_argv(synthetic, classic, "--max-steps", "1")) == 0
    gsynth = ensure_synthetic_set(tmp_path / "gset", num_images=8, seed=0, generalized=True)
    out = tmp_path / "gres"
    seen = {}
    original = trainer.load_model_weights

    def spy(model, directory, **kwargs):
        fresh = original(model, directory, **kwargs)
        if "state" not in seen:  # the --init-from call (the trainer loads best/ at the end too)
            seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
            seen["fresh"] = fresh
        return fresh

    argv = _argv(synthetic, out, "--max-steps", "1", "--init-from", str(classic / "last"))
    argv[argv.index("--cache-dir") + 1] = str(gsynth)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "load_model_weights", spy)
        assert train_main(argv + ["--dataset", "grefcoco"]) == 0
    saved = _model_tensors(classic / "last")
    assert seen["fresh"] and all(k.startswith(NO_TARGET_HEAD_PREFIX) for k in seen["fresh"])
    assert set(seen["state"]) == set(saved) | set(seen["fresh"])
    for name, tensor in saved.items():
        assert torch.equal(seen["state"][name], tensor), name
    assert "tensors of it start fresh" in (out / "train.log").read_text()
    assert "gIoU" in _rows(out / "metrics.jsonl")[-1]["metrics"]
    # a classic run may not start from a generalized checkpoint (its head would be dropped silently)
    back = tmp_path / "back"
    argv = _argv(synthetic, back, "--max-steps", "1", "--init-from", str(out / "last"))
    with pytest.raises(ValueError, match="unexpected, first: no_target_head"):
        train_main(argv)


def test_the_recipe_flip_reaches_the_training_set_only(synthetic, tmp_path):
    """scratch-small's flip is the training loader's; validation is never flipped; --no-augment turns it off."""
    from types import SimpleNamespace

    model = SimpleNamespace(tokenize=None)
    args = options.resolve_train_args(_argv(synthetic, tmp_path / "a"))
    train, val = trainer.make_datasets(args, model, synthetic)
    assert args.recipe == "scratch-small+custom" and args.recipe_fields["augment"] is True
    assert trainer._base_dataset(train).augment is True and trainer._base_dataset(val).augment is False
    args = options.resolve_train_args(_argv(synthetic, tmp_path / "b", "--no-augment"))
    train, _ = trainer.make_datasets(args, model, synthetic)
    assert trainer._base_dataset(train).augment is False
    assert not trainer._base_dataset(train).cache  # the sample cache is off unless asked for
    args = options.resolve_train_args(_argv(synthetic, tmp_path / "c", "--cache-samples"))
    train, val = trainer.make_datasets(args, model, synthetic)
    assert trainer._base_dataset(train).cache and trainer._base_dataset(val).cache


def test_evaluate_takes_the_no_target_threshold_on_generalized_sets(synthetic, tmp_path, capsys):
    """--no-target-threshold moves N-acc / T-acc to their ends; a classic set refuses it."""
    gsynth = ensure_synthetic_set(tmp_path / "gset", num_images=8, seed=0, generalized=True)
    out = tmp_path / "gres"
    argv = _argv(synthetic, out, "--max-steps", "1", "--dataset", "grefcoco")
    argv[argv.index("--cache-dir") + 1] = str(gsynth)
    assert train_main(argv) == 0
    common = ["--checkpoint", str(out / "last"), "--split", "train", "--num-workers", "0", "--no-progress"]
    results = {}
    for p in ("1e-9", "0.999999999"):
        assert evaluate_main(common + ["--no-target-threshold", p, "--output", str(tmp_path / f"{p}.json")]) == 0
        results[p] = json.loads((tmp_path / f"{p}.json").read_text())["train"]
    assert results["1e-9"]["N-acc"] == 100.0 and results["1e-9"]["T-acc"] == 0.0
    assert results["0.999999999"]["N-acc"] == 0.0 and results["0.999999999"]["T-acc"] == 100.0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate_main(common + ["--no-target-threshold", "1.5"])
    assert "--no-target-threshold must be in (0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(common + ["--dataset", "refcoco", "--no-target-threshold", "0.3"])
    assert "--no-target-threshold applies to generalized sets (grefcoco); got --dataset refcoco" in (
        capsys.readouterr().err
    )
    # a classic checkpoint without --dataset: its own training set is named
    classic = tmp_path / "classic"
    assert train_main(_argv(synthetic, classic, "--max-steps", "1")) == 0
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(classic / "last"), "--no-target-threshold", "0.3"])
    assert "got --dataset refcoco (given, or the checkpoint's training set)" in capsys.readouterr().err


def test_torchrun_evaluate_refuses_a_foreign_output_on_every_process(synthetic, tmp_path):
    """Both processes refuse a file that is not a metrics file: none waits for the other."""
    out = tmp_path / "run"
    assert train_main(_argv(synthetic, out, "--max-steps", "1")) == 0
    notes = tmp_path / "notes.json"
    notes.write_text('["my own list"]')
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "evaluate.py"), "--checkpoint", str(out / "last"), "--device", "cpu",
        "--num-workers", "0", "--no-progress", "--output", str(notes),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode != 0
    assert "is not a metrics file" in proc.stderr
    assert notes.read_text() == '["my own list"]'
