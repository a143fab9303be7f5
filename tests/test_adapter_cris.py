"""Tests of the CRIS adapter: retrofit contract on a CRIS replica, the run script, and (opt-in) real CRIS.

Axis legend: b batch, n queries, l words, c channels, h w space.

CI has no CRIS code: ``tests/hosts/cris_host.py`` reproduces the upstream classes' attribute
names, signatures and shapes at toy size. Set ``VLALIGNER_CRIS_ROOT`` to a CRIS.pytorch
checkout to run the same checks against the real classes (CPU, random weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adapters import regroup_params, shallow_module_copy
from adapters.cris import CRISWithAligner, retrofit_cris
from vlaligner import MultiQueryGenerator, VisionLanguageAligner

REPO = Path(__file__).resolve().parents[1]
HOSTS = Path(__file__).resolve().parent / "hosts"


def _load_replica():
    spec = importlib.util.spec_from_file_location("vlaligner_test_cris_host", HOSTS / "cris_host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H = _load_replica()
SMALL = dict(num_queries=4, query_dim=32, grid_size=(4, 4))


@pytest.fixture()
def host():
    torch.manual_seed(0)
    cfg = H.tiny_cfg()
    model, _ = H.build_segmenter(cfg)
    return cfg, model, H.random_batch(cfg)


def _grads_ok(module: nn.Module) -> None:
    params = list(module.named_parameters())
    assert params
    missing = [name for name, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/non-finite gradient for {missing}"
    assert any(p.grad.abs().sum() > 0 for _, p in params)


# --- contract --------------------------------------------------------------------------------


def test_train_and_eval_outputs_keep_cris_contract(host):
    cfg, model, (img, word, mask) = host
    model.train()
    torch.manual_seed(1)
    ref_pred, ref_mask, ref_loss = model(img, word, mask)
    new = retrofit_cris(model, **SMALL)
    assert isinstance(new, CRISWithAligner) and new.training
    assert isinstance(new.proj, VisionLanguageAligner)
    assert isinstance(new.query_generator, MultiQueryGenerator)
    pred, out_mask, loss = new(img, word, mask)
    assert pred.shape == ref_pred.shape == (2, 1, 16, 16)
    assert out_mask.shape == ref_mask.shape and torch.equal(out_mask, ref_mask)
    assert not pred.requires_grad and pred.dtype == ref_pred.dtype
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    new.eval()
    out = new(img, word)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 16, 16) and not out.requires_grad


def test_aligner_gets_gradients_through_cris_loss(host):
    _, model, (img, word, mask) = host
    new = retrofit_cris(model, **SMALL).train()
    _, _, loss = new(img, word, mask)
    loss.backward()
    _grads_ok(new.proj)
    _grads_ok(new.query_generator)
    # The host's own parts train too, through the aligner.
    assert model.neck.aggr[0].weight.grad is not None


def test_fixed_head_is_identical_to_host(host):
    _, model, (img, word, mask) = host
    fixed = retrofit_cris(model, head="fixed")
    assert fixed.proj is model.proj and fixed.query_generator is None
    model.train()
    torch.manual_seed(3)
    expected = model(img, word, mask)
    torch.manual_seed(3)
    got = fixed(img, word, mask)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    model.eval()
    fixed.eval()
    assert torch.equal(model(img, word), fixed(img, word))


def test_retrofit_leaves_host_and_its_keys(host):
    _, model, (img, word, _) = host
    model.eval()
    before = model(img, word)
    keys = set(model.state_dict())
    new = retrofit_cris(model, **SMALL)
    assert torch.equal(model(img, word), before)  # the given model still works unchanged
    new_keys = set(new.state_dict())
    shared = {k for k in keys if not k.startswith("proj.")}
    assert shared <= new_keys  # backbone / neck / decoder load from a CRIS checkpoint as is
    assert any(k.startswith("query_generator.") for k in new_keys)
    assert new.backbone is model.backbone and new.decoder is model.decoder


def test_query_scores_masks_and_variants(host):
    _, model, (img, word, _) = host
    new = retrofit_cris(model, **SMALL).eval()
    logits, scores, masks = new.predict(img, word, return_query_masks=True)
    assert scores.shape == (2, 4) and torch.allclose(scores.sum(-1), torch.ones(2), atol=1e-5)
    assert masks.shape == (2, 4, 16, 16)
    # Linearity: the fused logits equal the score-weighted sum of the query masks.
    assert torch.allclose(logits[:, 0], (scores[:, :, None, None] * masks).sum(1), atol=1e-4)
    plain = retrofit_cris(model, num_queries=3, kernel_size=1, use_estimator=False,
                          use_global_vision=False, query_dim=16, grid_size=(4, 4)).eval()
    logits, scores, _ = plain.predict(img, word)
    assert logits.shape == (2, 1, 16, 16)
    assert torch.allclose(scores, torch.full((2, 3), 1 / 3))
    assert plain.query_generator.global_proj is None


def test_generator_reads_cris_words_with_real_word_mask(host):
    _, model, (img, word, _) = host
    new = retrofit_cris(model, **SMALL).eval()
    seen = {}
    new.query_generator.register_forward_hook(lambda m, args, out: seen.update(args=args))
    new(img, word)
    vision, words, word_mask, global_vision = seen["args"]
    assert [v.shape[1] for v in vision] == [16, 24, 48]  # the three encode_image maps
    assert words.shape == (2, 8, 32)  # (b l width) from encode_text
    assert word_mask.dtype == torch.bool and torch.equal(word_mask, word != 0)  # True = real
    assert global_vision.shape == (2, 48)
    assert torch.allclose(global_vision, model.backbone.encode_image(img)[2].mean((2, 3)))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(head="dynamic"), ValueError, "head must be one of"),
        (dict(num_queries=0), ValueError, "num_queries must be an int >= 1"),
        (dict(kernel_size=2), ValueError, "kernel_size must be a positive odd int"),
        (dict(use_estimator="yes"), TypeError, "use_estimator must be a bool"),
        (dict(query_dim=30), ValueError, "divisible by the estimator's num_heads"),
    ],
)
def test_bad_arguments_raise(host, kwargs, error, message):
    _, model, _ = host
    with pytest.raises(error, match=message):
        retrofit_cris(model, **{**SMALL, **kwargs})


def test_wrong_model_raises(host):
    _, model, (img, _, mask) = host
    with pytest.raises(TypeError, match="CRIS model as built by"):
        retrofit_cris(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be the CRIS nn.Module"):
        retrofit_cris("CRIS")
    broken = shallow_module_copy(model)
    broken.proj = nn.Conv2d(2, 1, 1)
    with pytest.raises(TypeError, match="model.proj must be CRIS's Projector"):
        retrofit_cris(broken)
    new = retrofit_cris(model, **SMALL).train()
    with pytest.raises(ValueError, match=r"word must be a \(b l\) tensor"):
        new(img, torch.zeros(2, 3, 4, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="needs mask"):
        new(img, torch.ones(2, 8, dtype=torch.long))


def test_regroup_params_moves_aligner_into_head_group(host):
    cfg, _, _ = host
    model, groups = H.build_segmenter(cfg)
    new = retrofit_cris(model, **SMALL)
    regrouped = regroup_params(groups, new, anchor=list(model.proj.parameters()))
    ids = [{id(p) for p in g["params"]} for g in regrouped]
    assert [g["initial_lr"] for g in regrouped] == [g["initial_lr"] for g in groups]
    assert all(id(p) in ids[1] for p in new.proj.parameters())
    assert all(id(p) in ids[1] for p in new.query_generator.parameters())
    assert not any(id(p) in ids[0] | ids[1] for p in model.proj.parameters())
    assert set().union(*ids) == {id(p) for p in new.parameters()}


def test_up_projection_is_cris_projectors(host):
    """The aligner's up-projection has the layers, shapes and parameter count of CRIS's Projector.vis."""
    _, model, _ = host
    new = retrofit_cris(model, **SMALL)
    ours = list(new.proj.mask_generator.projection.layers.named_parameters())
    theirs = list(model.proj.vis.named_parameters())
    assert [(n, p.shape) for n, p in ours] == [(n, p.shape) for n, p in theirs]
    # At CRIS's own size (decoder width 512, in_dim 256): 512 -> 512 -> 256, 1x1 to 256, 3.61 M.
    projector = H.Projector(word_dim=1024, in_dim=256, kernel_size=3)
    aligner = VisionLanguageAligner(in_channels=512, query_dim=512, num_upsamples=2, mask_channels=256,
                                    hidden_channels=(512, 256))
    count = sum(p.numel() for p in aligner.mask_generator.projection.parameters())
    assert count == sum(p.numel() for p in projector.vis.parameters()) == 3_606_272
    assert [tuple(p.shape) for p in aligner.mask_generator.projection.parameters()] == [
        tuple(p.shape) for p in projector.vis.parameters()
    ]


# --- run script on a replica checkout ----------------------------------------------------------

_TRAIN = '''
"""A stand-in for CRIS's train.py: config via utils.config, model via build_segmenter, spawns a worker."""
import argparse, json, os, sys
import torch
import torch.multiprocessing as mp
import utils.config as config
from model import build_segmenter
import cris_host


