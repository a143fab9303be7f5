"""Tests of the no-target decision: NoTargetHead, its loss, EAVL's no_target_logits, and the
"no target" answer of the Predictor and of ``vlaligner segment``.

Axes: b batch, n queries, d query width, c channels, h w space, H W image size.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlaligner.gres_losses import mask_targets_for_no_target, no_target_loss
from vlaligner.no_target import NoTargetHead

torch.set_num_threads(1)
IMG = 64
DIM = 32


# ------------------------------------------------------------------------------ the head
def test_head_shapes_and_score_weighting() -> None:
    torch.manual_seed(0)
    head = NoTargetHead(query_dim=DIM)
    q = torch.randn(3, 5, DIM)
    uniform = torch.full((3, 5), 0.2)
    out = head(q)
    assert out.shape == (3,) and out.dtype == torch.float32
    # No scores is the plain mean, i.e. uniform weights.
    torch.testing.assert_close(out, head(q, uniform))
    # The weights matter: all weight on one query differs from uniform weights.
    one_hot = torch.zeros(3, 5)
    one_hot[:, 0] = 1.0
    assert not torch.allclose(head(q, one_hot), out)
    # Per sample: changing sample 1 leaves samples 0 and 2 alone.
    q2 = q.clone()
    q2[1] += torch.randn(5, DIM)  # not a constant shift: the LayerNorm ignores those
    out2 = head(q2)
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]])
    assert not torch.allclose(out2[1], out[1])


def test_head_with_vision_and_mask_stats() -> None:
    torch.manual_seed(0)
    head = NoTargetHead(query_dim=DIM, vision_dim=16, use_mask_stats=True, num_heads=4)
    q, s = torch.randn(2, 4, DIM), torch.softmax(torch.randn(2, 4), -1)
    f, m = torch.randn(2, 16, 6, 6), torch.randn(2, 1, 12, 12, requires_grad=True)
    out = head(q, s, features=f, mask_logits=m)
    assert out.shape == (2,)
    assert not torch.allclose(head(q, s, features=f + 1.0, mask_logits=m), out)  # reads the vision
    assert not torch.allclose(head(q, s, features=f, mask_logits=m + 3.0), out)  # reads the mask
    out.sum().backward()
    assert m.grad is None  # the mask statistics are detached: the mask head is left alone
    with pytest.raises(ValueError, match="features .* are required"):
        head(q, s, mask_logits=m)
    with pytest.raises(ValueError, match="mask_logits are required"):
        head(q, s, features=f)
    with pytest.raises(ValueError, match="built without vision_dim"):
        NoTargetHead(query_dim=DIM)(q, s, features=f)
    with pytest.raises(ValueError, match="one weight per query"):
        head(q, s[:, :3], features=f, mask_logits=m)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        NoTargetHead(query_dim=30, vision_dim=8, num_heads=4)


def test_bias_init_sets_the_prior() -> None:
    head = NoTargetHead(query_dim=DIM, bias_init=math.log(0.1 / 0.9))
    torch.nn.init.zeros_(head.classifier.weight)
    p = torch.sigmoid(head(torch.randn(4, 3, DIM)))
    torch.testing.assert_close(p, torch.full((4,), 0.1))


# ------------------------------------------------------------------------------ the loss
def test_no_target_loss_by_hand() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0])
    flags = torch.tensor([True, False, False])
    expected = [math.log(2.0), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(-1.0))]
    torch.testing.assert_close(no_target_loss(logits, flags, reduction="none"), torch.tensor(expected))
    torch.testing.assert_close(no_target_loss(logits, flags), torch.tensor(sum(expected) / 3))
    weighted = no_target_loss(logits, flags, pos_weight=9.0, reduction="none")
    torch.testing.assert_close(weighted, torch.tensor([9 * expected[0], expected[1], expected[2]]))
    with pytest.raises(TypeError, match="no_target must be a bool tensor"):
        no_target_loss(logits, torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match=r"no_target must have shape \(3,\)"):
        no_target_loss(logits, torch.tensor([True]))
    with pytest.raises(ValueError, match=r"logits must have shape \(b\)"):
        no_target_loss(logits[None], flags)


def test_mask_targets_are_emptied_for_no_target() -> None:
    mask = torch.ones(3, 4, 4)
    flags = torch.tensor([False, True, False])
    out = mask_targets_for_no_target(mask, flags)
    assert out.dtype == mask.dtype and out.shape == mask.shape
    assert out[1].sum() == 0 and out[0].sum() == 16 and out[2].sum() == 16
    assert mask_targets_for_no_target(mask.bool()[:, None], flags)[1].sum() == 0


# ------------------------------------------------------------------------------ EAVL
def _with_head(model, bias: float | None = None):
    """A copy of a tiny EAVL with a no-target head (what build_eavl_tiny(no_target=True) builds)."""
    from vlaligner.models import EAVL

    head = NoTargetHead(query_dim=model.query_generator.dim, vision_dim=model.decoder.dim, use_mask_stats=True)
    if bias is not None:  # force the answer: zero weights, a large bias
        torch.nn.init.zeros_(head.classifier.weight)
        torch.nn.init.constant_(head.classifier.bias, bias)
    return EAVL(
        image_encoder=model.image_encoder, text_encoder=model.text_encoder, neck=model.neck,
        query_generator=model.query_generator, decoder=model.decoder, head=model.head,
        tokenizer=model.tokenizer, img_size=model.img_size, max_length=model.max_length,
        config=model.config, no_target_head=head,
    ).eval()


@pytest.fixture(scope="module")
def tiny():
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    return build_eavl_tiny(img_size=IMG, num_queries=4, mask_bias_init=0.0).eval()


def test_eavl_no_target_logits(tiny) -> None:
    images = torch.randn(2, 3, IMG, IMG)
    ids, att = tiny.tokenize(["the red circle", "all blue shapes"])
    classic = tiny(images, ids, att)
    assert classic.no_target_logits is None and not tiny.has_no_target_head
    assert not any(k.startswith("no_target_head") for k in tiny.state_dict())
    model = _with_head(copy.deepcopy(tiny))  # a copy: train() below updates BatchNorm statistics
    out = model(images, ids, att)
    assert model.has_no_target_head and out.no_target_logits.shape == (2,)
    torch.testing.assert_close(out.logits, classic.logits)  # the mask head is unchanged
    feats = model.encode_image(images[:1]).expand(2)  # one image, two sentences
    same_image = model(images[:1].expand(2, -1, -1, -1), ids, att).no_target_logits
    torch.testing.assert_close(model.forward_features(feats, ids, att).no_target_logits, same_image)
    # It is trained through its own loss: gradients reach the head and the queries.
    model.train()
    loss = no_target_loss(model(images, ids, att).no_target_logits, torch.tensor([False, True]))
    loss.backward()
    assert model.no_target_head.classifier.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query_generator.parameters())
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"query_dim \(16\) must equal the query width"):
        _bad = NoTargetHead(query_dim=16)
        type(model)(
            image_encoder=tiny.image_encoder, text_encoder=tiny.text_encoder, neck=tiny.neck,
            query_generator=tiny.query_generator, decoder=tiny.decoder, head=tiny.head,
            tokenizer=tiny.tokenizer, img_size=IMG, no_target_head=_bad,
        )


# ------------------------------------------------------------------------------ predictor
def _rgb(h: int = 50, w: int = 70) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_predictor_reports_no_target(tiny) -> None:
    from vlaligner.predictor import Predictor

    classic = Predictor(tiny, threshold=0.3).predict(_rgb(), "the dog")
    assert classic.no_target is None and classic.no_target_probability is None
    yes = Predictor(_with_head(tiny, bias=20.0), threshold=0.3).predict(_rgb(), ["the dog", "a cat"])
    for pred in yes:
        assert pred.no_target is True and pred.no_target_probability > 0.99
        assert pred.mask.shape == (50, 70) and not pred.mask.any()  # empty mask
    np.testing.assert_allclose(yes[0].probability, classic.probability, atol=1e-5)  # raw map kept
    no = Predictor(_with_head(tiny, bias=-20.0), threshold=0.3).predict(_rgb(), "the dog")
    assert no.no_target is False and no.no_target_probability < 0.01
    np.testing.assert_array_equal(no.mask, classic.mask)
    assert classic.mask.any()  # so the empty masks above are the no-target answer's doing
    # The threshold decides: probability 0.5 (bias 0) is "no target" only below 0.5.
    mid = _with_head(tiny, bias=0.0)
    assert Predictor(mid, no_target_threshold=0.4).predict(_rgb(), "x").no_target is True
    assert Predictor(mid, no_target_threshold=0.6).predict(_rgb(), "x").no_target is False
    with pytest.raises(ValueError, match=r"no_target_threshold must be in \[0, 1\]"):
        Predictor(mid, no_target_threshold=1.5)


# ------------------------------------------------------------------------------ CLI
@pytest.fixture()
def nt_checkpoint(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Save tiny EAVLs with a no-target head under a test builder that rebuilds them."""
    from vlaligner.models import build_eavl_tiny
    from vlaligner.models import builders

    def save(bias: float) -> Path:
        name = f"test_eavl_tiny_no_target_{'high' if bias > 0 else 'low'}"
        monkeypatch.setitem(builders.BUILDERS, name, lambda **kw: _with_head(build_eavl_tiny(**kw), bias))
        model = _with_head(tiny, bias)
        model._config = {"builder": name, "kwargs": tiny.config["kwargs"]}
        return model.save_pretrained(tmp_path / name)

    return save


