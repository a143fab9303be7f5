"""The ``vlaligner`` command: one front door for segmenting, making the synthetic set,
training and evaluating.

Axes (of the arrays this file passes around): n queries, l words, H W image space.

Sub-commands:
    segment    mask the object a sentence refers to; write an overlay PNG (and a grid of
               what each query saw with --queries); or, with --image-dir / --texts /
               --out-dir, masks for many images in batches
    export     write a checkpoint as an ONNX file (image, token ids, mask in; logits out)
    synth      write the synthetic RefCOCO-format data set (vlaligner.data.synthetic);
               --generalized for the gRefCOCO-format one (several objects or none)
    train      train a model (vlaligner.training; the options of examples/train_eavl.py)
    evaluate   evaluate a checkpoint (the options of examples/evaluate.py)
    info       versions, devices, and a checkpoint's configuration (integrity checked)
    check-data check a whole refer-layout data folder and print a summary table
    version    print the version

A user's mistake (missing file, empty sentence, bad option) prints one line
``vlaligner <command>: error: ...`` on stderr and exits with status 2, never a traceback;
errors inside the model are real bugs and keep their traceback (set VLALIGNER_DEBUG=1 to
see the traceback behind a one-line error too).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser", "UsageError", "DEBUG_ENV"]

#: Set to 1 to see the traceback behind a one-line error.
DEBUG_ENV = "VLALIGNER_DEBUG"

#: The commands of the training package, and the example script that runs the same.
_TRAINING = {"train": "train_eavl.py", "evaluate": "evaluate.py"}

_EPILOG = """examples:
  vlaligner synth data/synth --images 64 --seed 0
  vlaligner train --help
  vlaligner segment --checkpoint runs/tiny/final --image photo.jpg \\
      --text "the red square on the left" --out mask.png --queries
  vlaligner segment --checkpoint runs/tiny/final --image-dir photos --texts texts.jsonl \
      --out-dir masks
  vlaligner export --checkpoint runs/tiny/final --onnx eavl.onnx
  vlaligner info --checkpoint runs/tiny/final
  vlaligner check-data data/refer --dataset refcoco --split-by unc

Run 'vlaligner <command> --help' for a command's options."""


