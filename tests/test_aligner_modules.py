"""The three aligner parts, the composed aligner, the neck and the loss: shapes, laws, errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from vlaligner import (
    AlignerOutput,
    FixedKernelHead,
    FusionNeck,
    MultiMaskGenerator,
    MultiQueryEstimator,
    MultiQueryGenerator,
    VisionLanguageAligner,
)
from vlaligner.layers import UpProjection
from vlaligner.losses import mask_bce_loss, soft_dice_loss

CHANNELS = (6, 8, 10)


def vision_feats(b, size=8, dtype=torch.float32):
    return [
        torch.randn(b, CHANNELS[0], size, size, dtype=dtype),
        torch.randn(b, CHANNELS[1], size // 2, size // 2, dtype=dtype),
        torch.randn(b, CHANNELS[2], size // 4, size // 4, dtype=dtype),
    ]


def make_generator(num_queries=4, global_vision_dim=10, dim=16):
    return MultiQueryGenerator(
        vision_channels=CHANNELS, text_dim=12, dim=dim, num_queries=num_queries,
        global_vision_dim=global_vision_dim, grid_size=(3, 3),
    )


def words_and_mask(b, l=5, lengths=None):
    words = torch.randn(b, l, 12)
    lengths = lengths or [l] * b
    mask = torch.arange(l)[None, :] < torch.tensor(lengths)[:, None]
    return words, mask


def assert_every_parameter_gets_gradient(module, loss):
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"no (finite) gradient for {missing}"
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


# ---------------------------------------------------------------- MultiQueryGenerator
def test_generator_shapes_and_attention():
    gen = make_generator()
    words, mask = words_and_mask(2, lengths=[5, 3])
    queries, attention = gen(vision_feats(2), words, mask, torch.randn(2, 10), return_attention=True)
    assert queries.shape == (2, 4, 16) and attention.shape == (2, 4, 5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4))
    assert (attention[1, :, 3:] == 0).all()
    assert gen(vision_feats(2), words, mask, torch.randn(2, 10)).shape == (2, 4, 16)


def test_generator_every_parameter_gets_gradient():
    gen = make_generator()
    words, mask = words_and_mask(2)
    queries = gen(vision_feats(2), words, mask, torch.randn(2, 10))
    assert_every_parameter_gets_gradient(gen, queries.square().sum())


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_generator_padding_never_matters(seed, lengths):
    torch.manual_seed(seed)
    gen = make_generator().eval()
    b = len(lengths)
    words, mask = words_and_mask(b, l=6, lengths=lengths)
    feats, gv = vision_feats(b), torch.randn(b, 10)
    noisy = words.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 12) * 1e4
    noisy[~mask][..., :1] = float("nan")
    with torch.no_grad():
        torch.testing.assert_close(gen(feats, noisy, mask, gv), gen(feats, words, mask, gv))


@given(seed=st.integers(0, 2**16), b=st.integers(2, 4))
def test_generator_samples_independent_in_eval(seed, b):
    torch.manual_seed(seed)
    gen = make_generator().eval()
    words, mask = words_and_mask(b)
    feats, gv = vision_feats(b), torch.randn(b, 10)
    with torch.no_grad():
        batched = gen(feats, words, mask, gv)
        alone = gen([f[1:2] for f in feats], words[1:2], mask[1:2], gv[1:2])
    torch.testing.assert_close(batched[1:2], alone, rtol=1e-5, atol=1e-5)


def test_generator_all_padding_sentence_gives_zero_queries_without_nan():
    gen = make_generator()
    words, mask = words_and_mask(2)
    mask[1] = False
    queries, attention = gen(vision_feats(2), words, mask, torch.randn(2, 10), return_attention=True)
    assert torch.isfinite(queries).all() and torch.isfinite(attention).all()
    assert (attention[1] == 0).all() and (queries[1] == 0).all()
    queries.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)


def test_generator_without_global_vision():
    gen = make_generator(global_vision_dim=None)
    assert gen.global_proj is None
    words, mask = words_and_mask(2)
    assert gen(vision_feats(2), words, mask).shape == (2, 4, 16)
    with pytest.raises(ValueError, match="built without global_vision_dim"):
        gen(vision_feats(2), words, mask, torch.randn(2, 10))


def test_generator_works_on_non_square_and_odd_sizes():
    gen = make_generator()
    feats = [torch.randn(1, 6, 15, 21), torch.randn(1, 8, 8, 11), torch.randn(1, 10, 4, 6)]
    words, mask = words_and_mask(1)
    assert gen(feats, words, mask, torch.randn(1, 10)).shape == (1, 4, 16)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: a.update(vision_feats=torch.zeros(2, 6, 8, 8)), TypeError, "list or tuple of three"),
        (lambda a: a.update(vision_feats=a["vision_feats"][:2]), ValueError, "three maps at strides s, 2s, 4s, got 2"),
        (lambda a: a["vision_feats"].__setitem__(1, torch.zeros(2, 9, 4, 4)), ValueError, r"vision_feats\[1\] must have shape \(b c h w\) with c = 8, got shape \(2, 9, 4, 4\)"),
        (lambda a: a["vision_feats"].__setitem__(0, torch.zeros(2, 6, 8)), ValueError, r"vision_feats\[0\] must have shape \(b c h w\) with 4 dimensions, got shape \(2, 6, 8\)"),
        (lambda a: a.update(words=torch.zeros(2, 5, 11)), ValueError, r"words must have shape \(b l text_dim\) with text_dim = 12, got shape \(2, 5, 11\)"),
        (lambda a: a.update(words=torch.zeros(2, 5)), ValueError, r"words must have shape \(b l text_dim\) with 3 dimensions, got shape \(2, 5\)"),
        (lambda a: a.update(word_mask=a["word_mask"].long()), TypeError, "word_mask must be a bool tensor.*got dtype torch.int64"),
        (lambda a: a.update(word_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"word_mask must have shape \(b l\) = \(2, 5\), got shape \(2, 4\)"),
        (lambda a: a.update(word_mask=torch.ones(1, 5, dtype=torch.bool)), ValueError, r"word_mask must have shape \(b l\) = \(2, 5\), got shape \(1, 5\)"),
        (lambda a: a.update(global_vision=None), ValueError, "built with global_vision_dim"),
        (lambda a: a.update(global_vision=torch.zeros(2, 9)), ValueError, r"global_vision_dim = 10, got shape \(2, 9\)"),
        (lambda a: a.update(words=torch.zeros(3, 5, 12), word_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "batch sizes must match, got vision_feats: 2, words: 3"),
    ],
)
def test_generator_rejects_bad_input(mutate, error, message):
    words, mask = words_and_mask(2)
    args = dict(vision_feats=vision_feats(2), words=words, word_mask=mask, global_vision=torch.randn(2, 10))
    mutate(args)
    with pytest.raises(error, match=message):
        make_generator()(**args)


def test_generator_gradcheck_float64():
    gen = make_generator(num_queries=2, dim=8).double().eval()
    words, mask = words_and_mask(1, l=3, lengths=[2])
    words = words.double().requires_grad_()
    feats = [f.double() for f in vision_feats(1)]
    gv = torch.randn(1, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, g: gen(feats, w, mask, g), (words, gv))


# ---------------------------------------------------------------- MultiMaskGenerator
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("num_upsamples", [0, 2])
def test_mask_generator_shapes(k, num_upsamples):
    mg = MultiMaskGenerator(in_channels=16, query_dim=8, kernel_size=k, num_upsamples=num_upsamples)
    masks = mg(torch.randn(2, 16, 5, 7), torch.randn(2, 3, 8))
    scale = 2**num_upsamples
    assert masks.shape == (2, 3, 5 * scale, 7 * scale)
    assert mg.mask_channels == (16 // scale if num_upsamples else 16)
    assert mg.param_proj.out_features == mg.mask_channels * k * k + 1


def test_mask_generator_equals_per_query_conv():
    mg = MultiMaskGenerator(in_channels=4, query_dim=6, kernel_size=3).double()
    features, queries = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    masks = mg(features, queries)
    params = mg.param_proj(queries)
    for i in range(2):
        for j in range(3):
            weight = params[i, j, :-1].reshape(1, 4, 3, 3)
            expected = F.conv2d(features[i : i + 1], weight, params[i, j, -1:], padding=1)[0, 0]
            torch.testing.assert_close(masks[i, j], expected)


def test_appended_coordinates_equal_the_per_query_conv_over_features_and_xy():
    mg = MultiMaskGenerator(in_channels=4, query_dim=6, kernel_size=3, append_coords=True).double()
    assert mg.kernel_channels == 6 and mg.param_proj.out_features == 6 * 9 + 1
    features, queries = torch.randn(2, 4, 5, 7, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    masks = mg(features, queries)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 5, dtype=torch.float64),
                            torch.linspace(-1, 1, 7, dtype=torch.float64), indexing="ij")
    params = mg.param_proj(queries)
    for i in range(2):
        with_xy = torch.cat([features[i], xs[None], ys[None]])[None]
        for j in range(3):
            weight = params[i, j, :-1].reshape(1, 6, 3, 3)
            expected = F.conv2d(with_xy, weight, params[i, j, -1:], padding=1)[0, 0]
            torch.testing.assert_close(masks[i, j], expected)


def test_appended_coordinates_let_a_kernel_tell_top_from_bottom():
    # Constant features: without coordinates every pixel gets the same logit; a kernel that
    # weighs only -y (its centre tap on the y channel) lights the top rows.
    kwargs = dict(in_channels=2, query_dim=3, kernel_size=1)
    plain, coords = MultiMaskGenerator(**kwargs), MultiMaskGenerator(**kwargs, append_coords=True)
    features, query = torch.ones(1, 2, 6, 6), torch.ones(1, 1, 3)
    assert plain(features, query).std() < 1e-6
    with torch.no_grad():
        coords.param_proj.weight.zero_()
        coords.param_proj.bias.zero_()
        coords.param_proj.bias[3] = -1.0  # channels: 2 features, x, then y (kernel 1x1)
    mask = coords(features, query)[0, 0]
    assert (mask[0] > 0).all() and (mask[-1] < 0).all() and torch.all(mask[:-1] > mask[1:])


@pytest.mark.parametrize("make", [
    lambda v: MultiMaskGenerator(in_channels=2, query_dim=3, append_coords=v),
    lambda v: FixedKernelHead(in_channels=2, append_coords=v),
])
def test_append_coords_must_be_a_bool_not_a_string(make):
    # "false" from a hand-written config must not silently mean True
    with pytest.raises(TypeError, match="append_coords must be True or False, got 'false'"):
        make("false")


def test_fixed_kernel_head_appends_the_same_coordinates():
    head = FixedKernelHead(in_channels=8, kernel_size=1, num_upsamples=1, append_coords=True)
    assert head.classifier.in_channels == head.projection.out_channels + 2
    assert head(torch.randn(2, 8, 3, 3)).logits.shape == (2, 1, 6, 6)


def test_mask_generator_gradients_and_gradcheck():
    mg = MultiMaskGenerator(in_channels=8, query_dim=8, num_upsamples=1)
    assert_every_parameter_gets_gradient(mg, mg(torch.randn(2, 8, 4, 4), torch.randn(2, 3, 8)).square().mean())
    mg64 = MultiMaskGenerator(in_channels=3, query_dim=4).double()
    f = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mg64, (f, q))


@pytest.mark.parametrize(
    "features, queries, message",
    [
        (torch.zeros(2, 16, 4), torch.zeros(2, 3, 8), r"features must have shape \(b c h w\) with 4 dimensions, got shape \(2, 16, 4\)"),
        (torch.zeros(2, 15, 4, 4), torch.zeros(2, 3, 8), r"with c = 16, got shape \(2, 15, 4, 4\)"),
        (torch.zeros(2, 16, 4, 4), torch.zeros(2, 8), r"queries must have shape \(b n d\) with 3 dimensions, got shape \(2, 8\)"),
        (torch.zeros(2, 16, 4, 4), torch.zeros(2, 3, 7), r"with d = 8, got shape \(2, 3, 7\)"),
        (torch.zeros(2, 16, 4, 4), torch.zeros(3, 3, 8), "batch sizes must match, got features: 2, queries: 3"),
    ],
)
def test_mask_generator_rejects_bad_input(features, queries, message):
    with pytest.raises(ValueError, match=message):
        MultiMaskGenerator(in_channels=16, query_dim=8)(features, queries)


def test_even_kernel_size_rejected_at_construction():
    for ctor in (
        lambda: MultiMaskGenerator(in_channels=4, query_dim=4, kernel_size=2),
        lambda: VisionLanguageAligner(in_channels=4, query_dim=4, kernel_size=4, num_heads=1),
        lambda: FixedKernelHead(in_channels=4, kernel_size=2),
    ):
        with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
            ctor()


# ---------------------------------------------------------------- MultiQueryEstimator
@given(b=st.integers(1, 3), n=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_estimator_scores_sum_to_one(b, n, seed):
    torch.manual_seed(seed)
    scores = MultiQueryEstimator(query_dim=8, num_heads=2)(torch.randn(b, n, 8) * 10)
    assert scores.shape == (b, n) and (scores >= 0).all()
    torch.testing.assert_close(scores.sum(-1), torch.ones(b))


def test_estimator_gradients_gradcheck_and_errors():
    est = MultiQueryEstimator(query_dim=8, num_heads=2)
    q = torch.randn(2, 5, 8)
    assert_every_parameter_gets_gradient(est, (est(q) * torch.arange(5.0)).sum())
    est64 = MultiQueryEstimator(query_dim=4, num_heads=2).double()
    assert torch.autograd.gradcheck(est64, (torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True),))
    with pytest.raises(ValueError, match=r"queries must have shape \(b n d\) with d = 8, got shape \(2, 5, 6\)"):
        est(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiQueryEstimator(query_dim=10, num_heads=4)
    with pytest.raises(TypeError, match="floating-point"):
        est(torch.zeros(2, 5, 8, dtype=torch.long))


# ---------------------------------------------------------------- VisionLanguageAligner
def make_aligner(**kw):
    kw.setdefault("num_heads", 2)
    return VisionLanguageAligner(in_channels=8, query_dim=8, **kw)


@given(b=st.integers(1, 3), n=st.integers(1, 6), k=st.sampled_from([1, 3]), up=st.integers(0, 1),
       use_estimator=st.booleans(), seed=st.integers(0, 2**16))
def test_aligner_fused_equals_weighted_sum_of_query_masks(b, n, k, up, use_estimator, seed):
    torch.manual_seed(seed)
    aligner = make_aligner(kernel_size=k, num_upsamples=up, use_estimator=use_estimator).double().eval()
    features, queries = torch.randn(b, 8, 5, 6, dtype=torch.float64), torch.randn(b, n, 8, dtype=torch.float64)
    out = aligner(features, queries, return_query_masks=True)
    assert isinstance(out, AlignerOutput)
    assert out.logits.shape == (b, 1, 5 * 2**up, 6 * 2**up) and out.query_masks.shape == (b, n, 5 * 2**up, 6 * 2**up)
    expected = (out.query_scores[:, :, None, None] * out.query_masks).sum(1, keepdim=True)
    torch.testing.assert_close(out.logits, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(aligner(features, queries).logits, out.logits, rtol=0, atol=0)


def test_aligner_without_estimator_uses_equal_weights():
    aligner = make_aligner(use_estimator=False)
    assert aligner.estimator is None and not aligner.use_estimator
    out = aligner(torch.randn(2, 8, 4, 4), torch.randn(2, 6, 8))
    torch.testing.assert_close(out.query_scores, torch.full((2, 6), 1 / 6))
    assert out.query_masks is None


def test_aligner_with_one_query_and_no_estimator_is_one_dynamic_convolution():
    aligner = make_aligner(use_estimator=False, kernel_size=3).double()
    features, queries = torch.randn(2, 8, 5, 5, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)
    params = aligner.mask_generator.param_proj(queries)
    expected = torch.cat([
        F.conv2d(features[i : i + 1], params[i, :, :-1].reshape(1, 8, 3, 3), params[i, :, -1], padding=1)
        for i in range(2)
    ])
    torch.testing.assert_close(aligner(features, queries).logits, expected)


@given(seed=st.integers(0, 2**16))
def test_aligner_samples_independent(seed):
    torch.manual_seed(seed)
    aligner = make_aligner(num_upsamples=1).eval()
    features, queries = torch.randn(3, 8, 4, 4), torch.randn(3, 5, 8)
    with torch.no_grad():
        full = aligner(features, queries).logits
        alone = aligner(features[2:], queries[2:]).logits
    torch.testing.assert_close(full[2:], alone, rtol=1e-5, atol=1e-5)


def test_aligner_every_parameter_gets_gradient_and_gradcheck():
    aligner = make_aligner(num_upsamples=2)
    out = aligner(torch.randn(2, 8, 4, 4), torch.randn(2, 5, 8))
    assert_every_parameter_gets_gradient(aligner, mask_bce_loss(out.logits, torch.rand(2, 16, 16) > 0.5))
    a64 = make_aligner(kernel_size=3).double().eval()
    f = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: a64(x, y).logits, (f, q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aligner_under_autocast_and_half(dtype):
    aligner = make_aligner(num_upsamples=1)
    features, queries = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aligner(features, queries, return_query_masks=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    half = make_aligner(num_upsamples=0).to(dtype).eval()
    out = half(features.to(dtype), queries.to(dtype), return_query_masks=True)
    assert out.logits.dtype == dtype and out.query_scores.dtype == dtype
    expected = (out.query_scores.float()[:, :, None, None] * out.query_masks.float()).sum(1, keepdim=True)
    torch.testing.assert_close(out.logits.float(), expected, rtol=0.05, atol=0.05)


def test_fixed_kernel_head():
    head = FixedKernelHead(in_channels=8, kernel_size=3, num_upsamples=2)
    out = head(torch.randn(2, 8, 4, 4), torch.randn(2, 5, 8))
    assert out.logits.shape == (2, 1, 16, 16) and out.query_scores is None and out.query_masks is None
    assert not any("param_proj" in n for n, _ in head.named_parameters())
    with pytest.raises(ValueError, match=r"with c = 8, got shape \(2, 7, 4, 4\)"):
        head(torch.randn(2, 7, 4, 4))


# ---------------------------------------------------------------- FusionNeck and loss
def test_fusion_neck_shapes_gating_and_errors():
    neck = FusionNeck(in_channels=CHANNELS, dim=16, sentence_dim=12)
    out = neck(vision_feats(2), torch.randn(2, 12))
    assert out.shape == (2, 16, 4, 4)
    assert_every_parameter_gets_gradient(neck, out.square().mean())
    with pytest.raises(ValueError, match="pass sentence"):
        neck(vision_feats(2))
    plain = FusionNeck(in_channels=CHANNELS, dim=16, sentence_dim=None, use_coords=False)
    assert plain.sentence_proj is None and plain.coord_conv is None
    with pytest.raises(ValueError, match="built without sentence_dim"):
        plain(vision_feats(2), torch.randn(2, 12))


def test_mask_bce_loss_resizes_target_and_validates():
    logits = torch.zeros(2, 1, 4, 4)
    loss = mask_bce_loss(logits, torch.ones(2, 16, 16, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor(0.6931471805599453, dtype=torch.float32))
    big = torch.full((2, 1, 4, 4), 20.0)
    assert mask_bce_loss(big, torch.ones(2, 1, 8, 8)) < 1e-6
    with pytest.raises(ValueError, match=r"logits must have shape \(b 1 h w\)"):
        mask_bce_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="batch sizes must match"):
        mask_bce_loss(logits, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="batch sizes must match"):
        mask_bce_loss(logits, torch.zeros(3, 4, 4), upsample_logits=True)
    with pytest.raises(ValueError, match=r"target must have shape \(b H W\) or \(b 1 H W\)"):
        mask_bce_loss(logits, torch.zeros(2, 2, 16, 16), upsample_logits=True)


def test_upsampled_loss_is_the_loss_of_the_bilinear_logits():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 8, 8), torch.rand(3, 32, 32) > 0.7
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        mask_bce_loss(logits, target, upsample_logits=True),
        F.binary_cross_entropy_with_logits(up, target[:, None].float()),
    )
    prob, t = torch.sigmoid(up).flatten(1), target.float().flatten(1)
    dice = 1 - ((2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)).mean()
    torch.testing.assert_close(soft_dice_loss(logits, target, upsample_logits=True), dice)


def test_the_nearest_target_prefers_masks_half_a_cell_off_and_the_upsampled_loss_does_not():
    # A square object at input resolution; the stride-4 logits of two candidate masks: the
    # cell-centred one (area average, where the evaluation's bilinear upsampling reads a cell)
    # and the one nearest downsampling teaches (each cell's top-left pixel).
    target = torch.zeros(1, 1, 32, 32)
    target[..., 6:19, 9:22] = 1
    centred = 12 * (F.avg_pool2d(target, 4) - 0.5)
    top_left = 12 * (F.interpolate(target, size=(8, 8), mode="nearest") - 0.5)
    assert mask_bce_loss(top_left, target) < mask_bce_loss(centred, target)
    assert mask_bce_loss(centred, target, upsample_logits=True) < mask_bce_loss(top_left, target, upsample_logits=True)

    def iou(logits):  # as the evaluation reads logits
        pred = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False) > 0
        return ((pred & (target > 0)).sum() / (pred | (target > 0)).sum()).item()

    assert iou(centred) > iou(top_left) + 0.1


def test_torch_compile_matches_eager():
    aligner = make_aligner(num_upsamples=1).eval()
    features, queries = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 8)
    try:
        compiled = torch.compile(aligner)
        got = compiled(features, queries).logits
    except Exception as exc:  # pragma: no cover - depends on the local compiler toolchain
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(got, aligner(features, queries).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_aligner_cuda_matches_cpu(dtype):
    aligner = make_aligner(num_upsamples=1, kernel_size=3).eval()
    features, queries = torch.randn(2, 8, 6, 6), torch.randn(2, 24, 8)
    expected = aligner(features, queries, return_query_masks=True)
    cuda = aligner.cuda().to(dtype)
    got = cuda(features.cuda().to(dtype), queries.cuda().to(dtype), return_query_masks=True)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.logits.float().cpu(), expected.logits, rtol=tol, atol=tol)
    torch.testing.assert_close(got.query_masks.float().cpu(), expected.query_masks, rtol=tol, atol=tol)


# ---------------------------------------------------------------- up-projection skips
def test_up_projection_skips_equal_the_written_out_rounds():
    torch.manual_seed(0)
    up = UpProjection(in_channels=8, num_upsamples=2, hidden_channels=(6, 4), out_channels=3, skip_channels=(5, None))
    up.eval()
    x, skip = torch.randn(2, 8, 3, 4), torch.randn(2, 5, 6, 8)
    with torch.no_grad():
        out = up(x, [skip, None])
        # the plain rounds: upsample, add the projected skip gated by the upsampled features,
        # 3x3 conv; upsample, 3x3 conv; 1x1
        u = up.layers[0](x)
        gate = up.skip_projections[0]
        h = up.layers[1](u + torch.sigmoid(gate.gate(u)) * gate.proj(skip))
        expected = up.layers[4](up.layers[3](up.layers[2](h)))
    assert out.shape == (2, 3, 12, 16)
    torch.testing.assert_close(out, expected)
    with torch.no_grad():  # the skip is used: another skip map gives other features
        assert not torch.allclose(up(x, [torch.randn(2, 5, 6, 8), None]), out)


def test_up_projection_without_skips_keeps_its_tensors_and_refuses_skips():
    plain = UpProjection(in_channels=8, num_upsamples=2)
    assert plain.skip_projections is None and plain.skip_channels is None
    assert not any("skip" in name for name, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="built without skip_channels"):
        plain(torch.randn(1, 8, 2, 2), [torch.randn(1, 4, 4, 4), None])


@pytest.mark.parametrize(
    "skips, error, message",
    [
        (None, ValueError, r"one skip map per round \(skip_channels \[5, 7\]\), got None"),
        ("one", ValueError, r"got 1 entries"),
        ("tensor", ValueError, "got a tensor"),
        ("list", TypeError, r"skips\[0\] must be a torch.Tensor, got list"),
        ("channels", ValueError, r"skips\[0\] must have shape \(b c h w\) with c = 5, got shape \(2, 4, 6, 8\)"),
        ("size", ValueError, r"skips\[1\] must have shape \(b c h w\) with h = 12, got shape \(2, 7, 6, 8\)"),
        ("batch", ValueError, r"skips\[0\] must have shape \(b c h w\) with b = 2, got shape \(1, 5, 6, 8\)"),
        ("dtype", TypeError, r"skips\[1\] must have the dtype of features \(torch.float32\)"),
    ],
)
def test_up_projection_rejects_bad_skips(skips, error, message):
    up = UpProjection(in_channels=8, num_upsamples=2, skip_channels=(5, 7))
    x = torch.randn(2, 8, 3, 4)
    good = [torch.randn(2, 5, 6, 8), torch.randn(2, 7, 12, 16)]
    bad = {
        None: None,
        "one": good[:1],
        "tensor": good[0],
        "channels": [torch.randn(2, 4, 6, 8), good[1]],
        "size": [good[0], torch.randn(2, 7, 6, 8)],
        "batch": [torch.randn(1, 5, 6, 8), good[1]],
        "list": [[1.0], good[1]],
        "dtype": [good[0], good[1].double()],
    }[skips]
    with pytest.raises(error, match=message):
        up(x, bad)
    with pytest.raises(ValueError, match="one positive width or None per upsampling round"):
        UpProjection(in_channels=8, num_upsamples=2, skip_channels=(5,))


def test_aligner_and_fixed_head_with_skips_train_every_parameter():
    torch.manual_seed(0)
    aligner = VisionLanguageAligner(
        in_channels=8, query_dim=16, num_upsamples=2, hidden_channels=(8, 8), mask_channels=4, skip_channels=(6, 3)
    )
    fixed = FixedKernelHead(in_channels=8, num_upsamples=2, mask_channels=4, skip_channels=(6, 3))
    assert aligner.skip_channels == (6, 3) == fixed.skip_channels
    feats, queries = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 16)
    skips = [torch.randn(2, 6, 8, 8), torch.randn(2, 3, 16, 16)]
    out = aligner(feats, queries, return_query_masks=True, skips=skips)
    assert out.logits.shape == (2, 1, 16, 16) and out.query_masks.shape == (2, 5, 16, 16)
    # the fused kernel still equals the score-weighted sum of the query masks
    torch.testing.assert_close(
        out.logits[:, 0], (out.query_scores[:, :, None, None] * out.query_masks).sum(1), atol=1e-5, rtol=1e-5
    )
    assert_every_parameter_gets_gradient(aligner, mask_bce_loss(out.logits, torch.zeros(2, 16, 16)))
    out = fixed(feats, queries, skips=skips)
    assert_every_parameter_gets_gradient(fixed, mask_bce_loss(out.logits, torch.zeros(2, 16, 16)))


def test_auto_method_follows_the_measured_tables():
    """``auto``: einsum for 1x1 kernels; taps on the CPU; on CUDA taps up to n = 8 and cuDNN's
    grouped convolution above (benchmarks/results/gpu_dynconv.json)."""
    from vlaligner.functional import _choose_method

    assert _choose_method(24, 1, "cuda") == _choose_method(8, 1, "cpu") == "einsum"
    assert [_choose_method(n, 3, "cpu") for n in (1, 8, 24)] == ["taps"] * 3
    assert [_choose_method(n, 3, "cuda") for n in (1, 8, 9, 24)] == ["taps", "taps", "grouped", "grouped"]
