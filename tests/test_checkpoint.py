"""EAVL checkpoints: safetensors + config.json round trips, and every refusal with a clear message.

Axis legend: b batch, l words, h w space.
"""

import json
import shutil

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import vlaligner  # noqa: E402
from vlaligner.models import EAVL, build_eavl_tiny  # noqa: E402
from vlaligner.models.eavl import FORMAT_VERSION  # noqa: E402

SIZE = 64
SENTENCES = ["the red circle on the left", "blue square"]


def _rehash(directory):
    """Record the SHA-256 of the folder's current weights in its config.json."""
    import hashlib

    config = json.loads((directory / "config.json").read_text())
    config["weights_sha256"] = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Loading a checkpoint must never need the network, nor unpickle anything.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def _no_pickles(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", _no_pickles)


def outputs(model, size=SIZE):
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    ids, mask = model.tokenize(SENTENCES)
    with torch.no_grad():
        return model.eval()(images, ids, mask, return_query_masks=True, return_word_attention=True)


def trained_a_little(model):
    """Move BatchNorm statistics and weights away from their initial values."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randn(2, 3, SIZE, SIZE)
    ids, mask = model.tokenize(SENTENCES)
    model(images, ids, mask).logits.mean().backward()
    optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = trained_a_little(build_eavl_tiny(img_size=SIZE, num_queries=4))
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(directory)
    return model, directory


def copy_of(saved_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved_dir, target)
    return target


# ---------------------------------------------------------------- round trips
def test_save_writes_safetensors_config_and_tokenizer(saved):
    model, directory = saved
    names = {p.name for p in directory.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer", "text_config"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # the atomic writes left nothing behind
    config = json.loads((directory / "config.json").read_text())
    assert config["builder"] == "eavl_tiny" and config["format_version"] == FORMAT_VERSION
    assert config["vlaligner_version"] == vlaligner.__version__
    assert config["kwargs"]["num_queries"] == 4 and config["kwargs"]["img_size"] == SIZE
    assert len(config["weights_sha256"]) == 64
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(model.state_dict())
        assert handle.metadata()["vlaligner_version"] == vlaligner.__version__


def test_save_then_load_gives_identical_outputs(saved):
    model, directory = saved
    loaded = EAVL.from_pretrained(directory)
    assert isinstance(loaded, EAVL) and not loaded.training
    assert loaded.config == model.config and loaded.num_queries == 4
    before, after = outputs(model), outputs(loaded)
    for field in ("logits", "query_scores", "query_masks", "word_attention"):
        assert torch.equal(getattr(before, field), getattr(after, field)), field
    for sentence in SENTENCES + ["an unseen zygomorphic word"]:
        assert torch.equal(model.tokenize(sentence)[0], loaded.tokenize(sentence)[0])


def test_ablation_variant_round_trip(tmp_path):
    model = trained_a_little(build_eavl_tiny(
        img_size=SIZE, head="fixed", kernel_size=1, use_global_vision=False, use_global_text=False,
        num_queries=2,
    ))
    model.save_pretrained(tmp_path / "fixed")
    loaded = EAVL.from_pretrained(tmp_path / "fixed")
    assert loaded.config["kwargs"]["head"] == "fixed" and not loaded.use_global_vision
    assert torch.equal(outputs(model).logits, outputs(loaded).logits)


def test_text_model_from_a_path_reloads_without_that_path(tmp_path):
    from transformers import BertConfig, BertModel

    from vlaligner.models import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    model = build_eavl_tiny(img_size=SIZE, text_model=str(tmp_path / "bert")).eval()
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "bert")  # the reload must come from the checkpoint alone
    loaded = EAVL.from_pretrained(tmp_path / "ckpt")
    assert loaded.text_encoder.language_model.config.hidden_size == 32
    assert torch.equal(outputs(model).logits, outputs(loaded).logits)


def test_saving_twice_overwrites_cleanly(saved, tmp_path):
    model, directory = saved
    target = copy_of(directory, tmp_path)
    (target / "tokenizer" / "vocab.txt").write_text("[PAD]\nstale\n")  # left over from elsewhere
    model.save_pretrained(target)
    assert not (target / "tokenizer" / "vocab.txt").exists()
    assert EAVL.from_pretrained(target).num_queries == 4
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]


def test_map_location_and_non_strict(saved):
    _, directory = saved
    loaded = EAVL.from_pretrained(directory, map_location="cpu", strict=False)
    assert next(loaded.parameters()).device.type == "cpu"


def test_model_without_builder_cannot_be_saved(saved, tmp_path):
    model, _ = saved
    bare = EAVL(
        image_encoder=model.image_encoder, text_encoder=model.text_encoder, neck=model.neck,
        query_generator=model.query_generator, decoder=model.decoder, head=model.head,
        tokenizer=model.tokenizer, img_size=SIZE,
    )
    with pytest.raises(ValueError, match="not made by a builder"):
        bare.save_pretrained(tmp_path / "bare")


# ---------------------------------------------------------------- refusals
def test_missing_folder_lists_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*config\.json, model\.safetensors"):
        EAVL.from_pretrained(tmp_path / "nowhere")


def test_missing_weights_lists_what_is_there(saved, tmp_path):
    target = copy_of(saved[1], tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*found: \['config\.json'"):
        EAVL.from_pretrained(target)


@pytest.mark.parametrize("missing", ["config.json", "tokenizer", "text_config"])
def test_missing_part_is_named(saved, tmp_path, missing):
    target = copy_of(saved[1], tmp_path)
    path = target / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileNotFoundError, match=f"no {missing}"):
        EAVL.from_pretrained(target)


def test_tokenizer_folder_without_vocabulary_is_refused(saved, tmp_path):
    # transformers would silently build an empty vocabulary (every word [UNK]) from it
    target = copy_of(saved[1], tmp_path)
    (target / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds none of \['tokenizer.json'"):
        EAVL.from_pretrained(target)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "checkpoint.pth"])
def test_pickle_only_folder_is_refused(saved, tmp_path, name):
    target = copy_of(saved[1], tmp_path)
    (target / "model.safetensors").unlink()
    (target / name).write_bytes(b"\x80\x04\x95 not really a pickle, and never opened")
    with pytest.raises(ValueError, match=rf"pickle files \['{name}'\].*never loads pickles"):
        EAVL.from_pretrained(target)


def test_tampered_weights_are_refused(saved, tmp_path):
    target = copy_of(saved[1], tmp_path)
    data = bytearray((target / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside a tensor: still a valid safetensors file
    (target / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256.*tampered"):
        EAVL.from_pretrained(target)


def test_corrupt_weights_with_matching_checksum_are_refused(saved, tmp_path):
    target = copy_of(saved[1], tmp_path)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(b"\xff\xff\xff\xff" + data[4:200])  # bad header, truncated
    _rehash(target)  # the recorded hash matches the broken file: only its structure can tell
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        EAVL.from_pretrained(target)


def test_checkpoint_of_another_variant_names_the_shapes(saved, tmp_path):
    _, directory = saved  # num_queries=4
    other = build_eavl_tiny(img_size=SIZE, num_queries=6)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(directory / "model.safetensors", tmp_path / "other" / "model.safetensors")
    _rehash(tmp_path / "other")  # a hand-made folder with a valid hash: only the shapes can tell
    with pytest.raises(ValueError, match=r"another shape.*query_maps.*checkpoint \(4, .*\) vs model \(6, .*another variant"):
        EAVL.from_pretrained(tmp_path / "other")


def test_missing_and_unexpected_tensors_are_named(saved, tmp_path):
    _, directory = saved
    fixed = build_eavl_tiny(img_size=SIZE, num_queries=4, head="fixed")
    fixed.save_pretrained(tmp_path / "fixed")
    shutil.copy(directory / "model.safetensors", tmp_path / "fixed" / "model.safetensors")
    _rehash(tmp_path / "fixed")
    with pytest.raises(ValueError, match=r"missing, first: head\.projection.*unexpected, first: head\.mask_generator.*another variant"):
        EAVL.from_pretrained(tmp_path / "fixed")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(builder="eavl_huge"), "does not know"),
    (lambda c: c.update(format_version=FORMAT_VERSION + 1), "format_version"),
    (lambda c: c.pop("kwargs"), "'kwargs'"),
])
def test_bad_config_is_refused(saved, tmp_path, edit, message):
    target = copy_of(saved[1], tmp_path)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        EAVL.from_pretrained(target)


def test_config_with_arguments_the_builder_does_not_take_is_refused(saved, tmp_path):
    target = copy_of(saved[1], tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["kwargs"]["num_experts"] = 3
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not accept the recorded arguments.*num_experts"):
        EAVL.from_pretrained(target)


def test_config_that_is_not_json_is_refused(saved, tmp_path):
    target = copy_of(saved[1], tmp_path)
    (target / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        EAVL.from_pretrained(target)
