"""Tests of what the adapters' run scripts share: launcher flags, dependency check, output
suffix, and starting a retrofit from a host checkpoint (``--init-from-host``).

Axis legend: none (command lines and state dicts).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
from pathlib import Path

import pytest
import torch

from adapters.host_checkpoint import load_host_checkpoint, read_host_state_dict
from adapters.launch import dependency_message, missing_dependencies, normalize_local_rank, output_suffix

HOSTS = Path(__file__).resolve().parent / "hosts"


def _replica(name: str):
    spec = importlib.util.spec_from_file_location(f"vlaligner_test_{name}_runner", HOSTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- launcher flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--local-rank=3", "--model", "lavt"],  # torch >= 2.0's torch.distributed.launch
        ["--local_rank=3", "--model", "lavt"],  # torch < 2.0's
        ["--local-rank", "3", "--model", "lavt"],
        ["--local_rank", "3", "--model", "lavt"],
        ["--model", "lavt", "--", "--local-rank=3"],
    ],
)
def test_every_local_rank_form_becomes_the_hosts(argv):
    out, rank = normalize_local_rank(argv, host_flag="--local_rank", environ={})
    assert rank == 3
    assert out[0] == "--local_rank=3"
    assert [a for a in out[1:] if "local" in a] == []
    assert [a for a in out if a != "--"][1:] == ["--model", "lavt"]
    # A host without the flag (CRIS) gets none at all.
    dropped, rank = normalize_local_rank(argv, host_flag=None, environ={})
    assert rank == 3 and not any("local" in a for a in dropped)


def test_torchrun_local_rank_comes_from_the_environment():
    out, rank = normalize_local_rank(["--model", "lavt"], host_flag="--local_rank", environ={"LOCAL_RANK": "5"})
    assert rank == 5 and out == ["--local_rank=5", "--model", "lavt"]
    # A flag wins over the environment; no flag and no variable: nothing is added.
    out, rank = normalize_local_rank(["--local-rank=1"], host_flag="--local_rank", environ={"LOCAL_RANK": "5"})
    assert rank == 1 and out == ["--local_rank=1"]
    assert normalize_local_rank(["--x"], host_flag="--local_rank", environ={}) == (["--x"], None)


def test_bad_local_rank_is_named():
    with pytest.raises(ValueError, match="must be an integer, got 'zero'"):
        normalize_local_rank(["--local-rank=zero"], host_flag="--local_rank", environ={})
    with pytest.raises(ValueError, match="needs an integer value"):
        normalize_local_rank(["--local_rank"], host_flag="--local_rank", environ={})


# --- dependencies and output names ----------------------------------------------------------------


def test_missing_dependencies_and_the_one_line_message():
    present = {"json", "torch"}
    missing = missing_dependencies(
        {"json": "json", "loguru": "loguru", "yaml": "pyyaml", "torch": "torch"},
        find=lambda name: object() if name in present else None,
    )
    assert missing == [("loguru", "loguru"), ("yaml", "pyyaml")]
    message = dependency_message("CRIS", "train.py", missing)
    assert "\n" not in message
    assert "CRIS's train.py imports modules that are not installed (loguru, yaml)" in message
    assert "pip install loguru pyyaml" in message
    # The real finder: a module that exists and one that cannot.
    assert missing_dependencies({"json": "json", "vlaligner_no_such_module_x": "x-pkg"}) == [
        ("vlaligner_no_such_module_x", "x-pkg")
    ]


def test_output_suffix():
    assert output_suffix("aligner", None) == "_aligner"
    assert output_suffix("fixed", None) == "_fixed"
    assert output_suffix("aligner", "-vla24") == "-vla24"
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="--output-suffix must be a non-empty name"):
            output_suffix("aligner", bad)


# --- --init-from-host ----------------------------------------------------------------------------


class Opaque:
    """An arbitrary class: weights-only loading refuses it."""


def _cris_checkpoint(tmp_path: Path, model: torch.nn.Module) -> Path:
    """A checkpoint as CRIS's train.py writes it: DDP keys, optimizer, MultiStepLR state (a Counter)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[35], gamma=0.1)
    path = tmp_path / "best_model.pth"
    torch.save({
        "epoch": 3, "cur_iou": 0.5, "best_iou": 0.5, "prec": {"Pr@50": 0.4},
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
    }, path)
    assert isinstance(scheduler.state_dict()["milestones"], collections.Counter)
    return path