def main_worker(gpu, cfg, out):
    torch.manual_seed(0)
    model_cfg = cris_host.tiny_cfg()
    model_cfg.output_dir = os.path.join(cfg.output_folder, cfg.exp_name)  # as CRIS, before building
    model_cfg.rank = gpu
    model, param_list = build_segmenter(model_cfg)
    start = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    img, word, mask = cris_host.random_batch(model_cfg)
    model.train()
    pred, mask, loss = model(img, word, mask)
    optimizer = torch.optim.Adam(param_list, lr=model_cfg.base_lr)
    loss.backward()
    optimizer.step()
    in_groups = {id(p) for g in param_list for p in g["params"]}
    head_group = {id(p) for p in param_list[1]["params"]}
    with open(out, "w") as f:
        json.dump(dict(
            cls=type(model).__name__, head=getattr(model, "head", None), pred=list(pred.shape),
            loss=float(loss), all_in_groups=all(id(p) in in_groups for p in model.parameters()),
            proj_in_head_group=all(id(p) in head_group for p in model.proj.parameters()),
            proj=type(model.proj).__name__, main=__name__, cwd=os.getcwd(),
            output_dir=model_cfg.output_dir, start=start,
        ), f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--opts", default=None, nargs=argparse.REMAINDER)
    args = parser.parse_args()
    assert os.path.isfile(args.config), args.config  # relative to the checkout
    cfg = config.load_cfg_from_cfg_file(args.config)
    if args.opts is not None:
        cfg = config.merge_cfg_from_list(cfg, args.opts)
    mp.spawn(main_worker, nprocs=1, args=(cfg, args.out))


if __name__ == "__main__":
    main()
    sys.exit(0)
'''

_CONFIG = '''
"""A stand-in for CRIS's utils/config.py: flat "key: value" files and KEY VALUE overrides."""
from types import SimpleNamespace


def load_cfg_from_cfg_file(file):
    cfg = {}
    for line in open(file):
        if ":" in line and line.startswith("  "):
            key, value = line.strip().split(":", 1)
            cfg[key.strip()] = value.strip()
    return SimpleNamespace(**cfg)


def merge_cfg_from_list(cfg, cfg_list):
    for full_key, value in zip(cfg_list[0::2], cfg_list[1::2]):
        setattr(cfg, full_key.split(".")[-1], value)
    return cfg
'''


def _replica_checkout(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "__init__.py").write_text("from cris_host import CRIS, build_segmenter\n")
    (root / "model" / "segmenter.py").write_text("from cris_host import CRIS\n")
    (root / "model" / "layers.py").write_text("from cris_host import FPN, Projector, TransformerDecoder\n")
    (root / "utils").mkdir()
    (root / "utils" / "__init__.py").write_text("")
    (root / "utils" / "config.py").write_text(textwrap.dedent(_CONFIG))
    (root / "config").mkdir()
    (root / "config" / "tiny.yaml").write_text(
        "TRAIN:\n  input_size: 64\n  exp_name: CRIS_tiny\n  output_folder: exp/refcoco\n"
    )
    (root / "train.py").write_text(textwrap.dedent(_TRAIN))
    return root


def _run_cris(checkout: Path, cwd: Path, *args: str, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HOSTS), str(REPO)]), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(REPO / "adapters" / "cris" / "run_cris.py"), "--host-root", str(checkout), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_run_script_patches_builder_in_spawned_workers(tmp_path):
    checkout = _replica_checkout(tmp_path / "CRIS.pytorch")
    out = tmp_path / "result.json"
    # --local-rank (torch >= 2.0's launcher) is taken out: CRIS's parser has no such flag.
    proc = _run_cris(checkout, tmp_path, "--local-rank=0", "--skip-deps-check", "--num-queries", "4",
                     "--query-dim", "32", "--config", "config/tiny.yaml", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cls"] == "CRISWithAligner" and result["head"] == "aligner"
    assert result["proj"] == "VisionLanguageAligner"
    assert result["pred"] == [2, 1, 16, 16] and result["loss"] > 0
    assert result["all_in_groups"] and result["proj_in_head_group"]
    assert result["main"] == "__mp_main__"  # it ran in the spawned worker
    assert Path(result["cwd"]).resolve() == checkout.resolve()
    # Outputs go to a folder of their own, said at the start.
    assert result["output_dir"] == os.path.join("exp/refcoco", "CRIS_tiny_aligner")
    assert "its experiment name gets the suffix '_aligner'" in proc.stdout
    assert "this run writes to exp/refcoco/CRIS_tiny_aligner" in proc.stdout
    # The user's files are untouched.
    assert (checkout / "model" / "__init__.py").read_text() == "from cris_host import CRIS, build_segmenter\n"


@pytest.mark.slow  # two more spawning subprocesses; the default suffix is checked in the test above
def test_run_script_suffix_follows_opts_and_option(tmp_path):
    checkout = _replica_checkout(tmp_path / "CRIS.pytorch")
    out = tmp_path / "result.json"
    proc = _run_cris(checkout, tmp_path, "--skip-deps-check", "--head", "fixed", "--config", "config/tiny.yaml",
                     "--out", str(out), "--opts", "TRAIN.exp_name", "mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["head"] == "fixed" and result["output_dir"] == os.path.join("exp/refcoco", "mine_fixed")
    proc = _run_cris(checkout, tmp_path, "--skip-deps-check", "--output-suffix", "_n8", "--num-queries", "4",
                     "--query-dim", "32", "--config", "config/tiny.yaml", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["output_dir"] == os.path.join("exp/refcoco", "CRIS_tiny_n8")


def test_run_script_init_from_host_checkpoint(tmp_path):
    checkout = _replica_checkout(tmp_path / "CRIS.pytorch")
    torch.manual_seed(123)
    trained, _ = H.build_segmenter(H.tiny_cfg())
    ckpt = tmp_path / "best_model.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    out = tmp_path / "result.json"
    proc = _run_cris(checkout, tmp_path, "--skip-deps-check", "--init-from-host", str(ckpt), "--num-queries", "4",
                     "--query-dim", "32", "--config", "config/tiny.yaml", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = json.loads(out.read_text())["start"]
    host = trained.state_dict()
    for key, value in host.items():
        if key.startswith("proj.vis."):
            key = "proj.mask_generator.projection.layers." + key[len("proj.vis."):]
        elif key.startswith("proj.txt."):
            assert key not in start
            continue
        assert start[key] == pytest.approx(float(value.double().sum()), rel=1e-12, abs=1e-12), key
    assert f"init from host checkpoint {ckpt}" in proc.stdout
    assert "dropped     2 host tensors" in proc.stdout and "query_generator.*" in proc.stdout
    # test.py reads the run's own checkpoint: --init-from-host is refused there, with the reason.
    proc = _run_cris(checkout, tmp_path, "--skip-deps-check", "--script", "test.py", "--init-from-host", str(ckpt))
    assert proc.returncode != 0 and "CRIS's test.py loads" in proc.stderr


def test_run_script_checks_cris_dependencies_first(tmp_path):
    from adapters.cris.run_cris import CRIS_DEPENDENCIES
    from adapters.launch import dependency_message, missing_dependencies

    checkout = _replica_checkout(tmp_path / "CRIS.pytorch")
    out = tmp_path / "result.json"
    proc = _run_cris(checkout, tmp_path, "--num-queries", "4", "--query-dim", "32", "--config", "config/tiny.yaml",
                     "--out", str(out))
    missing = missing_dependencies(CRIS_DEPENDENCIES)
    if missing:  # one line naming what to install, before CRIS runs
        assert proc.returncode == 2 and not out.exists()
        assert proc.stderr.strip() == dependency_message("CRIS", "train.py", missing)
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_run_script_refuses_several_launcher_processes(tmp_path):
    checkout = _replica_checkout(tmp_path / "CRIS.pytorch")
    proc = _run_cris(checkout, tmp_path, "--skip-deps-check", "--config", "config/tiny.yaml",
                     env_extra={"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert proc.returncode != 0 and "starts one worker per visible GPU itself" in proc.stderr


def test_run_script_rejects_a_folder_that_is_not_cris(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "adapters" / "cris" / "run_cris.py"), "--host-root", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "does not look like a CRIS checkout" in proc.stderr


# --- opt-in: the real CRIS ---------------------------------------------------------------------

CRIS_ROOT = os.environ.get("VLALIGNER_CRIS_ROOT")


@pytest.fixture()
def real_cris(monkeypatch):
    """CRIS(cfg) from the checkout with cris_r50.yaml and a random RN50 CLIP in place of RN50.pt."""
    if not CRIS_ROOT:
        pytest.skip("set VLALIGNER_CRIS_ROOT to a CRIS.pytorch checkout to run against real CRIS")
    import yaml

    root = Path(CRIS_ROOT).resolve()
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "model" or m.startswith("model.")]:
        monkeypatch.delitem(sys.modules, name)
    segmenter = importlib.import_module("model.segmenter")
    clip = importlib.import_module("model.clip")
    sections = yaml.safe_load((root / "config" / "refcoco" / "cris_r50.yaml").read_text())
    cfg = SimpleNamespace(**{k: v for section in sections.values() for k, v in section.items()})
    # CRIS reads CLIP from a TorchScript file; give it RN50's architecture with random weights.
    rn50 = clip.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, cfg.word_len, 49408, 512, 8, 12)
    state = rn50.state_dict()
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: SimpleNamespace(
        eval=lambda: SimpleNamespace(state_dict=lambda: dict(state))))
    torch.manual_seed(0)
    model = segmenter.CRIS(cfg)
    return cfg, model


def _real_cris_batch(cfg, size=160):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, size, size, generator=g)
    word = torch.zeros(2, cfg.word_len, dtype=torch.long)
    for i, length in enumerate((5, 9)):
        word[i, :length] = torch.randint(1, 49000, (length,), generator=g)
        word[i, length - 1] = 49407  # end-of-text, the largest id
    mask = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()
    return img, word, mask


@pytest.mark.integration
@pytest.mark.slow
def test_real_cris_retrofit(real_cris):
    cfg, model = real_cris
    img, word, mask = _real_cris_batch(cfg)
    size = img.shape[-1] // 16
    new = retrofit_cris(model, grid_size=(size, size))
    assert new.proj.mask_generator.mask_channels == model.proj.in_dim == 256
    assert new.query_generator.vision_channels == (512, 1024, 1024)
    new.train()
    pred, out_mask, loss = new(img, word, mask)
    assert pred.shape == out_mask.shape == (2, 1, size * 4, size * 4)
    loss.backward()
    _grads_ok(new.proj)
    _grads_ok(new.query_generator)
    new.eval()
    assert new(img, word).shape == (2, 1, size * 4, size * 4)
    fixed = retrofit_cris(model, head="fixed")
    model.eval()
    fixed.eval()
    with torch.no_grad():
        assert torch.equal(model(img, word), fixed(img, word))
    model.train()
    fixed.train()
    torch.manual_seed(5)
    expected = model(img, word, mask)
    torch.manual_seed(5)
    got = fixed(img, word, mask)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.integration
def test_real_cris_builder_is_patched_by_run_script(real_cris):
    from adapters.cris.run_cris import patch_cris_builder

    cfg, host_model = real_cris
    package = sys.modules["model"]
    original = package.build_segmenter
    settings = {"host_root": CRIS_ROOT, "retrofit": {"num_queries": 4, "head": "aligner"}}
    try:
        patch_cris_builder(settings)
        patch_cris_builder(settings)  # idempotent
        assert package.build_segmenter.__vlaligner_original__ is original
        cfg.base_lr, cfg.lr_multi = 1e-4, 0.1
        model, groups = package.build_segmenter(cfg)
        assert isinstance(model, CRISWithAligner)
        assert model.query_generator.grid_size == (26, 26)  # input_size 416 // 16
        assert [g["initial_lr"] for g in groups] == [1e-5, 1e-4]
        head = {id(p) for p in groups[1]["params"]}
        assert all(id(p) in head for p in model.proj.parameters())
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
    finally:
        package.build_segmenter = original


@pytest.mark.integration
def test_real_cris_config_gets_the_suffix(real_cris):
    """CRIS's own utils.config, wrapped by the run script: exp_name suffixed after the file and --opts."""
    from adapters.cris.run_cris import patch_cris_config

    config = importlib.import_module("utils.config")
    originals = {n: getattr(config, n) for n in ("load_cfg_from_cfg_file", "merge_cfg_from_list")}
    try:
        patch_cris_config("_aligner")
        patch_cris_config("_aligner")  # idempotent
        cfg = config.load_cfg_from_cfg_file(str(Path(CRIS_ROOT) / "config" / "refcoco" / "cris_r50.yaml"))
        assert cfg.exp_name == "CRIS_R50_aligner" and cfg.output_folder == "exp/refcoco"
        assert config.merge_cfg_from_list(cfg, ["TRAIN.base_lr", "0.001"]).exp_name == "CRIS_R50_aligner"
        assert config.merge_cfg_from_list(cfg, ["TRAIN.exp_name", "mine"]).exp_name == "mine_aligner"
    finally:
        for name, fn in originals.items():
            setattr(config, name, fn)