def test_segment_cli_says_no_target(nt_checkpoint, tmp_path: Path, capsys) -> None:
    from vlaligner.cli import main

    image = tmp_path / "photo.png"
    Image.fromarray(_rgb(40, 60)).save(image)
    for bias in (20.0, -20.0):
        ckpt = nt_checkpoint(bias)
        out, mask_out = tmp_path / f"o{bias}.png", tmp_path / f"m{bias}.png"
        code = main(["segment", "--checkpoint", str(ckpt), "--image", str(image), "--text", "the purple star",
                     "--out", str(out), "--mask-out", str(mask_out), "--threshold", "0.3"])
        assert code == 0
        stdout = capsys.readouterr().out
        mask = np.asarray(Image.open(mask_out))
        assert mask.shape == (40, 60)
        if bias > 0:
            assert "no target: the model finds nothing in the image that 'the purple star' refers to" in stdout
            assert "no-target probability 1.000" in stdout and "mask covers 0.0%" in stdout
            assert mask.max() == 0
            np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), _rgb(40, 60))
        else:
            assert "target found (no-target probability 0.000)" in stdout
            assert mask.max() == 255
    assert main(["segment", "--checkpoint", str(ckpt), "--image", str(image), "--text", "x",
                 "--out", str(tmp_path / "e.png"), "--no-target-threshold", "2"]) == 2