def test_init_from_cris_checkpoint_loads_host_keys_and_reports_new_ones(tmp_path, capsys):
    from adapters.cris import retrofit_cris
    from adapters.cris.run_cris import CRIS_KEY_MAP

    H = _replica("cris_host")
    cfg = H.tiny_cfg()
    torch.manual_seed(0)
    trained, _ = H.build_segmenter(cfg)
    path = _cris_checkpoint(tmp_path, trained)
    torch.manual_seed(1)  # another initialisation: loading must replace it
    fresh, _ = H.build_segmenter(cfg)
    new = retrofit_cris(fresh, num_queries=4, query_dim=32, grid_size=(4, 4))
    before = {k: v.clone() for k, v in new.state_dict().items()}
    report = load_host_checkpoint(new, path, entries=("state_dict",), key_map=CRIS_KEY_MAP)
    state = new.state_dict()
    host = trained.state_dict()
    # Every host tensor outside the Projector is loaded, bit for bit.
    kept = [k for k in host if not k.startswith("proj.")]
    assert sorted(report.loaded) == sorted(kept)
    assert all(torch.equal(state[k], host[k]) for k in kept)
    # The Projector's up-projection lands in the aligner's (same layers, same shapes).
    assert len(report.mapped) == len([k for k in host if k.startswith("proj.vis.")])
    for old, target in report.mapped:
        assert target.startswith("proj.mask_generator.projection.layers.")
        assert torch.equal(state[target], host[old])
    # The sentence-kernel layer has no place; the aligner's other parts and the generator are new.
    assert sorted(report.dropped) == ["proj.txt.bias", "proj.txt.weight"]
    assert any(k.startswith("query_generator.") for k in report.new)
    assert set(report.new) | set(report.loaded) | {t for _, t in report.mapped} == set(state)
    assert all(torch.equal(state[k], before[k]) for k in report.new)
    text = report.format()
    assert "entry 'state_dict'" in text and "prefix 'module.' stripped" in text
    assert f"loaded  {len(kept):5d}" in text and "query_generator.*" in text
    assert len(text.splitlines()) <= 12  # one screen


def test_init_from_lavt_checkpoint_with_namespace_args(tmp_path):
    from adapters.lavt import retrofit_lavt

    H = _replica("lavt_host")
    args = H.tiny_args()
    torch.manual_seed(0)
    trained = H.lavt(args=args)
    path = tmp_path / "model_best_lavt.pth"
    torch.save({"model": trained.state_dict(), "epoch": 2, "args": argparse.Namespace(lr=5e-5, model="lavt"),
                "optimizer": torch.optim.AdamW(trained.parameters()).state_dict()}, path)
    torch.manual_seed(1)
    new = retrofit_lavt(H.lavt(args=args), num_queries=4, query_dim=32, grid_size=(4, 4), text_dim=args.text_dim)
    report = load_host_checkpoint(new, path, entries=("model",))
    host = trained.state_dict()
    assert report.entry == "model" and report.stripped_prefix is None
    assert sorted(report.dropped) == ["classifier.conv1_1.bias", "classifier.conv1_1.weight"]
    assert sorted(report.loaded) == sorted(k for k in host if not k.startswith("classifier.conv1_1"))
    assert all(torch.equal(new.state_dict()[k], host[k]) for k in report.loaded)
    assert report.new and all(k.startswith(("classifier.aligner.", "classifier.query_generator.")) for k in report.new)


def test_bad_host_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_host_state_dict(tmp_path / "missing.pth")
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 1, "weights": [1, 2]}, path)
    with pytest.raises(ValueError, match=r"holds no state dict of tensors under \['state_dict', 'model'\].*'epoch'"):
        read_host_state_dict(path)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "thing": Opaque()}, unsafe)
    with pytest.raises(ValueError, match="cannot be read as a weights-only torch checkpoint.*Opaque"):
        read_host_state_dict(unsafe)
    # A bare state dict is accepted as is.
    bare = tmp_path / "bare.pth"
    torch.save({"w": torch.ones(2)}, bare)
    state, entry, prefix, _ = read_host_state_dict(bare)
    assert entry is None and prefix is None and torch.equal(state["w"], torch.ones(2))


def test_shape_mismatch_is_dropped_and_reported(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"0.weight": torch.ones(2, 3), "1.weight": torch.ones(5, 5)}}, path)
    report = load_host_checkpoint(model, path)
    assert report.loaded == ["0.weight"] and torch.equal(model[0].weight, torch.ones(2, 3))
    assert report.mismatched == [("1.weight", (5, 5), (1, 2))]
    assert "1.weight: shape [5, 5] in the checkpoint, [1, 2] in the model" in report.format()
    assert sorted(report.new) == ["0.bias", "1.bias", "1.weight"]