class UsageError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (not usage + message) and exits 2."""

    def error(self, message: str) -> "None":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _training_parser_kwargs(name: str) -> dict:
    """help / description of ``train`` and ``evaluate`` (their options are the training package's)."""
    what = "train a model" if name == "train" else "evaluate a checkpoint on data splits"
    return dict(
        help=f"{what} (vlaligner.training; 'vlaligner {name} --help' lists the options)",
        description=f"{what.capitalize()}: the options of examples/{_TRAINING[name]}.",
        add_help=False,
    )


def build_parser() -> argparse.ArgumentParser:
    """The full ``vlaligner`` parser (sub-commands included)."""
    from vlaligner import __version__

    parser = _Parser(
        prog="vlaligner",
        description=(
            "EAVL referring image segmentation: segment the object a sentence describes, "
            "and see what each of the model's queries looked at."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vlaligner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    seg = sub.add_parser(
        "segment",
        help="segment the object a sentence refers to and write an overlay PNG",
        description=(
            "Segment the object that --text describes in --image with a trained model, and "
            "write the mask laid over the image (same size as the image). With --queries also "
            "write a grid with one panel per query: the query's own binarised mask, its score "
            "(its weight in the final mask) and the words it attended to most (paper Fig. 4). "
            "For many images give --image-dir, --texts (JSON lines {\"image\": name, \"text\": "
            "sentence}) and --out-dir instead: the pairs run in batches with a progress bar and "
            "each writes a binary mask PNG (and an overlay with --overlays) into --out-dir."
        ),
    )
    seg.add_argument("--checkpoint", metavar="DIR", default=None,
                     help="(required) directory written by EAVL.save_pretrained (model.safetensors + config.json), "
                          "or a Hugging Face Hub repo id owner/name")
    seg.add_argument("--image", metavar="IMG", default=None,
                     help="image file (PNG, JPEG, ...); any size, greyscale and RGBA are converted")
    seg.add_argument("--text", metavar="SENTENCE", default=None,
                     help="the referring expression, e.g. \"the dog on the left\"")
    seg.add_argument("--out", metavar="OUT.png", default=None,
                     help="where to write the overlay (created with its parent folders)")
    seg.add_argument("--image-dir", metavar="DIR", default=None,
                     help="many images: the folder the \"image\" names of --texts are relative to")
    seg.add_argument("--texts", metavar="FILE.jsonl", default=None,
                     help="many images: one JSON object per line, {\"image\": name, \"text\": sentence}")
    seg.add_argument("--out-dir", metavar="DIR", default=None,
                     help="many images: where to write <line>_<image stem>.png masks (and "
                          "predictions.jsonl); existing files are never overwritten")
    seg.add_argument("--overlays", action="store_true",
                     help="many images: also write <line>_<image stem>_overlay.png")
    seg.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                     help="image-sentence pairs per forward pass; default 16")
    seg.add_argument("--compile", action="store_true",
                     help="run the model through torch.compile (pays off for many images)")
    seg.add_argument("--queries", action="store_true",
                     help="also write the per-query grid (to --queries-out)")
    seg.add_argument("--queries-out", metavar="PATH", default=None,
                     help="where to write the query grid (default: OUT_queries.png next to --out); "
                          "implies --queries")
    seg.add_argument("--mask-out", metavar="PATH", default=None,
                     help="also write the binary mask as a black-and-white PNG")
    seg.add_argument("--device", default="cpu", metavar="DEVICE",
                     help="cpu, cuda, cuda:N, mps or auto (CUDA, then MPS, then CPU); default cpu")
    seg.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="compute precision; default auto = float32 on CPU, bfloat16 (float16 on "
                          "cards without bf16) on GPU, under autocast")
    seg.add_argument("--threshold", type=_probability, default=0.5,
                     help="probability above which a pixel belongs to the mask; default 0.5")
    seg.add_argument("--no-target-threshold", type=_probability, default=None, metavar="P",
                     help="for a model with a no-target head (generalized, gRefCOCO-style): "
                          "answer 'no target' (and write an empty mask) when the model's "
                          "no-target probability is above P; default: the threshold the "
                          "checkpoint records (chosen on val during training), else 0.5")
    seg.add_argument("--top-words", type=_positive_int, default=3, metavar="K",
                     help="how many most-attended words to show per query; default 3")
    seg.add_argument("--no-exif-transpose", action="store_true",
                     help="keep the image's stored pixel grid instead of applying its EXIF "
                          "orientation (by default a phone photo is segmented upright, as a "
                          "viewer shows it)")
    seg.set_defaults(handler=_cmd_segment)

    synth = sub.add_parser(
        "synth",
        help="write the synthetic RefCOCO-format data set (coloured shapes + sentences)",
        description=(
            "Write a small synthetic data set in the RefCOCO layout (refs(unc).p, "
            "instances.json, images), for trying the pipeline without downloading COCO. "
            "Pass OUT as the data root to training (dataset refcoco, split_by unc). With "
            "--generalized: the gRefCOCO layout (grefs(unc).json, instances.json, "
            "images/train2014) with sentences that refer to several objects or to none "
            "(dataset grefcoco, split_by unc)."
        ),
    )
    synth.add_argument("out", metavar="OUT", help="output directory (the data root)")
    synth.add_argument("--images", type=_positive_int, default=64, metavar="N",
                       help="number of images to draw (at least 4); default 64")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files); default 0")
    synth.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                       help="square images of this side in pixels; default: varied sizes")
    synth.add_argument("--generalized", action="store_true",
                       help="write a generalized set in the gRefCOCO layout (sentences that refer "
                            "to several objects or to none; dataset grefcoco, split_by unc)")
    synth.set_defaults(handler=_cmd_synth)

    export = sub.add_parser(
        "export",
        help="write a checkpoint as an ONNX file",
        description=(
            "Export a checkpoint to ONNX: inputs image (b 3 S S, ImageNet-normalised, S the "
            "model's img_size), input_ids (b l) and attention_mask (b l); outputs mask_logits "
            "(b 1 S/4 S/4) and query_scores (b n). Batch b and sentence length l are dynamic. "
            "With onnxruntime installed the file is run once and compared with PyTorch."
        ),
    )
    export.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="directory written by EAVL.save_pretrained, or a Hub repo id owner/name")
    export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    export.add_argument("--opset", type=_positive_int, default=None, metavar="N",
                        help="ONNX opset version (>= 17); default 18")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT.onnx if it exists (default: refuse)")
    export.add_argument("--no-check", action="store_true",
                        help="do not run the exported file with onnxruntime against PyTorch")
    export.set_defaults(handler=_cmd_export)

    for name in _TRAINING:
        sub.add_parser(name, **_training_parser_kwargs(name))

    info = sub.add_parser(
        "info",
        help="show versions, available devices and (optionally) a checkpoint's configuration",
        description="Print vlaligner / torch versions, available devices, and with --checkpoint "
                    "the model configuration stored in its config.json.",
    )
    info.add_argument("--checkpoint", metavar="DIR", default=None,
                      help="a directory written by EAVL.save_pretrained (its files and the "
                           "SHA-256 of its weights are checked)")
    info.set_defaults(handler=_cmd_info)

    check = sub.add_parser(
        "check-data",
        help="check a refer-layout data folder in one pass and print a summary table",
        description=(
            "Check every split of one data set of a refer-layout folder (files present, refs "
            "well formed, counts per split, every referenced image present and decodable, "
            "sentences non-empty, masks decodable) and print a summary table and every "
            "problem, naming the file and the ref / sentence / annotation ids. Exit status 0 "
            "when no problem is found, 1 otherwise. Nothing is written."
        ),
    )
    check.add_argument("root", metavar="ROOT", help="the data root (holding refcoco/ ... and images/)")
    check.add_argument("--dataset", required=True, choices=["refcoco", "refcoco+", "refcocog", "grefcoco"],
                       help="which data set to check (grefcoco: the gRefCOCO layout, see docs/data.md)")
    check.add_argument("--split-by", default=None,
                       help="unc (refcoco, refcoco+, grefcoco), umd or google (refcocog); default unc / umd")
    check.add_argument("--no-decode", action="store_true",
                       help="only check that the files exist and are well formed; do not decode "
                            "the images and masks (much faster)")
    check.add_argument("--max-listed", type=_positive_int, default=20, metavar="N",
                       help="list at most N problems of each kind; default 20")
    check.set_defaults(handler=_cmd_check_data)

    version = sub.add_parser("version", help="print the version", description="Print the version.")
    version.set_defaults(handler=_cmd_version)
    return parser


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def _default_queries_out(out: Path) -> Path:
    return out.with_name(f"{out.stem}_queries{out.suffix or '.png'}")