# ------------------------------------------------------------------------------ evaluation
def test_gres_evaluate(tiny, tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from vlaligner.data import RefDataset, collate_ref_batch, generate_synthetic_grefcoco
    from vlaligner.gres_eval import gres_evaluate, gres_predict
    from vlaligner.gres_metrics import gres_metrics
    from vlaligner.predictor import logits_to_probability

    root = generate_synthetic_grefcoco(tmp_path / "g", num_images=6, seed=1)
    ds = RefDataset(root, "grefcoco", "unc", "train", tokenizer=tiny.tokenize, img_size=IMG)
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_ref_batch)
    flags = torch.tensor([not ds.ref_ann_ids(s.ref_id) for s in ds.samples])
    n, n_nt = len(ds), int(flags.sum())
    assert 0 < n_nt < n
    # A model that always says "no target": every no-target sample scores 1, every other 0.
    always = gres_evaluate(_with_head(tiny, bias=20.0), loader)
    assert always["num_samples"] == n
    assert always["gIoU"] == pytest.approx(100.0 * n_nt / n)
    assert always["N-acc"] == 100.0 and always["T-acc"] == 0.0 and always["Pr@0.7"] == 0.0
    assert always["gIoU-single"] == 0.0 and always["gIoU-multi"] == 0.0  # every target missed
    model = _with_head(tiny, bias=-20.0)
    never = gres_evaluate(model, loader)
    assert never["N-acc"] == 0.0 and never["T-acc"] == 100.0
    # The masks are the evaluation's (input size, then original size), checked by hand.
    preds, targets, pred_nt = [], [], []
    for batch in loader:
        with torch.no_grad():
            out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        for i, size in enumerate(batch["orig_size"].tolist()):
            prob = logits_to_probability(out.logits[i : i + 1], tuple(size), input_size=(IMG, IMG))[0, 0]
            preds.append(prob > 0.5)
            targets.append(batch["orig_mask"][i])
        pred_nt += [False] * len(batch["orig_size"])
        masks, nt = gres_predict(model, batch)
        assert not nt.any() and len(masks) == len(batch["orig_size"])
    expected = gres_metrics(preds, targets, pred_nt, flags)
    # gIoU split by the number of referred objects: the IoU of each such sample, by hand
    counts = [len(ds.ref_ann_ids(s.ref_id)) for s in ds.samples]
    ious = [(p & t.bool()).sum().item() / max((p | t.bool()).sum().item(), 1) for p, t in zip(preds, targets)]
    for key, keep in (("gIoU-single", lambda c: c == 1), ("gIoU-multi", lambda c: c >= 2)):
        chosen = [iou for iou, c in zip(ious, counts) if keep(c)]
        assert chosen and never[key] == pytest.approx(100.0 * sum(chosen) / len(chosen), rel=1e-4, abs=1e-3), key
    for key, value in expected.items():
        # sigmoid(x) > 0.5 here, x > 0 there: a float32 sigmoid can round a few pixels to 0.5
        assert never[key] == pytest.approx(value, rel=1e-4, nan_ok=True), key
    with pytest.raises(ValueError, match="the model has no no-target head"):
        gres_evaluate(tiny, loader)


