"""Tests of the training package's pieces (schedule, sampler, RNG, checkpoints, evaluation)
and of the losses and pictures training uses, with small stand-in modules.

Axis legend: b batch, l words, h w logit grid, S input size, H W original size.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vlaligner.fileio import atomic_write_dir, resolve_checkpoint_dir
from vlaligner.losses import soft_dice_loss
from vlaligner.training.checkpoint import (
    flatten_state,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    unflatten_state,
)
from vlaligner.training.distributed import DistEnv
from vlaligner.training.evaluation import format_metrics_table, predict_masks
from vlaligner.training.rng import capture_rng_state, restore_rng_state, seed_everything
from vlaligner.training.sampler import ShardedSampler
from vlaligner.training.schedule import build_poly_scheduler, poly_lr_factor
from vlaligner.viz import plot_training_curves, save_prediction_grid

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ schedule
def test_poly_factor_endpoints_and_power():
    assert poly_lr_factor(0, 100) == 1.0
    assert poly_lr_factor(100, 100) == 0.0
    assert poly_lr_factor(150, 100) == 0.0  # clamped, never negative or complex
    assert math.isclose(poly_lr_factor(50, 100, 0.9), 0.5**0.9)
    assert math.isclose(poly_lr_factor(25, 100, 2.0), 0.75**2)


@pytest.mark.parametrize("bad", [dict(step=0, total_steps=0), dict(step=-1, total_steps=10)])
def test_poly_factor_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="must be"):
        poly_lr_factor(**bad)


def test_poly_scheduler_decays_per_iteration():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=0.1)
    sched = build_poly_scheduler(opt, total_steps=10, power=0.9)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 * (1 - i / 10) ** 0.9 for i in range(10)]
    assert np.allclose(seen, expected)
    assert opt.param_groups[0]["lr"] == 0.0


def test_poly_scheduler_state_survives_json_round_trip():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1.0)
    sched = build_poly_scheduler(opt, total_steps=7, power=0.9)
    for _ in range(3):
        opt.step()
        sched.step()
    skeleton, tensors = flatten_state(sched.state_dict())
    restored_state = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    opt2 = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_poly_scheduler(opt2, total_steps=99, power=2.0)
    sched2.load_state_dict(restored_state)
    # total_steps / power travel with the state (PolyDecay is an object, not a lambda).
    assert sched2.lr_lambdas[0].total_steps == 7 and sched2.lr_lambdas[0].power == 0.9
    assert sched2.last_epoch == 3
    for _ in range(3):
        opt.step(); sched.step(); opt2.step(); sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


# ------------------------------------------------------------------------------ sampler
def test_sampler_order_is_function_of_seed_and_epoch():
    a = ShardedSampler(50, seed=3, global_batch_size=8)
    b = ShardedSampler(50, seed=3, global_batch_size=8)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    c = ShardedSampler(50, seed=4, global_batch_size=8)
    c.set_epoch(2)
    assert list(a) != list(c)
    assert len(a) == 48 == len(list(a))  # cut to a multiple of the global batch
    assert a.steps_per_epoch == 6


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_global_batch_independent_of_world_size(world):
    g = 8
    single = ShardedSampler(37, seed=1, global_batch_size=g)
    single.set_epoch(5)
    ref = list(single)
    shards = []
    for rank in range(world):
        s = ShardedSampler(37, num_replicas=world, rank=rank, seed=1, global_batch_size=g)
        s.set_epoch(5)
        shards.append(list(s))
    assert len({len(s) for s in shards}) == 1  # same number of steps on every process
    per = g // world
    for step in range(single.steps_per_epoch):
        union = sorted(i for s in shards for i in s[step * per : (step + 1) * per])
        assert union == sorted(ref[step * g : (step + 1) * g])


def test_sampler_skip_resumes_mid_epoch():
    s = ShardedSampler(40, seed=0, global_batch_size=4)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, skip=12)
    assert list(s) == full[12:]
    assert len(s) == len(full) - 12


def test_eval_sampler_covers_every_sample_once():
    shards = [list(ShardedSampler(11, num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(11))
    assert [len(ShardedSampler(11, num_replicas=3, rank=r, shuffle=False)) for r in range(3)] == [4, 4, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=10, num_replicas=2, rank=2), "rank"),
        (dict(num_samples=10, num_replicas=4, global_batch_size=6), "multiple of num_replicas"),
        (dict(num_samples=-1), "num_samples"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    n = kwargs.pop("num_samples")
    with pytest.raises(ValueError, match=match):
        ShardedSampler(n, **kwargs)


def test_dist_env_from_environ():
    env = DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert env.rank == 1 and env.world_size == 2 and not env.is_main and env.distributed
    assert DistEnv.from_environ({}).is_main
    with pytest.raises(ValueError, match="RANK"):
        DistEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        DistEnv.from_environ({"WORLD_SIZE": "two"})


# ------------------------------------------------------------------------------ RNG + flattening
def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), float(np.random.randn()))


def test_rng_state_round_trip_through_flattened_json():
    seed_everything(11)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    skeleton, tensors = flatten_state(state)
    assert tensors["state.torch"].dtype == torch.uint8
    first = _draw()
    seed_everything(999)
    restore_rng_state(unflatten_state(json.loads(json.dumps(skeleton)), tensors))
    assert _draw() == first


def test_flatten_handles_int_keys_tuples_and_arrays():
    value = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)[:, ::2]}},
        "groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3, "name": None}],
        "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
    }
    skeleton, tensors = flatten_state(value)
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert set(back["state"]) == {0}
    assert torch.equal(back["state"][0]["exp_avg"], value["state"][0]["exp_avg"])
    assert back["groups"][0]["betas"] == (0.9, 0.999)
    assert back["arr"].dtype == np.int16 and np.array_equal(back["arr"], value["arr"])


def test_flatten_rejects_unknown_types():
    with pytest.raises(TypeError, match="cannot store a value of type object"):
        flatten_state({"x": object()})


# ------------------------------------------------------------------------------ atomic folders
def _write_marker(text):
    def write(tmp: Path):
        (tmp / "a.txt").write_text(text)
        (tmp / "b.txt").write_text(text)
    return write


def test_atomic_write_replaces_folder(tmp_path):
    target = tmp_path / "last"
    atomic_write_dir(target, _write_marker("one"))
    atomic_write_dir(target, _write_marker("two"))
    assert (target / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp or .old left


def test_failed_write_keeps_previous_folder(tmp_path):
    target = tmp_path / "last"
    atomic_write_dir(target, _write_marker("one"))

    def broken(tmp: Path):
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(target, broken)
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_crash_between_renames_recovers_old_and_next_write_cleans(tmp_path):
    target = tmp_path / "last"
    atomic_write_dir(target, _write_marker("one"))
    # What a kill between "rename last -> last.old" and "rename tmp -> last" leaves behind,
    # together with a stale temp folder from the killed write.
    target.rename(tmp_path / "last.old")
    (tmp_path / "last.tmp-dead").mkdir()
    (tmp_path / "last.tmp-dead" / "a.txt").write_text("partial")
    assert resolve_checkpoint_dir(target) == tmp_path / "last.old"
    atomic_write_dir(target, _write_marker("two"))
    assert (target / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert resolve_checkpoint_dir(tmp_path / "missing") is None


# ------------------------------------------------------------------------------ checkpoints
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x):
        return self.body(x)


def _train_steps(model, opt, sched, xs, ys, steps):
    losses = []
    for i in steps:
        loss = nn.functional.mse_loss(model(xs[i]), ys[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = build_poly_scheduler(opt, total_steps=8)
    return model, opt, sched


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(8, 6, 4, generator=g), torch.randn(8, 6, 1, generator=g)

    model, opt, sched = _fresh()
    torch.manual_seed(123)
    reference = _train_steps(model, opt, sched, xs, ys, range(8))

    model, opt, sched = _fresh()
    torch.manual_seed(123)
    first = _train_steps(model, opt, sched, xs, ys, range(4))
    save_checkpoint(
        tmp_path / "last", model=model, optimizer=opt, scheduler=sched,
        rng_states=[capture_rng_state()], args={"lr": 1e-2, "out": tmp_path}, extra={"step": 4},
    )
    torch.manual_seed(777)  # the interrupted process's RNG is lost

    model2, opt2, sched2 = _fresh(seed=42)  # a different init: everything must come from disk
    state = load_checkpoint(tmp_path / "last")
    load_model_weights(model2, state["path"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"][0])
    assert state["step"] == 4 and state["args"]["out"] == str(tmp_path)
    second = _train_steps(model2, opt2, sched2, xs, ys, range(4, 8))

    assert first + second == reference
    for p, q in zip(model.parameters(), model2.parameters()):
        assert not torch.equal(p, q)  # the first model stopped at step 4
    model3, opt3, sched3 = _fresh()
    torch.manual_seed(123)
    _train_steps(model3, opt3, sched3, xs, ys, range(8))
    for p, q in zip(model3.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path):
    model, opt, sched = _fresh()
    save_checkpoint(tmp_path / "last", model=model, optimizer=opt, scheduler=sched, extra={"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(tmp: Path):
        assert (tmp / "model.safetensors").is_file()  # partial files are on disk
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last", model=model, optimizer=opt, extra={"step": 2}, before_commit=crash)
    state = load_checkpoint(tmp_path / "last")
    assert state["step"] == 1
    fresh = _Net()
    load_model_weights(fresh, state["path"])
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "model_only").mkdir()
    (tmp_path / "model_only" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "model_only")


# ------------------------------------------------------------------------------ dice
def test_soft_dice_loss_bounds_and_gradient():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    sure = (target * 40 - 20).unsqueeze(1)[:, :, ::2, ::2]  # (b 1 8 8) logits, resized target
    assert soft_dice_loss(sure, target).item() < 0.02
    assert soft_dice_loss(-sure, target).item() > 0.95
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    soft_dice_loss(logits, target).backward()
    inside = logits.grad[:, 0, 2:6, 2:6]
    assert (inside < 0).all()  # raising the object's logits lowers the loss
    with pytest.raises(ValueError, match=r"\(b 1 h w\)"):
        soft_dice_loss(torch.zeros(2, 8, 8), target)


# ------------------------------------------------------------------------------ prediction
class _FixedLogits(nn.Module):
    """Returns a left-half-positive logit map at a quarter of the input size."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images, input_ids, attention_mask):
        b, _, s, _ = images.shape
        logits = torch.full((b, 1, s // 4, s // 4), -5.0)
        logits[..., : s // 8] = 5.0
        return SimpleNamespace(logits=logits + self.dummy)


def _batch(b=2, s=32, sizes=((40, 60), (20, 24))):
    return {
        "image": torch.zeros(b, 3, s, s),
        "input_ids": torch.ones(b, 5, dtype=torch.long),
        "attention_mask": torch.ones(b, 5, dtype=torch.long),
        "orig_size": torch.tensor(sizes),
        "mask": torch.zeros(b, s, s),
        "orig_mask": [torch.zeros(h, w, dtype=torch.bool) for h, w in sizes],
    }


def test_predict_masks_original_and_input_size():
    model = _FixedLogits()
    masks = predict_masks(model, _batch(), device="cpu")
    assert [tuple(m.shape) for m in masks] == [(40, 60), (20, 24)]
    assert masks[0].dtype == torch.bool
    assert masks[0][:, :29].all() and not masks[0][:, 31:].any()
    resized = predict_masks(model, _batch(), device="cpu", at_original_size=False)
    assert [tuple(m.shape) for m in resized] == [(32, 32), (32, 32)]
    with pytest.raises(ValueError, match="threshold"):
        predict_masks(model, _batch(), device="cpu", threshold=1.5)


def test_format_metrics_table_rows():
    table = format_metrics_table(
        {"val": {"oIoU": 12.345, "mIoU": 50.0, "Pr@0.5": 1.0}, "testA": {"oIoU": 3.0}}
    )
    lines = table.splitlines()
    assert lines[0].split() == ["split", "oIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"]
    assert lines[2].split()[:3] == ["val", "12.35", "50.00"]
    assert lines[3].split()[-1] == "-"
    # a column as wide as its name: the values stay under their headers
    wide = format_metrics_table({"val": {"gIoU": 1.0, "gIoU-single": 22.8}}, keys=["gIoU", "gIoU-single"])
    head, _, row = wide.splitlines()
    assert len(head) == len(row) and head.endswith("gIoU-single") and row.endswith("22.80")


def test_plot_curves_and_prediction_grid(tmp_path):
    with open(tmp_path / "losses.jsonl", "w") as f:
        for s in range(1, 30):
            f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")
        f.write('{"step": 30, "lo')  # a line cut by a crash is skipped
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 10, "split": "val", "metrics": {"mIoU": 10.0}}) + "\n")
    out = plot_training_curves(tmp_path / "losses.jsonl", tmp_path / "metrics.jsonl", tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    grid = save_prediction_grid(tmp_path / "p.png", [img, img], [mask, ~mask], [mask, mask], ["a", "b"], ious=[1.0, 0.0])
    assert grid.stat().st_size > 1000
    with pytest.raises(ValueError, match="as many images"):
        save_prediction_grid(tmp_path / "q.png", [img], [mask, mask], [mask], ["a"])


def test_load_model_weights_keeps_only_named_parts_fresh(tmp_path):
    """fresh_prefixes: the named parts may be missing and keep their init; nothing else may."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(4, 4))
    save_checkpoint(tmp_path / "ckpt", model=small)
    torch.manual_seed(1)
    bigger = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    head = {k: v.clone() for k, v in bigger.state_dict().items() if k.startswith("1.")}
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model_weights(bigger, tmp_path / "ckpt")
    fresh = load_model_weights(bigger, tmp_path / "ckpt", fresh_prefixes=("1.",))
    assert sorted(fresh) == ["1.bias", "1.weight"]
    assert torch.equal(bigger[0].weight, small[0].weight) and torch.equal(bigger[0].bias, small[0].bias)
    assert all(torch.equal(bigger.state_dict()[k], v) for k, v in head.items())
    # a prefix that does not cover the missing part, or a bare string, is refused
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model_weights(bigger, tmp_path / "ckpt", fresh_prefixes=("0.",))
    with pytest.raises(TypeError, match="sequence of name prefixes"):
        load_model_weights(bigger, tmp_path / "ckpt", fresh_prefixes="1.")
    # nothing missing: nothing fresh
    assert load_model_weights(small, tmp_path / "ckpt", fresh_prefixes=("1.",)) == []