def _check_out_path(path: Path, option: str) -> None:
    from PIL import Image

    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"{option} {str(path)!r}: cannot tell the image format; end it with .png")
    if path.exists() and path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory; give a file name such as out.png")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(
                    f"{option} {str(path)!r}: {str(parent)!r} is a file, not a folder, so nothing can "
                    f"be written under it"
                )
            break


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (after links and '..'; hard links too when both exist)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _check_no_clash(outputs: "dict[str, Path]", inputs: "dict[str, Path]") -> None:
    """Refuse an output that is one of the inputs or another output of the same command."""
    names = list(outputs)
    for i, option in enumerate(names):
        for in_option, in_path in inputs.items():
            if _same_file(outputs[option], in_path):
                raise UsageError(
                    f"{option} {str(outputs[option])!r} is the same file as {in_option} "
                    f"{str(in_path)!r}; refusing to overwrite an input: choose another name"
                )
        for other in names[i + 1:]:
            if _same_file(outputs[option], outputs[other]):
                raise UsageError(
                    f"{option} and {other} are the same file {str(outputs[option])!r}; "
                    "give each output its own name"
                )


def _atomic_save(path: Path, write) -> None:
    """Create the parent folders, write through a temporary file beside ``path``, then rename.

    A failure or a kill never leaves a half-written file under the real name, nor removes
    an older file of that name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cmd_segment(args: argparse.Namespace) -> int:
    many = [args.image_dir, args.texts, args.out_dir]
    one = [args.image, args.text, args.out]
    if args.checkpoint is None and any(v is not None for v in many):
        raise UsageError("the following arguments are required: --checkpoint")
    if any(v is not None for v in many):
        if any(v is not None for v in one):
            raise UsageError(
                "give either --image/--text/--out (one image) or --image-dir/--texts/--out-dir "
                "(many images), not both"
            )
        if any(v is None for v in many):
            raise UsageError("many images need all of --image-dir, --texts and --out-dir")
        if args.queries or args.queries_out or args.mask_out:
            raise UsageError("--queries / --queries-out / --mask-out apply to one image (--image)")
        from vlaligner.batch_segment import segment_many

        return segment_many(args)
    missing = [
        opt
        for opt, v in zip(("--checkpoint", "--image", "--text", "--out"), [args.checkpoint, *one])
        if v is None
    ]
    if missing:
        raise UsageError(
            f"the following arguments are required: {', '.join(missing)} "
            f"(or --image-dir, --texts and --out-dir for many images)"
        )
    from vlaligner.predictor import (
        Predictor,
        as_rgb_array,
        check_sentences,
        resolve_checkpoint_dir,
        resolve_device,
        resolve_dtype,
    )

    out = Path(args.out)
    want_queries = args.queries or args.queries_out is not None
    queries_out = Path(args.queries_out) if args.queries_out else _default_queries_out(out)
    exif = not args.no_exif_transpose
    outputs = {"--out": out}
    if want_queries:
        outputs["--queries-out"] = queries_out
    if args.mask_out:
        outputs["--mask-out"] = Path(args.mask_out)
    # Every user mistake is found before the (slow) model load, and reported in one line.
    try:
        check_sentences(args.text)
        for option, path in outputs.items():
            _check_out_path(path, option)
        _check_no_clash(outputs, {"--image": Path(args.image)})
        checkpoint = resolve_checkpoint_dir(args.checkpoint)
        device = resolve_device(args.device)
        resolve_dtype(args.dtype, device)
        rgb = as_rgb_array(args.image, exif_transpose=exif)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise UsageError(str(err)) from None

    try:
        predictor = Predictor.from_pretrained(
            checkpoint, device=device, dtype=args.dtype, threshold=args.threshold,
            no_target_threshold=args.no_target_threshold, exif_transpose=exif,
            compile=args.compile,
        )
    except (ValueError, KeyError, OSError) as err:
        # A checkpoint with the right files but the wrong contents (edited config.json,
        # truncated weights, another model's files).
        raise UsageError(f"cannot load the checkpoint {args.checkpoint!r}: {err}") from None
    if want_queries and not predictor.has_queries:
        raise UsageError(
            f"--queries: the checkpoint {args.checkpoint!r} has a fixed-kernel head, so there are "
            f"no per-query masks to show; run without --queries"
        )
    pred = predictor.predict(rgb, args.text, return_queries=want_queries)

    from PIL import Image

    from vlaligner.viz import save_overlay, save_query_grid

    if pred.no_target:
        print(f"no target: the model finds nothing in the image that {args.text!r} refers to "
              f"(no-target probability {pred.no_target_probability:.3f}); the mask is empty")
    elif pred.no_target is not None:
        print(f"target found (no-target probability {pred.no_target_probability:.3f})")
    _atomic_save(out, lambda tmp: save_overlay(tmp, rgb, pred.mask))
    h, w = pred.mask.shape
    print(f"wrote {out} ({w}x{h}); mask covers {100.0 * pred.mask.mean():.1f}% of the image")
    if args.mask_out:
        mask_path = Path(args.mask_out)
        mask_image = Image.fromarray(pred.mask.astype("uint8") * 255)
        _atomic_save(mask_path, lambda tmp: mask_image.save(tmp, format=_format_of(mask_path)))
        print(f"wrote {mask_path} (binary mask)")
    if want_queries:
        panels: list = []
        _atomic_save(queries_out, lambda tmp: panels.extend(
            save_query_grid(tmp, rgb, pred, top_k=args.top_words)
        ))
        print(f"wrote {queries_out} ({len(panels)} query panels, highest score first)")
        for panel in panels:
            score = "  n/a" if panel.score is None else f"{panel.score:.3f}"
            print(f"  query {panel.index:>2}  score {score}  words: {', '.join(panel.words)}")
    return 0


def _format_of(path: Path) -> str:
    """PIL's format name for ``path``'s extension (so a temporary name can be written)."""
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def _cmd_export(args: argparse.Namespace) -> int:
    from vlaligner.export import DEFAULT_OPSET, check_export_matches, export_onnx
    from vlaligner.predictor import resolve_checkpoint_dir

    out = Path(args.onnx)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"--onnx {str(out)!r}: the file name must end with .onnx")
    if out.is_dir():
        raise UsageError(f"--onnx {str(out)!r} is a directory; give a file name such as eavl.onnx")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--onnx {str(out)!r} exists; pass --overwrite to replace it")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if opset < 17:
        raise UsageError(f"--opset must be at least 17 (LayerNormalization), got {opset}")
    try:
        checkpoint = resolve_checkpoint_dir(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if out.resolve().parent == checkpoint.resolve():
        raise UsageError(f"--onnx {str(out)!r} is inside the checkpoint folder; write it elsewhere")
    from vlaligner.models import EAVL

    try:
        model = EAVL.from_pretrained(checkpoint)
    except (ValueError, KeyError, OSError) as err:
        raise UsageError(f"cannot load the checkpoint {args.checkpoint!r}: {err}") from None
    export_onnx(model, out, opset=opset)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {opset}, input {model.img_size}x"
          f"{model.img_size}, dynamic batch and sentence length)")
    if not args.no_check:
        try:
            diff = check_export_matches(model, out)
        except ImportError as err:
            print(f"not checked: {err}")
        else:
            print(f"checked with onnxruntime: max |logit difference| {diff:.2e} vs PyTorch")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from vlaligner.data import generate_synthetic_grefcoco, generate_synthetic_refcoco

    kwargs = {"num_images": args.images, "seed": args.seed}
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT {str(out)!r} is a file; give a directory")
    try:
        generate = generate_synthetic_grefcoco if args.generalized else generate_synthetic_refcoco
        root = generate(out, **kwargs)
    except (ValueError, TypeError) as err:  # the generator checks its arguments
        raise UsageError(str(err)) from None
    dataset = "grefcoco" if args.generalized else "refcoco"
    print(f"wrote a synthetic data set of {args.images} images to {root} "
          f"(use it as the data root with dataset {dataset}, split_by unc)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json
    import platform

    import torch

    from vlaligner import __version__

    print(f"vlaligner {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    devices = ["cpu"]
    if cuda:
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                    for i in range(torch.cuda.device_count())]
    print(f"devices: {', '.join(devices)}")
    if args.checkpoint:
        from vlaligner.models import EAVL
        from vlaligner.predictor import check_checkpoint_dir

        try:
            directory = check_checkpoint_dir(args.checkpoint)
            # Files, config structure, builder, recorded SHA-256 and weights header.
            config = EAVL.check_pretrained(directory)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from None
        size = (directory / "model.safetensors").stat().st_size
        print(f"checkpoint {directory} (model.safetensors {size / 2**20:.1f} MiB, SHA-256 matches "
              f"config.json)")
        kwargs = config.get("kwargs", {}) if isinstance(config, dict) else {}
        facts = [f"builder {config.get('builder')}"] if isinstance(config, dict) else []
        facts += [f"{key} {kwargs[key]}" for key in ("img_size", "num_queries", "head") if key in kwargs]
        print("model: " + ", ".join(facts))
        print(json.dumps(config, indent=2, sort_keys=True))
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from vlaligner.data.check import check_data

    root = Path(args.root)
    if not root.is_dir():
        raise UsageError(
            f"ROOT {str(root)!r} is not a folder (expected a refer-layout data root holding "
            f"{args.dataset}/ and images/mscoco/images/train2014/)"
        )
    try:
        report = check_data(
            root, args.dataset, args.split_by, decode=not args.no_decode,
            progress=lambda line: print(line, file=sys.stderr),
        )
    except ValueError as err:  # an unknown --split-by
        raise UsageError(str(err)) from None
    print(report.format(max_listed=args.max_listed))
    return 0 if report.ok else 1


def _cmd_version(args: argparse.Namespace) -> int:
    from vlaligner import __version__

    print(__version__)
    return 0


def _run_training_command(command: str, rest: Sequence[str]) -> int:
    """``vlaligner train`` / ``evaluate``: the training package's commands, in this process."""
    from .training import evaluate_main, train_main

    run = train_main if command == "train" else evaluate_main
    return run(list(rest), prog=f"vlaligner {command}")


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _run(argv: List[str]) -> int:
    if argv and argv[0] in _TRAINING:
        # Everything after the command belongs to the training package, --help included.
        return _run_training_command(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``vlaligner`` command; returns the exit status (0 ok, 2 a user mistake)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"vlaligner {command}" if command else "vlaligner"
    try:
        return _run(argv)
    except SystemExit as stop:  # argparse: --help / --version (0) or a bad option (2)
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except UsageError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        # A missing extra is the user's installation, not a bug: say which one to install.
        print(f"{prog}: error: {err} (install the extras: pip install 'vlaligner[all]')",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
