"""Tests of the VLT host (a PyTorch re-implementation), its retrofit and its training script.

Axis legend: b batch, n queries, l words, e language width, c channels, h w space.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from adapters.vlt import VLT, VLTWithAligner, build_vlt_tiny, retrofit_vlt, vlt_loss
from adapters.vlt.model import QueryBalanceModule, WordAttentionPool, sine_encoding_2d
from adapters.vlt.train_vlt import main as train_main
from adapters.vlt.train_vlt import train_steps
from vlaligner import MultiQueryGenerator, VisionLanguageAligner

SMALL = dict(num_queries=4)


@pytest.fixture(scope="module")
def vlt() -> VLT:
    torch.manual_seed(0)
    return build_vlt_tiny(img_size=64, num_queries=6, vocab_size=200)


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    ids = torch.randint(5, 200, (2, 9), generator=g)
    attention = torch.ones(2, 9, dtype=torch.long)
    attention[1, 4:] = 0
    ids[1, 4:] = 0
    target = (torch.rand(2, 64, 64, generator=g) > 0.5).float()
    return images, ids, attention, target


def test_host_outputs_one_logit_map_in_train_and_eval(vlt, batch):
    images, ids, attention, target = batch
    for mode in (True, False):
        vlt.train(mode)
        logits = vlt(images, ids, attention)
        assert logits.shape == (2, 1, 16, 16)  # out_stride 4 at 64 x 64
    feats = vlt.eval().features(images, ids, attention)
    assert [f.shape[1] for f in feats.vision_feats] == list(vlt.vision_channels) == [32, 64, 128]
    assert feats.decoded.shape == (2, 32, 16, 16) and feats.query_confidence.shape == (2, 6)
    assert ((feats.query_confidence > 0) & (feats.query_confidence < 1)).all()
    assert isinstance(vlt.final_conv, nn.Conv2d) and vlt.final_conv.kernel_size == (3, 3)
    assert torch.isfinite(vlt_loss(vlt(images, ids, attention), target))


def test_retrofit_replaces_final_conv_and_keeps_contract(vlt, batch):
    images, ids, attention, _ = batch
    vlt.eval()
    before = vlt(images, ids, attention)
    new = retrofit_vlt(vlt, **SMALL)
    assert isinstance(new, VLTWithAligner) and isinstance(new, VLT)
    assert isinstance(new.aligner, VisionLanguageAligner)
    assert isinstance(new.query_generator, MultiQueryGenerator)
    assert not hasattr(new, "final_conv") and hasattr(vlt, "final_conv")
    assert new.backbone is vlt.backbone and new.decoder is vlt.decoder
    keys = set(vlt.state_dict()) - {"final_conv.weight", "final_conv.bias"}
    assert keys <= set(new.state_dict())
    new.eval()
    out = new(images, ids, attention)
    assert out.shape == before.shape and out.dtype == before.dtype
    assert torch.equal(vlt.eval()(images, ids, attention), before)  # the host is untouched
    assert new.train()(images, ids, attention).shape == before.shape


def test_fixed_head_is_the_host(vlt, batch):
    images, ids, attention, _ = batch
    fixed = retrofit_vlt(vlt, head="fixed")
    assert fixed is vlt
    with pytest.raises(TypeError, match="already has the aligner"):
        retrofit_vlt(retrofit_vlt(vlt, **SMALL))


def test_aligner_gets_gradients_through_vlt_loss(vlt, batch):
    images, ids, attention, target = batch
    new = retrofit_vlt(vlt, **SMALL).train()
    loss = vlt_loss(new(images, ids, attention), target)
    loss.backward()
    for module in (new.aligner, new.query_generator):
        params = list(module.named_parameters())
        missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, missing
        assert any(p.grad.abs().sum() > 0 for _, p in params)
    assert new.query_balance.confidence.weight.grad is not None  # VLT's own modules train too
    vlt.zero_grad(set_to_none=True)


def test_generator_reads_vlt_features_and_padding_is_ignored(vlt, batch):
    images, ids, attention, _ = batch
    new = retrofit_vlt(vlt, **SMALL).eval()
    seen = {}
    handle = new.query_generator.register_forward_hook(lambda m, a, out: seen.update(args=a))
    out = new(images, ids, attention)
    handle.remove()
    vision, words, word_mask, global_vision = seen["args"]
    assert [v.shape[1] for v in vision] == [32, 64, 128]
    assert words.shape == (2, 9, 32) and torch.equal(word_mask, attention > 0)
    assert global_vision.shape == (2, 128)
    # Token ids under attention_mask == 0 never change the prediction.
    other = ids.clone()
    other[1, 4:] = 77
    assert torch.allclose(new(images, other, attention), out, atol=1e-5)


def test_query_scores_masks_and_variants(vlt, batch):
    images, ids, attention, _ = batch
    new = retrofit_vlt(vlt, **SMALL).eval()
    logits, scores, masks = new.predict(images, ids, attention, return_query_masks=True)
    assert scores.shape == (2, 4) and torch.allclose(scores.sum(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(logits[:, 0], (scores[:, :, None, None] * masks).sum(1), atol=1e-4)
    plain = retrofit_vlt(vlt, num_queries=2, kernel_size=1, use_estimator=False, use_global_vision=False).eval()
    _, scores, _ = plain.predict(images, ids, attention)
    assert torch.allclose(scores, torch.full((2, 2), 0.5))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(head="x"), ValueError, "head must be one of"),
        (dict(num_queries=0), ValueError, "num_queries must be an int >= 1"),
        (dict(kernel_size=0), ValueError, "kernel_size must be a positive odd int"),
        (dict(use_estimator=None), TypeError, "use_estimator must be a bool"),
        (dict(query_dim=12), ValueError, "divisible by the estimator's num_heads"),
    ],
)
def test_bad_arguments_raise(vlt, kwargs, error, message):
    with pytest.raises(error, match=message):
        retrofit_vlt(vlt, **{**SMALL, **kwargs})


def test_bad_models_and_inputs_raise(vlt, batch):
    images, ids, attention, _ = batch
    with pytest.raises(TypeError, match="must be an adapters.vlt.model.VLT"):
        retrofit_vlt(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r"built for 64 x 64 inputs \(a 4 x 4 stride-16 grid\)"):
        vlt.eval()(torch.randn(1, 3, 96, 96), ids[:1], attention[:1])
    with pytest.raises(ValueError, match=r"images must have shape \(b 3 H W\)"):
        vlt(images[:, :2], ids, attention)
    with pytest.raises(ValueError, match=r"input_ids and attention_mask must both have shape \(b l\)"):
        vlt(images, ids, attention[:, :5])
    with pytest.raises(ValueError, match="multiple of 32"):
        build_vlt_tiny(img_size=48)


def test_parts_follow_vlt():
    # Query balance: confidences in (0, 1) scale each decoded query.
    qbm = QueryBalanceModule(8)
    decoded, queries = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    balanced, confidence = qbm(decoded, queries)
    assert torch.allclose(balanced, confidence[..., None] * decoded)
    # Word pooling ignores padding, and an all-padding sentence pools to zero (no NaN).
    pool = WordAttentionPool(4)
    words = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pooled = pool(words, mask)
    changed = words.clone()
    changed[0, 2:] = 100.0
    assert torch.allclose(pool(changed, mask), pooled) and torch.equal(pooled[1], torch.zeros(4))
    pe = sine_encoding_2d(3, 4, 8)
    assert pe.shape == (12, 8) and torch.equal(pe[0], pe.new_tensor([0, 1, 0, 1, 0, 1, 0, 1]))


def test_train_steps_on_random_batches(vlt, batch):
    images, ids, attention, target = batch
    torch.manual_seed(0)
    new = retrofit_vlt(copy.deepcopy(vlt), **SMALL)  # training must not change the shared fixture
    before = [p.detach().clone() for p in new.aligner.parameters()]
    batches = [dict(image=images, input_ids=ids, attention_mask=attention, mask=target)]
    losses = train_steps(new, batches, steps=3, lr=1e-3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, new.aligner.parameters()))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_steps(new, batches, steps=0)


def _train(tmp_path, *extra):
    args = ["--cache-dir", str(tmp_path / "synth"), "--synthetic-images", "8", "--num-queries", "4",
            "--img-size", "64", "--max-length", "12", "--batch-size", "2", "--val-samples", "6", "--threads", "1",
            "--no-progress", "--save-every-minutes", "0", *extra]
    return train_main(args)


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "losses.jsonl").read_text().splitlines()]


def test_train_script_evaluates_checkpoints_and_resumes_exactly(tmp_path):
    from vlaligner.training.checkpoint import load_checkpoint, load_model_weights

    out = tmp_path / "run"
    assert _train(tmp_path, "--max-steps", "4", "--eval-every", "2", "--output-dir", str(out / "full")) == 0
    full = _losses(out / "full")
    assert len(full) == 4 and all(torch.isfinite(torch.tensor(full)))
    metrics = [json.loads(line) for line in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert {"oIoU", "mIoU", "Pr@0.5"} <= set(metrics[-1]["metrics"]) and 1 <= metrics[-1]["metrics"]["num_samples"] <= 6
    run_config = json.loads((out / "full" / "run_config.json").read_text())
    assert run_config["recipe"] == "adam-poly" and run_config["lr"] == 1e-3 and run_config["optimizer"] == "adam"
    for name in ("best", "last"):
        folder = out / "full" / name
        assert (folder / "model.safetensors").is_file() and (folder / "training_state.json").is_file()
        config = json.loads((folder / "config.json").read_text())
        assert config["format"] == "vlaligner-host" and config["host"] == "vlt"
        assert config["config"]["head"] == "aligner" and config["config"]["num_queries"] == 4
        assert config["config"]["max_length"] == 12 and len(config["weights_sha256"]) == 64
        assert not list(folder.glob("*.pt*")) and not list(folder.glob("*.bin"))  # no pickles
    assert load_checkpoint(out / "full" / "last")["step"] == 4
    # Killed after step 3 (last/ saved at step 3), then resumed: the same losses and weights as
    # the run without a stop.
    assert _train(tmp_path, "--max-steps", "4", "--eval-every", "2", "--output-dir", str(out / "part"),
                  "--save-every", "3", "--stop-after-steps", "3") == 3
    assert load_checkpoint(out / "part" / "last")["step"] == 3
    assert _train(tmp_path, "--max-steps", "4", "--eval-every", "2", "--output-dir", str(out / "part"), "--resume") == 0
    assert _losses(out / "part") == full
    from safetensors.torch import load_file

    a = load_file(str(out / "full" / "last" / "model.safetensors"))
    b = load_file(str(out / "part" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("aligner.") for k in a) and "final_conv.weight" not in a
    # The weights load back into a freshly built model (hash checked), and refuse to after an edit.
    from adapters.vlt.train_vlt import VLTConfig, build_vlt_segmenter
    from vlaligner.models.tokenizer import load_tiny_tokenizer

    config = VLTConfig(**json.loads((out / "full" / "best" / "config.json").read_text())["config"])
    assert config.vocab_size == len(load_tiny_tokenizer())
    fresh = build_vlt_segmenter(config)
    load_model_weights(fresh, out / "full" / "last")
    assert all(torch.equal(fresh.host.state_dict()[k], a[k]) for k in a)
    weights = out / "full" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_model_weights(fresh, out / "full" / "last")


def test_train_script_refuses_bad_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tmp_path, "--max-steps", "1", "--output-dir", str(out), "--head", "fixed") == 0
    from safetensors.torch import load_file

    assert "final_conv.weight" in load_file(str(out / "last" / "model.safetensors"))
    with pytest.raises(SystemExit):
        _train(tmp_path, "--max-steps", "1", "--output-dir", str(out))
    assert "--resume" in capsys.readouterr().err  # the folder holds a run: continue or --overwrite
    # another head than the checkpoint's: one line naming the keys, exit status 2
    assert _train(tmp_path, "--max-steps", "2", "--output-dir", str(out), "--resume") == 2
    err = capsys.readouterr().err
    assert "do not fit this vlt model" in err and "aligner." in err and "Traceback" not in err
    for argv, message in (
        (["--img-size", "48"], "--img-size must be a positive multiple of 32"),
        (["--dataset", "refcocog"], "exists as refcoco (unc) and grefcoco"),
        (["--dataset", "refcocog", "--data-root", str(tmp_path / "nothing")], "--data-root"),
        (["--dataset", "grefcoco"], "VLT has no no-target head"),
        (["--pretrained"], "the tiny VLT has no pretrained weights"),
        (["--recipe", "scratch-small"], "VLT keeps its own initial bias"),
        (["--recipe", "adam-poly", "--mask-bias-init", "-2"], "VLT keeps its own initial bias"),
        (["--demo"], "--demo is the embedded demo"),
        (["--no-global-text"], "VLT has no F_s"),
    ):
        with pytest.raises(SystemExit) as info:
            train_main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_default_output_dir_is_not_eavls():
    from adapters.vlt.train_vlt import resolve_args

    args = resolve_args(["--head", "fixed", "--max-steps", "1"])
    assert str(args.output_dir) == "runs/vlt-tiny-fixed-refcoco"
    assert args.num_queries == 24 and args.recipe == "adam-poly" and args.max_length == 17


def test_train_script_under_torchrun_two_processes(tmp_path):
    """The VLT host through the Trainer's DDP path (Gloo, 2 CPU processes): same weights on both."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vlaligner.training.checkpoint import load_checkpoint

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(repo / "adapters" / "vlt" / "train_vlt.py"),
        "--cache-dir", str(tmp_path / "synth"), "--synthetic-images", "8", "--num-queries", "4", "--img-size", "64",
        "--batch-size", "4", "--max-steps", "2", "--val-samples", "6", "--threads", "1", "--no-progress",
        "--debug-param-digest", "--output-dir", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "param_digest.rank0.txt").read_text() == (out / "param_digest.rank1.txt").read_text()
    state = load_checkpoint(out / "last")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 2
    assert "2 process(es) x 1 accumulation x 2 per step" in (out / "train.log").read_text()
