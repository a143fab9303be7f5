"""Tests of the LAVT adapter: retrofit contract on a LAVT replica, the run script, and (opt-in) real LAVT.

Axis legend: b batch, n queries, l words, e language width, c channels, h w space.

CI has no LAVT code (GPLv3; never vendored): ``tests/hosts/lavt_host.py`` reproduces the
upstream classes' attribute names, signatures and shapes at toy size. Set
``VLALIGNER_LAVT_ROOT`` to a LAVT-RIS checkout to run the same checks against the real
classes (CPU, random weights; mmcv / mmseg, used upstream only to load Swin weights, are
stubbed by the test when not installed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters import shallow_module_copy
from adapters.lavt import LAVTWithAligner, retrofit_lavt, two_class_logits
from vlaligner import MultiQueryGenerator, VisionLanguageAligner

REPO = Path(__file__).resolve().parents[1]
HOSTS = Path(__file__).resolve().parent / "hosts"


def _load_replica():
    spec = importlib.util.spec_from_file_location("vlaligner_test_lavt_host", HOSTS / "lavt_host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H = _load_replica()
SMALL = dict(num_queries=4, query_dim=32, grid_size=(4, 4))


def _inputs(args, one: bool, batch):
    image, _, l_feats, l_mask, ids = batch
    return (image, ids, l_mask[..., 0].long()) if one else (image, l_feats, l_mask)


@pytest.fixture(params=["lavt", "lavt_one"])
def host(request):
    torch.manual_seed(0)
    one = request.param == "lavt_one"
    args = H.tiny_args(model=request.param)
    model = (H.lavt_one if one else H.lavt)(pretrained="", args=args)
    batch = H.random_batch(args)
    text_dim = None if one else args.text_dim
    return args, one, model, batch, dict(SMALL, text_dim=text_dim)


def _grads_ok(module: nn.Module) -> None:
    params = list(module.named_parameters())
    assert params
    missing = [name for name, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/non-finite gradient for {missing}"
    assert any(p.grad.abs().sum() > 0 for _, p in params)


def test_two_class_logits_is_exact_for_softmax_argmax_and_ce():
    m = torch.randn(3, 1, 5, 5) * 4
    two = two_class_logits(m)
    assert two.shape == (3, 2, 5, 5) and torch.equal(two[:, 0], torch.zeros(3, 5, 5))
    assert torch.allclose(two.softmax(1)[:, 1], torch.sigmoid(m[:, 0]), atol=1e-6)
    assert torch.equal(two.argmax(1), (m[:, 0] > 0).long())
    target = (torch.rand(3, 5, 5) > 0.5).long()
    ce = F.cross_entropy(two, target, reduction="none")
    bce = F.binary_cross_entropy_with_logits(m[:, 0], target.float(), reduction="none")
    assert torch.allclose(ce, bce, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(b 1 h w\)"):
        two_class_logits(torch.zeros(3, 2, 5, 5))


def test_outputs_keep_lavt_contract_in_train_and_eval(host):
    args, one, model, batch, kw = host
    inputs = _inputs(args, one, batch)
    model.eval()
    reference = model(*inputs)
    new = retrofit_lavt(model, **kw)
    assert isinstance(new, LAVTWithAligner) and new.has_text_encoder == one
    assert isinstance(new.classifier.aligner, VisionLanguageAligner)
    assert isinstance(new.classifier.query_generator, MultiQueryGenerator)
    assert isinstance(new.classifier.conv1_1, nn.Identity)
    for mode in (True, False):
        new.train(mode)
        out = new(*inputs)
        assert out.shape == reference.shape == (2, 2, args.img_size, args.img_size)
        assert out.dtype == reference.dtype
        assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # [0, m]


def test_aligner_gets_gradients_through_lavt_loss(host):
    args, one, model, batch, kw = host
    new = retrofit_lavt(model, **kw).train()
    out = new(*_inputs(args, one, batch))
    loss = H.criterion(out, batch[1])  # LAVT's weighted cross-entropy
    loss.backward()
    assert torch.isfinite(loss)
    _grads_ok(new.classifier.aligner)
    _grads_ok(new.classifier.query_generator)
    assert model.classifier.conv2_2.weight.grad is not None  # LAVT's decoder trains through it


def test_aligner_lives_in_classifier_parameters(host):
    # LAVT's train.py optimises backbone.parameters() and classifier.parameters() (and BERT).
    args, one, model, batch, kw = host
    new = retrofit_lavt(model, **kw)
    optimised = {id(p) for p in new.backbone.parameters()} | {id(p) for p in new.classifier.parameters()}
    if one:
        optimised |= {id(p) for p in new.text_encoder.parameters()}
    assert {id(p) for p in new.parameters()} <= optimised
    assert any(k.startswith("classifier.aligner.") for k in new.state_dict())
    assert "classifier.conv1_1.weight" not in new.state_dict()


def test_fixed_head_is_identical_and_host_untouched(host):
    args, one, model, batch, kw = host
    inputs = _inputs(args, one, batch)
    keys = set(model.state_dict())
    fixed = retrofit_lavt(model, head="fixed")
    aligned = retrofit_lavt(model, **kw)
    assert isinstance(model.classifier.conv1_1, nn.Conv2d)  # the given model keeps its head
    assert set(model.state_dict()) == keys
    assert keys - {"classifier.conv1_1.weight", "classifier.conv1_1.bias"} <= set(aligned.state_dict())
    for mode in (True, False):
        model.train(mode)
        fixed.train(mode)
        torch.manual_seed(7)
        expected = model(*inputs)
        torch.manual_seed(7)
        assert torch.equal(fixed(*inputs), expected)


def test_generator_reads_lavt_features(host):
    args, one, model, batch, kw = host
    new = retrofit_lavt(model, **kw).eval()
    seen = {}
    new.classifier.query_generator.register_forward_hook(lambda m, a, out: seen.update(args=a))
    new(*_inputs(args, one, batch))
    vision, words, word_mask, global_vision = seen["args"]
    e = args.text_dim
    assert [v.shape[1] for v in vision] == [16, 32, 64]  # stride 8 / 16 / 32 stages
    assert words.shape == (2, args.num_words, e)  # (b l e): l_feats transposed
    assert word_mask.dtype == torch.bool and torch.equal(word_mask, batch[3][..., 0] > 0)
    assert global_vision.shape == (2, 64)
    if not one:
        assert torch.equal(words, batch[2].transpose(1, 2))


def test_query_scores_and_variants(host):
    args, one, model, batch, kw = host
    new = retrofit_lavt(model, **kw).eval()
    logits, scores, masks = new.predict(*_inputs(args, one, batch), return_query_masks=True)
    size = args.img_size // 4
    assert logits.shape == (2, 2, size, size) and masks.shape == (2, 4, size, size)
    assert torch.allclose(scores.sum(-1), torch.ones(2), atol=1e-5)
    plain = retrofit_lavt(model, **{**kw, "num_queries": 2, "kernel_size": 1, "use_estimator": False,
                                    "use_global_vision": False}).eval()
    _, scores, _ = plain.predict(*_inputs(args, one, batch))
    assert torch.allclose(scores, torch.full((2, 2), 0.5))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(head="none"), ValueError, "head must be one of"),
        (dict(num_queries=-1), ValueError, "num_queries must be an int >= 1"),
        (dict(kernel_size=4), ValueError, "kernel_size must be a positive odd int"),
        (dict(use_estimator=1), TypeError, "use_estimator must be a bool"),
        (dict(query_dim=20), ValueError, "divisible by the estimator's num_heads"),
    ],
)
def test_bad_arguments_raise(kwargs, error, message):
    args = H.tiny_args()
    with pytest.raises(error, match=message):
        retrofit_lavt(H.lavt(args=args), **{**SMALL, **kwargs})


def test_wrong_model_or_inputs_raise():
    args = H.tiny_args()
    model = H.lavt(args=args)
    with pytest.raises(TypeError, match="LAVT model as built by"):
        retrofit_lavt(nn.Sequential())
    broken = shallow_module_copy(model)
    broken.classifier = shallow_module_copy(model.classifier)
    broken.classifier.conv1_1 = nn.Conv2d(32, 1, 1)
    with pytest.raises(TypeError, match=r"conv1_1 = Conv2d\(c, 2, 1\)"):
        retrofit_lavt(broken)
    new = retrofit_lavt(model, **SMALL, text_dim=args.text_dim).eval()
    image, _, l_feats, l_mask, _ = H.random_batch(args)
    with pytest.raises(ValueError, match=r"l_mask must have shape \(b l 1\)"):
        new(image, l_feats, l_mask[..., 0])
    with pytest.raises(ValueError, match=r"channels-first BERT features \(b e l\)"):
        new(image, l_feats[0], l_mask)
    wrong_width = retrofit_lavt(model, **SMALL).eval()  # text_dim defaults to 768, replica has 24
    with pytest.raises(ValueError, match="text_dim = 768"):
        wrong_width(image, l_feats, l_mask)


# --- run script on a replica checkout ----------------------------------------------------------

_TRAIN = '''
"""A stand-in for LAVT's train.py: segmentation.__dict__[args.model], LAVT's param groups."""
import argparse, json, os
import torch
from lib import segmentation
import lavt_host

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="lavt")
parser.add_argument("--img_size", type=int, default=64)
parser.add_argument("--local_rank", type=int)  # LAVT's args.py: this spelling only, no default
parser.add_argument("--model_id", default="lavt")
parser.add_argument("--output-dir", default="./checkpoints/")
parser.add_argument("--resume", default="")
parser.add_argument("--out", required=True)

if __name__ == "__main__":
    args = parser.parse_args()
    host_args = lavt_host.tiny_args(model=args.model, img_size=args.img_size)
    model = segmentation.__dict__[args.model](pretrained="", args=host_args)
    start = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    params = [{"params": list(model.backbone.parameters())},
              {"params": [p for p in model.classifier.parameters() if p.requires_grad]}]
    if args.model == "lavt_one":
        params.append({"params": list(model.text_encoder.parameters())})
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    image, target, l_feats, l_mask, ids = lavt_host.random_batch(host_args)
    model.train()
    if args.model == "lavt_one":
        output = model(image, ids, l_mask=l_mask[..., 0].long())
    else:
        output = model(image, l_feats, l_mask=l_mask)
    loss = lavt_host.criterion(output, target)
    loss.backward()
    optimizer.step()
    covered = {id(p) for g in params for p in g["params"]}
    other = "lavt" if args.model == "lavt_one" else "lavt_one"
    other_model = segmentation.__dict__[other](pretrained="", args=host_args)
    with open(args.out, "w") as f:
        json.dump(dict(cls=type(model).__name__, head=model.head, out=list(output.shape),
                       other_cls=type(other_model).__name__,
                       loss=float(loss), all_optimised=all(id(p) in covered for p in model.parameters()),
                       local_rank=args.local_rank, cwd=os.getcwd(), model_id=args.model_id,
                       start=start), f)
'''


def _replica_checkout(root: Path) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "__init__.py").write_text("")
    (root / "lib" / "segmentation.py").write_text("from lavt_host import lavt, lavt_one\n")
    (root / "lib" / "_utils.py").write_text("from lavt_host import LAVT, LAVTOne\n")
    (root / "lib" / "mask_predictor.py").write_text("from lavt_host import SimpleDecoding\n")
    (root / "train.py").write_text(textwrap.dedent(_TRAIN))
    return root


def _run_lavt(checkout: Path, cwd: Path, *args: str, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HOSTS), str(REPO)]), OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(REPO / "adapters" / "lavt" / "run_lavt.py"), "--host-root", str(checkout), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_run_script_patches_lavt_builders(tmp_path):
    checkout = _replica_checkout(tmp_path / "LAVT-RIS")
    out = tmp_path / "result.json"
    # --text-dim matches the replica's 24-wide words (LAVT-One reads it from its BERT anyway).
    # --local-rank is what torch.distributed.launch passes since torch 2.0.
    proc = _run_lavt(checkout, tmp_path, "--local-rank=0", "--skip-deps-check", "--num-queries", "4",
                     "--query-dim", "32", "--text-dim", "24", "--model", "lavt_one", "--", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cls"] == result["other_cls"] == "LAVTWithAligner"  # both builders wrapped
    assert result["head"] == "aligner" and result["local_rank"] == 0
    assert result["out"] == [2, 2, 64, 64] and result["loss"] > 0
    assert result["all_optimised"]  # the aligner is trained by LAVT's own optimizer setup
    assert Path(result["cwd"]).resolve() == checkout.resolve()
    # Its checkpoint name differs from a plain run's, and the script says where it goes.
    assert result["model_id"] == "lavt_aligner"
    assert "model_best_lavt_aligner.pth" in proc.stdout


@pytest.mark.slow  # four subprocesses; the forms themselves are unit-tested in test_adapter_runner.py
@pytest.mark.parametrize(
    "launch, env, expected",
    [
        (["--local_rank=2"], {}, 2),          # torch < 2.0's launcher
        (["--local-rank", "3"], {}, 3),       # torch >= 2.0's launcher
        ([], {"LOCAL_RANK": "1"}, 1),         # torchrun: the environment only
        ([], {}, None),                       # a plain single-process run
    ],
)
def test_run_script_gives_lavt_the_local_rank_it_understands(tmp_path, launch, env, expected):
    checkout = _replica_checkout(tmp_path / "LAVT-RIS")
    out = tmp_path / "result.json"
    proc = _run_lavt(checkout, tmp_path, *launch, "--skip-deps-check", "--head", "fixed", "--model", "lavt",
                     "--model_id", "mine", "--out", str(out), env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["local_rank"] == expected and result["head"] == "fixed"
    assert result["model_id"] == "mine_fixed"


def test_run_script_init_from_host_checkpoint(tmp_path):
    checkout = _replica_checkout(tmp_path / "LAVT-RIS")
    args = H.tiny_args(img_size=64)
    torch.manual_seed(7)
    trained = H.lavt(args=args)
    ckpt = tmp_path / "model_best_lavt.pth"
    torch.save({"model": trained.state_dict(), "epoch": 3, "args": argparse.Namespace(model="lavt", lr=5e-5)}, ckpt)
    out = tmp_path / "result.json"
    proc = _run_lavt(checkout, tmp_path, "--skip-deps-check", "--init-from-host", str(ckpt), "--num-queries", "4",
                     "--query-dim", "32", "--text-dim", "24", "--model", "lavt", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = json.loads(out.read_text())["start"]
    for key, value in trained.state_dict().items():
        if key.startswith("classifier.conv1_1."):
            assert key not in start
        else:
            assert start[key] == pytest.approx(float(value.double().sum()), rel=1e-12, abs=1e-12), key
    assert "dropped     2 host tensors" in proc.stdout and "classifier.conv1_1.weight" in proc.stdout
    assert "classifier.aligner.*" in proc.stdout and "classifier.query_generator.*" in proc.stdout
    proc = _run_lavt(checkout, tmp_path, "--skip-deps-check", "--init-from-host", str(ckpt), "--resume", "x.pth")
    assert proc.returncode != 0 and "--init-from-host and --resume exclude each other" in proc.stderr


def test_run_script_checks_lavt_dependencies_first(tmp_path):
    from adapters.launch import dependency_message, missing_dependencies
    from adapters.lavt.run_lavt import LAVT_DEPENDENCIES

    checkout = _replica_checkout(tmp_path / "LAVT-RIS")
    out = tmp_path / "result.json"
    proc = _run_lavt(checkout, tmp_path, "--num-queries", "4", "--query-dim", "32", "--text-dim", "24",
                     "--out", str(out))
    missing = missing_dependencies(LAVT_DEPENDENCIES)
    if missing:
        assert proc.returncode == 2 and not out.exists()
        assert proc.stderr.strip() == dependency_message("LAVT", "train.py", missing)
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


# --- opt-in: the real LAVT ---------------------------------------------------------------------

LAVT_ROOT = os.environ.get("VLALIGNER_LAVT_ROOT")


def _stub_weight_loading(monkeypatch) -> None:
    """mmcv / mmseg serve LAVT only to load Swin weights (lib/mmcv_custom, get_root_logger)."""
    def unavailable(*args, **kwargs):
        raise RuntimeError("mmcv/mmseg are stubbed in this test: no Swin weights are loaded")

    stubs = {
        "mmcv": {}, "mmcv.fileio": {"FileClient": object, "load": unavailable},
        "mmcv.parallel": {"is_module_wrapper": lambda module: False},
        "mmcv.utils": {"mkdir_or_exist": unavailable}, "mmcv.runner": {"get_dist_info": lambda: (0, 1)},
        "mmseg": {}, "mmseg.utils": {"get_root_logger": unavailable},
    }
    for name, attrs in stubs.items():
        if name.split(".")[0] not in sys.modules and importlib.util.find_spec(name.split(".")[0]):
            continue  # the real package is installed: use it
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture()
def real_lavt(monkeypatch, tmp_path):
    if not LAVT_ROOT:
        pytest.skip("set VLALIGNER_LAVT_ROOT to a LAVT-RIS checkout to run against real LAVT")
    root = Path(LAVT_ROOT).resolve()
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m.split(".")[0] in ("lib", "bert")]:
        monkeypatch.delitem(sys.modules, name)
    _stub_weight_loading(monkeypatch)
    segmentation = importlib.import_module("lib.segmentation")
    bert = importlib.import_module("bert.modeling_bert")
    config = importlib.import_module("bert.configuration_bert")
    # LAVT-One loads BERT with from_pretrained(args.ck_bert): write a small random one (768
    # wide, as LAVT's PWAM requires) with LAVT's own BERT code.
    torch.manual_seed(0)
    bert.BertModel(config.BertConfig(
        vocab_size=1000, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
        intermediate_size=1024,
    )).save_pretrained(str(tmp_path / "bert"))
    args = SimpleNamespace(swin_type="tiny", window12=False, mha="", fusion_drop=0.0,
                           ck_bert=str(tmp_path / "bert"))
    return segmentation, args


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("which", ["lavt", "lavt_one"])
def test_real_lavt_retrofit(real_lavt, which):
    segmentation, args = real_lavt
    torch.manual_seed(0)
    model = getattr(segmentation, which)(pretrained="", args=args)
    size, l = 224, 20
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, size, size, generator=g)
    mask = torch.zeros(2, l, dtype=torch.long)
    mask[0, :6] = 1
    mask[1, :11] = 1
    if which == "lavt_one":
        inputs = (image, torch.randint(1, 1000, (2, l), generator=g) * mask, mask)
    else:
        inputs = (image, torch.randn(2, 768, l, generator=g), mask[:, :, None])
    target = (torch.rand(2, size, size, generator=g) > 0.5).long()
    new = retrofit_lavt(model, grid_size=(size // 16, size // 16))
    assert new.classifier.query_generator.vision_channels == (192, 384, 768)  # Swin-T stages 2-4
    new.train()
    out = new(*inputs)
    assert out.shape == (2, 2, size, size)
    loss = F.cross_entropy(out, target, weight=torch.tensor([0.9, 1.1]))  # LAVT's criterion
    loss.backward()
    _grads_ok(new.classifier.aligner)
    _grads_ok(new.classifier.query_generator)
    fixed = retrofit_lavt(model, head="fixed")
    model.eval()
    fixed.eval()
    new.eval()
    with torch.no_grad():
        assert new(*inputs).shape == (2, 2, size, size)
        assert torch.equal(model(*inputs), fixed(*inputs))


@pytest.mark.integration
def test_real_lavt_builders_are_patched_by_run_script(real_lavt):
    from adapters.lavt.run_lavt import patch_lavt_builders

    segmentation, args = real_lavt
    original = segmentation.lavt
    settings = {"host_root": LAVT_ROOT, "retrofit": {"num_queries": 4, "head": "aligner"}}
    try:
        patch_lavt_builders(settings)
        patch_lavt_builders(settings)  # idempotent
        assert segmentation.lavt.__vlaligner_original__ is original
        args.img_size = 224
        model = segmentation.__dict__["lavt"](pretrained="", args=args)
        assert isinstance(model, LAVTWithAligner) and model.head == "aligner"
        assert model.classifier.query_generator.grid_size == (14, 14)
    finally:
        segmentation.lavt = original


@pytest.mark.integration
@pytest.mark.parametrize("launch", [["--local-rank=0"], ["--local_rank", "0"], []])
def test_real_lavt_parser_accepts_what_the_run_script_passes(launch, monkeypatch):
    """LAVT's own args.py parses the command line run_lavt.py hands it, for every launcher form."""
    if not LAVT_ROOT:
        pytest.skip("set VLALIGNER_LAVT_ROOT to a LAVT-RIS checkout to run against real LAVT")
    from adapters.launch import normalize_local_rank
    from adapters.lavt.run_lavt import suffixed_model_id

    spec = importlib.util.spec_from_file_location("vlaligner_test_lavt_args", Path(LAVT_ROOT) / "args.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv, rank = normalize_local_rank([*launch, "--model", "lavt", "--swin_type", "tiny"], host_flag="--local_rank",
                                      environ={"LOCAL_RANK": "0"})
    args = module.get_parser().parse_args(suffixed_model_id(argv, "_aligner"))
    assert args.local_rank == rank == 0 and args.model_id == "lavt_aligner" and args.swin_type == "tiny"
    with pytest.raises(SystemExit):  # what the launcher passes, unnormalised, LAVT refuses
        module.get_parser().parse_args(["--local-rank=0"])
