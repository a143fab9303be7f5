"""adapters.trainable.HostSegmenter: any host in EAVL's call signature, trained by the project's Trainer.

Axis legend: b batch, l words, S input size, h w logit grid.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adapters.trainable import HostSegmenter
from vlaligner.models.tokenizer import load_tiny_tokenizer
from vlaligner.training.options import UsageError, build_train_parser, default_num_workers, resolve_train_args


class ToyHost(nn.Module):
    """A host with its own signature: ``host(images (b 3 S S), ids (b l)) -> (b 1 S/4 S/4)``."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 4, stride=4)
        self.embed = nn.Embedding(30522, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, images, ids):
        words = self.embed(ids).mean(1)[:, :, None, None]
        return self.out(self.conv(images) * words)


def _segmenter(width: int = 4, logits=None) -> HostSegmenter:
    return HostSegmenter(
        ToyHost(width), logits=logits or (lambda host, images, ids, mask: host(images, ids * mask)),
        tokenizer=load_tiny_tokenizer(), max_length=9, img_size=32, name="toy", config={"width": width},
    )


def test_forward_tokenize_and_checkpoint_round_trip(tmp_path):
    from vlaligner.training.checkpoint import load_model_weights, save_checkpoint

    torch.manual_seed(0)
    model = _segmenter()
    ids, mask = model.tokenize(["the red circle", "a blue square on the left"])
    assert ids.shape == mask.shape == (2, 9) and mask[0].sum() == 5  # [CLS] the red circle [SEP]
    assert model.tokenize("one")[0].shape == (1, 9) and model.tokenize(["one"], 12)[0].shape == (1, 12)
    out = model(torch.randn(2, 3, 32, 32), ids, mask)
    assert out.logits.shape == (2, 1, 8, 8)
    save_checkpoint(tmp_path / "ckpt", model=model)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(saved) == set(model.host.state_dict())  # the host's own keys, no wrapper prefix
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "vlaligner-host" and config["host"] == "toy" and config["config"] == {"width": 4}
    fresh = _segmenter()
    load_model_weights(fresh, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match=r"do not fit this toy model.*of another shape \(e\.g\. conv\.bias"):
        load_model_weights(_segmenter(width=6), tmp_path / "ckpt")


def test_bad_hosts_and_outputs_are_refused():
    with pytest.raises(TypeError, match="host must be an nn.Module"):
        HostSegmenter(lambda x: x, logits=lambda *a: a, tokenizer=None, max_length=9, img_size=32, name="x", config={})
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        HostSegmenter(ToyHost(), logits=lambda *a: a, tokenizer=None, max_length=0, img_size=32, name="x", config={})
    with pytest.raises(TypeError):  # not JSON-able: fails at construction, not at the first save
        HostSegmenter(ToyHost(), logits=lambda *a: a, tokenizer=None, max_length=9, img_size=32, name="x",
                      config={"f": object()})
    flat = _segmenter(logits=lambda host, images, ids, mask: host(images, ids)[:, 0])
    ids, mask = flat.tokenize(["a"])
    with pytest.raises(ValueError, match=r"toy host's logits must be a \(b 1 h w\) tensor, got \(1, 8, 8\)"):
        flat(torch.randn(1, 3, 32, 32), ids, mask)


def test_resolve_train_args_for_another_models_script(tmp_path):
    parser = build_train_parser("mine.py")
    parser.add_argument("--width", type=int, default=None)
    seen = {}

    def check(args):
        seen["model"] = args.model
        if args.width is not None and args.width < 1:
            raise UsageError(f"--width must be >= 1, got {args.width}")

    common = ["--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    args = resolve_train_args(common, prog="mine.py", parser=parser,
                              defaults=dict(model="tiny", recipe="adam-poly", epochs=2, batch_size=4), check=check)
    assert (args.model, args.recipe, args.lr, args.epochs, args.batch_size, args.width) == ("tiny", "adam-poly", 1e-3, 2, 4, None)
    assert args.command.startswith("mine.py") and seen == {"model": "tiny"} and not args.demo
    # the rest of the paper's defaults still apply; explicit options win over the defaults
    assert args.num_workers == default_num_workers(4)
    assert resolve_train_args([*common, "--epochs", "5"], parser=parser, defaults=dict(model="tiny", epochs=2)).epochs == 5
    with pytest.raises(UsageError, match="--width must be >= 1, got 0"):
        resolve_train_args([*common, "--width", "0"], parser=parser, defaults={}, check=check)
    with pytest.raises(UsageError, match="--demo is the embedded demo of examples/train_eavl.py; mine.py"):
        resolve_train_args(["--demo"], prog="mine.py", parser=parser, defaults={})


def test_the_preset_worker_count_is_capped_by_the_cores(tmp_path, monkeypatch):
    import vlaligner.training.options as options

    common = ["--model", "tiny", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_num_workers(4) == 2 and default_num_workers(1) == 1 and default_num_workers(0) == 0
    assert resolve_train_args(common).num_workers == 2  # the paper's 4, on a 2-core machine
    assert resolve_train_args([*common, "--num-workers", "6"]).num_workers == 6  # explicit: as given
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_train_args(common).num_workers == 4


def test_the_demo_loads_in_the_training_process_and_keeps_its_samples(tmp_path):
    out = ["--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    demo = resolve_train_args(["--demo", *out])
    assert (demo.num_workers, demo.cache_samples, demo.epochs) == (0, True, 14)
    # the preset's cache gives way to loader processes asked for; an explicit cache does not
    assert resolve_train_args(["--demo", *out, "--num-workers", "1"]).cache_samples is False
    assert resolve_train_args(["--demo", *out, "--no-cache-samples"]).cache_samples is False
    with pytest.raises(UsageError, match="--cache-samples keeps the samples in the training process, but --num-workers 2"):
        resolve_train_args(["--demo", *out, "--num-workers", "2", "--cache-samples"])
    # elsewhere off unless asked for, and then with loading in the training process only
    tiny = ["--model", "tiny", *out]
    assert resolve_train_args(tiny).cache_samples is False
    assert resolve_train_args([*tiny, "--cache-samples", "--num-workers", "0"]).cache_samples is True
    with pytest.raises(UsageError, match="use --num-workers 0"):
        resolve_train_args([*tiny, "--cache-samples", "--num-workers", "1"])