class _FakeGRESModel(torch.nn.Module):
    """Logits = the image's first channel at stride 4; no-target logit = the first token id - 5."""

    def forward(self, images, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=images[:, :1, ::4, ::4], no_target_logits=input_ids[:, 0].float() - 5.0)


def _fake_gres_batches(n_batches: int = 4, b: int = 3) -> list:
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(n_batches):
        counts = torch.randint(0, 4, (b,), generator=g)
        masks = torch.rand(b, 16, 16, generator=g) > 0.6
        masks[counts == 0] = False  # a no-target sample's target is empty
        batches.append({
            "image": torch.randn(b, 3, 16, 16, generator=g),
            "input_ids": torch.randint(0, 10, (b, 4), generator=g),
            "attention_mask": torch.ones(b, 4, dtype=torch.long),
            "mask": masks.float(), "no_target": counts == 0, "num_targets": counts,
        })
    return batches


def _gres_dist_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    from vlaligner.gres_eval import gres_evaluate

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = _fake_gres_batches()[rank::world]
        result = gres_evaluate(_FakeGRESModel(), mine, at_original_size=False, choose_no_target_threshold=True)
        if rank == 0:
            torch.save(result, result_file)
    finally:
        dist.destroy_process_group()


def test_gres_evaluate_two_processes_equals_one(tmp_path: Path) -> None:
    """Every sum, the split by number of targets included, is all-reduced exactly; the balanced threshold is chosen on all samples."""
    import torch.multiprocessing as mp

    from vlaligner.gres_eval import gres_evaluate

    result = tmp_path / "r.pt"
    mp.start_processes(_gres_dist_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2,
                       join=True, start_method="fork")
    whole = gres_evaluate(_FakeGRESModel(), _fake_gres_batches(), at_original_size=False, choose_no_target_threshold=True)
    assert not math.isnan(whole["gIoU-single"]) and not math.isnan(whole["gIoU-multi"])
    assert not math.isnan(whole["balanced_threshold"])  # chosen over both processes' samples
    # rank 0's samples alone score otherwise, so the equality below needs the gather
    half = gres_evaluate(_FakeGRESModel(), _fake_gres_batches()[0::2], at_original_size=False,
                         choose_no_target_threshold=True)
    assert half["gIoU@balanced"] != pytest.approx(whole["gIoU@balanced"])
    assert torch.load(result) == pytest.approx(whole, nan_ok=True)
