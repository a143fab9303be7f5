"""Train and evaluate VLT, or VLT + aligner, on RefCOCO / RefCOCO+ / G-Ref (or the synthetic set).

Axis legend: b batch, l words, S input size, h w logit grid (S / out_stride).

Usage::

    # a few CPU steps of the tiny VLT + aligner on the synthetic set (generated once into
    # the package's cache), with evaluation and best / last checkpoints in runs/vlt-tiny
    python adapters/vlt/train_vlt.py --max-steps 20 --eval-every 10 --output-dir runs/vlt-tiny
    python adapters/vlt/train_vlt.py --max-steps 40 --output-dir runs/vlt-tiny --resume
    # VLT's own fixed final kernel, for comparison (write elsewhere)
    python adapters/vlt/train_vlt.py --head fixed --max-steps 20 --output-dir runs/vlt-tiny-fixed
    # Swin-B + BERT-base on real data, 8 GPUs (folder layout: docs/data.md)
    torchrun --nproc_per_node 8 adapters/vlt/train_vlt.py --model swin-b --pretrained \\
        --bert ~/models/bert-base-uncased --data-root ~/refer_data --dataset refcoco+ \\
        --img-size 480 --batch-size 32 --lr 1e-4 --epochs 40 --amp bf16 --output-dir runs/vlt-refcoco+

The run is the project's :class:`vlaligner.training.Trainer`, with every option of
``examples/train_eavl.py`` (recipes, ``--resume``, ``--eval-every``, AMP, DDP under
``torchrun``, ``best/`` and ``last/`` checkpoints, the run folder's ownership rules): see
``docs/training.md``. What is VLT's here is the model (:func:`build_vlt_segmenter`: VLT, its
retrofit, its tokenizer, as a :class:`adapters.trainable.HostSegmenter`), a few options
(``--bert``, VLT's N = 24 queries) and the defaults (:data:`VLT_DEFAULTS`: the ``adam-poly``
recipe, Adam at VLT's lr 1e-3 with polynomial decay and VLT's loss, BCE on the logits).
Checkpoints hold VLT's own ``state_dict`` keys (plus ``aligner.*`` and ``query_generator.*``
with the aligner) in ``model.safetensors`` and the VLT settings with the weights' SHA-256 in
``config.json``: never a pickle.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from adapters.trainable import HostSegmenter, SegmentationOutput  # noqa: E402
from adapters.vlt.model import VLT, build_vlt_swin_b, build_vlt_tiny, vlt_loss  # noqa: E402
from adapters.vlt.retrofit import retrofit_vlt  # noqa: E402
from vlaligner.data.refer import DEFAULT_MAX_LENGTH  # noqa: E402
from vlaligner.training.commands import train_main  # noqa: E402
from vlaligner.training.distributed import DistEnv  # noqa: E402
from vlaligner.training.options import GENERALIZED, UsageError, build_train_parser, resolve_train_args  # noqa: E402

__all__ = ["VLTConfig", "VLT_DEFAULTS", "SegmentationOutput", "build_vlt_segmenter", "vlt_config_from_args",
           "train_steps", "build_parser", "resolve_args", "main"]

PROG = "train_vlt.py"

#: The defaults of this script for options left unset (the rest as examples/train_eavl.py's).
#: A CPU-sized run of the tiny VLT on the synthetic set; VLT's own optimisation (adam-poly).
VLT_DEFAULTS: Dict[str, Any] = dict(
    model="tiny", epochs=1, batch_size=8, img_size=64, device="cpu", num_workers=0,
    recipe="adam-poly", num_queries=24, kernel_size=3,
)


# ============================================================================ the VLT part
@dataclass
class VLTConfig:
    """Everything that fixes the model's architecture (recorded in ``config.json``)."""

    model: str = "tiny"
    head: str = "aligner"
    img_size: int = 64
    vocab_size: int = 30522
    max_length: int = 17
    num_queries: int = 24
    kernel_size: int = 3
    use_estimator: bool = True
    use_global_vision: bool = True


def build_vlt_segmenter(config: VLTConfig, *, bert: Optional[str] = None, pretrained: bool = False) -> HostSegmenter:
    """VLT (``config.head="fixed"``) or VLT + aligner, ready for :class:`vlaligner.training.Trainer`.

    ``forward(images (b 3 S S), input_ids (b l), attention_mask (b l))`` returns ``.logits
    (b 1 S/out_stride S/out_stride)``; the checkpoints hold ``model.host.state_dict()``: VLT's own
    keys (with the aligner, plus ``aligner.*`` and ``query_generator.*``).
    """
    from adapters import HEADS

    if config.head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {config.head!r}")
    tokenizer, vocab_size = make_tokenizer(bert)
    if vocab_size != config.vocab_size:
        raise ValueError(f"config.vocab_size is {config.vocab_size} but the tokenizer has {vocab_size} entries")
    if config.model == "tiny":
        host: VLT = build_vlt_tiny(img_size=config.img_size, vocab_size=config.vocab_size, max_length=config.max_length)
    elif config.model == "swin-b":
        host = build_vlt_swin_b(img_size=config.img_size, bert=bert, pretrained=pretrained)
    else:
        raise ValueError(f"model must be 'tiny' or 'swin-b', got {config.model!r}")
    model = retrofit_vlt(
        host, head=config.head, num_queries=config.num_queries, kernel_size=config.kernel_size,
        use_estimator=config.use_estimator, use_global_vision=config.use_global_vision,
    )
    return HostSegmenter(
        model, logits=lambda vlt, images, ids, mask: vlt(images, ids, mask), tokenizer=tokenizer,
        max_length=config.max_length, img_size=config.img_size, name="vlt", config=asdict(config),
    )


