"""Deployment: device choice, TF32, torch.compile without graph breaks, batched prediction,
the batch ``segment`` command, and loading from a Hugging Face Hub cache with the network off.

Axes: b image-sentence pairs, n queries, l words, c channels, h w space, H W image size.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlaligner import VisionLanguageAligner
from vlaligner.cli import main
from vlaligner.devices import enable_tf32, resolve_device, tf32_supported
from vlaligner.predictor import Predictor

IMG = 64


# ``tiny`` (build_eavl_tiny at 64 px, 4 queries, eval mode, one per module) is in conftest.py.


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    return tiny.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ devices and TF32
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    import vlaligner.devices as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None).type == "cpu"
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_device_errors(monkeypatch):
    import vlaligner.devices as devices

    monkeypatch.setattr(devices, "mps_available", lambda: False)
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(TypeError, match="device must be a str or torch.device, got int"):
        resolve_device(0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.fixture
def restore_tf32():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def test_tf32_only_on_gpus_that_have_it(monkeypatch, restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # A Volta card (7.0): no TF32 units, nothing changes.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    assert not tf32_supported() and enable_tf32() is False
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    # An Ampere card (8.0): on, for matmuls and cuDNN convolutions.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert tf32_supported("cuda:0") and enable_tf32() is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    # Turned off on request, and never for a CPU device.
    assert enable_tf32(False) is False
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert not tf32_supported("cpu") and enable_tf32(True, "cpu") is False
    assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(TypeError, match="enabled must be a bool"):
        enable_tf32("yes")


def test_predictor_turns_tf32_on_for_cuda_unless_told(monkeypatch, tiny):
    import vlaligner.predictor as predictor_module

    calls = []
    monkeypatch.setattr(predictor_module, "enable_tf32", lambda on, dev: calls.append((on, dev)) or on)
    # A CPU predictor never touches the switches.
    assert Predictor(tiny).tf32 is False and calls == []
    # On CUDA (device resolution and the move mocked: no GPU here) it asks for TF32 ...
    monkeypatch.setattr(predictor_module, "resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(predictor_module, "resolve_dtype", lambda d, dev: torch.float32)
    monkeypatch.setattr(type(tiny), "to", lambda self, *a, **k: self)
    assert Predictor(tiny, device="cuda").tf32 is True and calls[-1] == (True, torch.device("cuda"))
    # ... unless the user turns it off.
    assert Predictor(tiny, device="cuda", tf32=False).tf32 is False and calls[-1][0] is False


# ------------------------------------------------------------------ torch.compile
def test_aligner_compiles_without_graph_breaks():
    torch.manual_seed(0)
    aligner = VisionLanguageAligner(in_channels=32, query_dim=32, kernel_size=3, num_heads=4, num_upsamples=1)
    features, queries = torch.randn(2, 32, 8, 8), torch.randn(2, 5, 32)
    # Training mode with gradients: the custom autograd Function of the taps path included.
    explained = torch._dynamo.explain(aligner)(features, queries, return_query_masks=True)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_eavl_compiles_without_graph_breaks(tiny):
    input_ids, attention_mask = tiny.tokenize(["the dog", "a red car on the left"])
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        explained = torch._dynamo.explain(tiny)(images, input_ids, attention_mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_predictor_compile_matches_eager(tiny, monkeypatch):
    """Predictor(compile=True) compiles encode / decode; fullgraph proves no graph break, the
    eager backend keeps the test fast (inductor's C++ build takes minutes on this CPU)."""
    real = torch.compile
    wrapped = []

    def compile_eager(fn, **kwargs):
        wrapped.append((fn, kwargs))
        return real(fn, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", compile_eager)
    compiled = Predictor(tiny, compile=True)
    assert {getattr(fn, "__name__", type(fn).__name__) for fn, _ in wrapped} == {
        "encode_image", "forward_features", "EAVL"
    }
    eager = Predictor(tiny)
    image = _rgb(30, 40, 1)
    got = compiled.predict(image, ["the dog", "a red car"])
    want = eager.predict(image, ["the dog", "a red car"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.probability, w.probability, atol=1e-5)
    with pytest.raises(ValueError, match="compile must be True, False or a torch.compile mode"):
        Predictor(tiny, compile="fast")


@pytest.mark.slow
def test_eavl_compiles_with_inductor(tiny):
    """The real thing: inductor on the CPU (several minutes of C++ compilation)."""
    input_ids, attention_mask = tiny.tokenize(["the dog", "a red car on the left"])
    images = torch.randn(2, 3, IMG, IMG)
    compiled = torch.compile(tiny, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(images, input_ids, attention_mask), tiny(images, input_ids, attention_mask)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ batched prediction
def test_predict_batch_equals_one_at_a_time(tiny):
    predictor = Predictor(tiny, batch_size=3)  # 3: the pairs of one batch span several images
    images = [_rgb(30, 40, 0), _rgb(64, 20, 1), _rgb(50, 50, 2), _rgb(33, 71, 3)]
    texts = ["the dog", ["a red car", "the man on the left", "the sky"], "a tree", ["the cat", "one"]]
    batched = predictor.predict_batch(images, texts)
    assert len(batched) == 4
    for image, text, got in zip(images, texts, batched):
        want = predictor.predict(image, text)
        assert isinstance(got, list) == isinstance(text, list)
        got, want = (got, want) if isinstance(text, list) else ([got], [want])
        assert [p.sentence for p in got] == [p.sentence for p in want]
        for g, w in zip(got, want):
            assert g.mask.shape == image.shape[:2]
            np.testing.assert_allclose(g.probability, w.probability, atol=1e-5)
            decided = np.abs(w.probability - 0.5) > 1e-4
            assert (g.mask == w.mask)[decided].all()
    # The pairs of different images really differ (the batch does not repeat one image).
    assert not np.allclose(batched[0].probability[:20, :20], batched[2].probability[:20, :20])


def test_predict_batch_with_queries(tiny):
    predictor = Predictor(tiny)
    images = [_rgb(30, 40, 5), _rgb(20, 20, 6)]
    got = predictor.predict_batch(images, ["the dog", "a cat"], return_queries=True)
    for image, pred in zip(images, got):
        want = predictor.predict(image, pred.sentence, return_queries=True)
        np.testing.assert_allclose(pred.query_scores, want.query_scores, atol=1e-6)
        np.testing.assert_allclose(pred.query_masks, want.query_masks, atol=1e-5)
        assert pred.tokens == want.tokens


def test_predict_batch_errors(tiny):
    predictor = Predictor(tiny)
    with pytest.raises(ValueError, match="one entry per image, got 2 images and 1 texts"):
        predictor.predict_batch([_rgb(8, 8, 0), _rgb(8, 8, 1)], ["a"])
    with pytest.raises(TypeError, match="images must be a list .* got ndarray"):
        predictor.predict_batch(_rgb(8, 8, 0), ["a"])
    with pytest.raises(ValueError, match=r"texts\[1\]: .*empty sentence"):
        predictor.predict_batch([_rgb(8, 8, 0), _rgb(8, 8, 1)], ["a", " "])
    with pytest.raises(TypeError, match=r"images\[1\]: image array must have dtype uint8"):
        predictor.predict_batch([_rgb(8, 8, 0), np.zeros((8, 8, 3))], ["a", "b"])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        Predictor(tiny, batch_size=0)


# ------------------------------------------------------------------ segment many images
def _write_inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_rgb(40, 60, 0)).save(images / "a.png")
    Image.fromarray(_rgb(32, 32, 1)).save(images / "b.jpg")
    texts = tmp_path / "texts.jsonl"
    rows = [{"image": "a.png", "text": "the dog"}, {"image": "b.jpg", "text": "a car"},
            {"image": "a.png", "text": "the sky on top"}]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return images, texts


def test_segment_many_images(checkpoint, tmp_path, capsys):
    images, texts = _write_inputs(tmp_path)
    out = tmp_path / "out"
    argv = ["segment", "--checkpoint", str(checkpoint), "--image-dir", str(images), "--texts",
            str(texts), "--out-dir", str(out), "--batch-size", "2", "--overlays"]
    assert main(argv) == 0
    assert "wrote 3 masks for 2 images" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00001_a.png", "00001_a_overlay.png", "00002_b.png", "00002_b_overlay.png",
                     "00003_a.png", "00003_a_overlay.png", "predictions.jsonl"]
    predictor = Predictor.from_pretrained(checkpoint)
    want = predictor.predict(str(images / "a.png"), "the sky on top")
    mask = np.asarray(Image.open(out / "00003_a.png")) > 127
    assert mask.shape == (40, 60) and (mask == want.mask).mean() > 0.999
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 2] or sorted(r["line"] for r in rows) == [1, 2, 3]
    # Run again: every output exists, so nothing is written and nothing is overwritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv) == 2
    assert "never overwrites files" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_segment_many_errors(checkpoint, tmp_path, capsys):
    images, texts = _write_inputs(tmp_path)
    base = ["segment", "--checkpoint", str(checkpoint), "--image-dir", str(images)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "text": "ok"}\n{"image": "missing.png", "text": "x"}\n')
    assert main(base + ["--texts", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert "line 2: image 'missing.png' not found" in capsys.readouterr().err
    bad.write_text('{"image": "a.png"}\n')
    assert main(base + ["--texts", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert "line 1 must be an object" in capsys.readouterr().err
    assert main(base + ["--texts", str(texts)]) == 2
    assert "need all of --image-dir, --texts and --out-dir" in capsys.readouterr().err
    assert main(base + ["--texts", str(texts), "--out-dir", "o", "--image", "x.png"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # An output name that is one of the inputs is refused (out-dir == image-dir, clashing name).
    (images / "00001_a.png").write_bytes(b"precious")
    assert main(base + ["--texts", str(texts), "--out-dir", str(images)]) == 2
    assert (images / "00001_a.png").read_bytes() == b"precious"


# ------------------------------------------------------------------ the Hub, offline
def _fake_hub_cache(cache, repo_id, checkpoint, commit="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's own cache layout: models--owner--name/{refs/main, snapshots/<commit>/}."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_CACHE in tmp_path, HF_HUB_OFFLINE=1 and every socket connection refused."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variables at import; set its constants as a fresh process would.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return cache


def test_from_pretrained_reads_a_hub_repo_from_the_cache(offline_hub, checkpoint, tiny, monkeypatch):
    from vlaligner.models import EAVL

    snapshot = _fake_hub_cache(offline_hub, "someone/eavl-tiny", checkpoint)
    monkeypatch.chdir(offline_hub.parent)  # "someone/eavl-tiny" is no local path here
    model = EAVL.from_pretrained("someone/eavl-tiny")
    for name, value in tiny.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    predictor = Predictor.from_pretrained("someone/eavl-tiny")
    assert predictor.img_size == IMG
    # The recorded SHA-256 is still checked for a Hub snapshot.
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        EAVL.from_pretrained("someone/eavl-tiny")


def test_hub_repo_missing_offline(offline_hub, monkeypatch):
    from vlaligner.models import EAVL

    monkeypatch.chdir(offline_hub.parent)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set and the repo is not in the local Hub cache"):
        EAVL.from_pretrained("nobody/nothing")
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub repo id"):
        Predictor.from_pretrained("nobody/nothing")


def test_local_paths_never_go_to_the_hub(tmp_path, monkeypatch, checkpoint):
    import vlaligner.hub as hub

    monkeypatch.chdir(tmp_path)
    assert hub.looks_like_repo_id("owner/name") and not hub.looks_like_repo_id("/abs/path")
    assert not hub.looks_like_repo_id("./owner/name") and not hub.looks_like_repo_id("a/b/c")
    assert not hub.looks_like_repo_id("../x") and not hub.looks_like_repo_id(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not hub.looks_like_repo_id("owner/name")  # an existing folder wins
    with pytest.raises(ValueError, match="revision='v1' applies to a Hub repo id"):
        hub.resolve_checkpoint(str(checkpoint), revision="v1")


def test_hub_offline_env_in_a_fresh_process(tmp_path, checkpoint):
    """The variables themselves, read by huggingface_hub at import, in a new interpreter."""
    _fake_hub_cache(tmp_path / "hub", "someone/eavl-tiny", checkpoint)
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "from vlaligner.hub import resolve_checkpoint\n"
        "print(resolve_checkpoint('someone/eavl-tiny'))\n"
    )
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("snapshots/0123456789abcdef0123456789abcdef01234567")


def test_push_to_hub_uploads_the_checkpoint_folder(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id, kwargs.get("exist_ok")))

        def upload_folder(self, repo_id, folder_path, allow_patterns, **kwargs):
            from pathlib import Path

            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            uploads.append(("upload", repo_id, files, tuple(allow_patterns)))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    tiny.save_pretrained(tmp_path / "ckpt", push_to_hub="me/eavl")
    assert uploads[0] == ("create", "me/eavl", True)
    assert uploads[1][0] == "upload" and {"config.json", "model.safetensors"} <= set(uploads[1][2])
    assert "model.safetensors" in uploads[1][3]
    assert tiny.push_to_hub("me/eavl2") == "https://hub/me/eavl2/commit/1"
    assert any(f.startswith("tokenizer") for f in uploads[-1][2])
    with pytest.raises(ValueError, match="push_to_hub needs a Hub repo id 'owner/name', got 'noslash'"):
        tiny.save_pretrained(tmp_path / "ckpt2", push_to_hub="noslash")