def make_tokenizer(bert: Optional[str]) -> Tuple[Any, int]:
    """The tokenizer and its vocabulary size: ``bert``'s (a local BERT folder), or vlaligner's
    embedded WordPiece vocabulary when None (no download)."""
    from vlaligner.models.tokenizer import load_tiny_tokenizer, load_tokenizer

    tokenizer = load_tiny_tokenizer() if bert is None else load_tokenizer(bert)
    return tokenizer, len(tokenizer)


def train_steps(
    model: nn.Module,
    batches: Iterable[Dict[str, Any]],
    *,
    steps: int,
    lr: float = 1e-3,
    device: str = "cpu",
    log: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> List[float]:
    """``steps`` plain Adam steps of VLT's loss, cycling over ``batches`` (no schedule, no checkpoints).

    A minimal loop for a quick check from Python; ``main`` is the full trainer.

    Args:
        model: VLT or its retrofit: ``forward(images, input_ids, attention_mask) -> (b 1 h w)``.
        batches: dicts with ``image (b 3 S S)``, ``input_ids (b l)``, ``attention_mask (b l)``,
            ``mask (b S S)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: List[float] = []
    for step, batch in enumerate(itertools.islice(_forever(batches), steps)):
        logits = model(batch["image"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device))
        loss = vlt_loss(logits, batch["mask"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log({"step": step, "loss": losses[-1]})
    return losses


def _forever(batches: Iterable[Dict[str, Any]]) -> Iterable[Dict[str, Any]]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches is empty: the data set has fewer samples than one batch")


# ============================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    """``examples/train_eavl.py``'s options plus VLT's (``--bert``); ``--head`` chooses VLT's own
    fixed final kernel or the aligner."""
    p = build_train_parser(PROG)
    p.description = "Train VLT or VLT + aligner (adapters/vlt) with the project's trainer."
    g = p.add_argument_group("VLT")
    g.add_argument("--bert", default=None, help="local BERT folder (swin-b): weights + tokenizer")
    return p


def _check_vlt_options(args: argparse.Namespace) -> None:
    """What VLT does not have, refused before anything is built."""
    if args.dataset in GENERALIZED:
        raise UsageError(f"--dataset {args.dataset}: VLT has no no-target head; train EAVL "
                         "(examples/train_eavl.py) on generalized sets")
    if args.no_global_text:
        raise UsageError("--no-global-text is an ablation of EAVL's neck; VLT has no F_s input to drop")
    if args.model_kwargs:
        raise UsageError(f"--model-kwargs is for the EAVL builders; VLT's size is --model tiny / swin-b, got {args.model_kwargs}")
    if args.pretrained and args.model == "tiny":
        raise UsageError("--pretrained loads ImageNet Swin-B (--model swin-b); the tiny VLT has no pretrained weights")
    if args.bert is not None and args.model == "tiny":
        raise UsageError("--bert is the text encoder of --model swin-b; the tiny VLT has its own small one")
    if args.max_length is None:
        args.max_length = DEFAULT_MAX_LENGTH[args.dataset]
    if args.output_dir is None:  # never the folder of a plain EAVL run
        args.output_dir = Path("runs") / f"vlt-{args.model}-{args.head}-{args.dataset}"


def resolve_args(argv: Optional[Sequence[str]] = None, env: Optional[DistEnv] = None, prog: str = PROG) -> argparse.Namespace:
    """Parse and check the command line (cheap: no model, no data); raises ``UsageError``."""
    args = resolve_train_args(argv, env, prog=prog, parser=build_parser(), defaults=VLT_DEFAULTS,
                              check=_check_vlt_options)
    if args.mask_bias_init is not None:  # known once the recipe is resolved
        raise UsageError(f"--recipe {args.recipe} sets a mask bias ({args.mask_bias_init}); VLT keeps its own "
                         "initial bias: choose a recipe without one (adam-poly, paper-finetune)")
    return args


def vlt_config_from_args(args: argparse.Namespace) -> VLTConfig:
    """The model settings of resolved arguments (the tokenizer fixes the vocabulary size)."""
    _, vocab_size = make_tokenizer(args.bert)
    return VLTConfig(
        model=args.model, head=args.head, img_size=args.img_size, vocab_size=vocab_size,
        max_length=args.max_length, num_queries=args.num_queries, kernel_size=args.kernel_size,
        use_estimator=not args.no_estimator, use_global_vision=not args.no_global_vision,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train as the command line says. Exit status as ``vlaligner train``: 0 done, 2 a usage
    mistake (one line), 3 stopped by ``--stop-after-steps``."""
    return train_main(
        argv, prog=PROG, resolve=resolve_args,
        model_factory=lambda args: build_vlt_segmenter(vlt_config_from_args(args), bert=args.bert,
                                                       pretrained=args.pretrained),
    )


if __name__ == "__main__":
    sys.exit(main())
