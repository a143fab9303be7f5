"""Run LAVT's own ``train.py`` or ``test.py`` with the Vision-Language Aligner retrofitted.

Axis legend: b batch, n queries, l words, e language width, c channels, h w space.

Usage (the user's checkout is never edited, and nothing of LAVT is copied)::

    python -m torch.distributed.launch --nproc_per_node 4 --master_port 12345 \\
        adapters/lavt/run_lavt.py --host-root ~/LAVT-RIS [--script train.py|test.py] \\
        [--head aligner|fixed] [--num-queries 24] [--kernel-size 3] [--no-estimator] \\
        [--query-dim D] [--no-global-vision] [--keep-cwd] [--init-from-host CKPT] \\
        [--output-suffix SUFFIX] [--skip-deps-check] \\
        --model lavt --dataset refcoco --model_id refcoco --batch-size 8 --lr 0.00005 \\
        --wd 1e-2 --swin_type base --pretrained_swin_weights ./pretrained_weights/...pth \\
        --epochs 40 --img_size 480

Options this script does not know go to LAVT's script unchanged; everything after a bare
``--`` does too. What happens:

0. the launcher's local rank, given as ``--local-rank=N`` (torch >= 2.0), ``--local_rank=N``
   (older torch) or only ``LOCAL_RANK`` (``torchrun``), is handed to LAVT as
   ``--local_rank=N``, the one spelling its ``args.py`` knows; LAVT's third-party imports are
   checked (one line naming what to ``pip install`` if any is missing); ``--model_id`` gets
   the suffix ``_aligner`` (``_fixed``, or ``--output-suffix``), so the checkpoint
   ``model_best_<model_id>.pth`` never overwrites a plain LAVT run's;
1. the checkout is put first on ``sys.path`` and made the working directory (LAVT's defaults,
   ``./refer/data/`` and ``./checkpoints/``, are relative to it; ``--keep-cwd`` keeps yours);
2. LAVT's ``lib.segmentation`` is imported and its builders ``lavt`` and ``lavt_one`` are
   wrapped: each builds LAVT as usual and passes the model through
   :func:`adapters.lavt.retrofit_lavt` (grid ``img_size // 16``). ``train.py`` optimises
   ``classifier.parameters()``, where the retrofit puts the aligner and generator, so they
   train with the classifier's settings;
3. the script runs as ``__main__`` with your arguments. With ``--init-from-host CKPT`` (a
   LAVT checkpoint: ``{"model": ..., "bert_model": ...}``) the retrofitted model starts from
   its weights (host keys loaded, ``conv1_1`` dropped, the aligner and generator new; a report
   is printed), and so does LAVT's separate BERT.

Checkpoints written this way hold the aligner (``classifier.aligner.*``,
``classifier.query_generator.*``); test them through this script with the same options.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from adapters import (  # noqa: E402  (the repo root must be importable first)
    build_runner_parser,
    check_host_or_exit,
    normalize_local_rank,
    resume_in_spawned_child,
    retrofit_settings,
    run_host_script,
    split_runner_argv,
)

ENV_KEY = "VLALIGNER_RUN_LAVT"
#: Files whose presence says that a folder is a LAVT checkout.
LAVT_LAYOUT = ("lib/segmentation.py", "lib/_utils.py", "lib/mask_predictor.py")
#: The builders of ``lib/segmentation.py`` that the patch wraps.
BUILDERS = ("lavt", "lavt_one")
#: The third-party modules LAVT's train.py / test.py import (directly or through lib/, bert/,
#: data/ and refer/, read at 1da0af9), and the pip package of each. mmcv / mmseg serve only to
#: load the Swin weights (see README for a recipe on current torch).
LAVT_DEPENDENCIES = {
    "requests": "requests", "filelock": "filelock", "tqdm": "tqdm", "timm": "timm",
    "tokenizers": "tokenizers", "h5py": "h5py", "pycocotools": "pycocotools", "matplotlib": "matplotlib",
    "skimage": "scikit-image", "PIL": "pillow", "numpy": "numpy", "torchvision": "torchvision",
    "mmcv": "mmcv==1.7.2", "mmseg": "mmsegmentation==0.30.0",
}


def patch_lavt_builders(settings: Dict[str, Any]) -> None:
    """Wrap ``lib.segmentation.lavt`` / ``lavt_one`` of the checkout on ``sys.path`` (idempotent)."""
    from adapters.lavt.retrofit import retrofit_lavt

    segmentation = importlib.import_module("lib.segmentation")
    host_root = Path(settings["host_root"]).resolve()
    origin = Path(getattr(segmentation, "__file__", "") or "").resolve()
    if host_root not in origin.parents:
        raise ImportError(
            f"'lib.segmentation' was imported from {str(origin)!r}, not from the LAVT checkout "
            f"{str(host_root)!r}: another package named 'lib' shadows LAVT's"
        )
    retrofit_kwargs = dict(settings["retrofit"])
    init_from = settings.get("init_from_host")
    for name in BUILDERS:
        original = getattr(segmentation, name, None)
        if original is None or getattr(original, "__vlaligner_original__", None) is not None:
            continue
        segmentation.__dict__[name] = _wrap_builder(original, retrofit_lavt, retrofit_kwargs, init_from)
    if init_from:
        _patch_bert_loading(init_from)


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _wrap_builder(original: Any, retrofit: Any, retrofit_kwargs: Dict[str, Any], init_from: Optional[str]) -> Any:
    def builder(pretrained: str = "", args: Any = None):
        model = original(pretrained=pretrained, args=args)
        size = int(getattr(args, "img_size", 480)) // 16
        new_model = retrofit(model, grid_size=(size, size), **retrofit_kwargs)
        if init_from:
            from adapters.host_checkpoint import load_host_checkpoint

            report = load_host_checkpoint(new_model, init_from, entries=("model",))
            if _is_main():
                print(report.format(), flush=True)
        return new_model

    builder.__vlaligner_original__ = original  # type: ignore[attr-defined]
    builder.__name__ = getattr(original, "__name__", "builder")
    builder.__doc__ = f"LAVT's {builder.__name__} with the Vision-Language Aligner retrofitted."
    return builder


def _patch_bert_loading(init_from: str) -> None:
    """LAVT (not LAVT-One) keeps BERT outside the model: ``train.py`` builds it with
    ``BertModel.from_pretrained(args.ck_bert)`` and saves it as ``checkpoint["bert_model"]``.
    With ``--init-from-host`` that BERT is loaded too, right after ``from_pretrained``."""
    try:
        bert = importlib.import_module("bert.modeling_bert")
    except ImportError:  # a checkout without LAVT's vendored BERT (a stand-in): nothing to do
        return
    cls = getattr(bert, "BertModel", None)
    original = getattr(cls, "from_pretrained", None)
    if original is None or getattr(original, "__vlaligner_original__", None) is not None:
        return

    def from_pretrained(*args: Any, **kwargs: Any):
        model = original(*args, **kwargs)
        from adapters.host_checkpoint import load_host_checkpoint, read_host_state_dict

        try:
            read_host_state_dict(init_from, entries=("bert_model",))
        except ValueError:
            return model  # a LAVT-One checkpoint: BERT is inside "model"
        report = load_host_checkpoint(model, init_from, entries=("bert_model",))
        if _is_main():
            print("BERT " + report.format(), flush=True)
        return model

    from_pretrained.__vlaligner_original__ = original  # type: ignore[attr-defined]
    cls.from_pretrained = from_pretrained


def suffixed_model_id(argv: Sequence[str], suffix: str) -> List[str]:
    """``argv`` with LAVT's ``--model_id`` (default ``lavt``) given ``suffix``: LAVT saves
    ``<output-dir>/model_best_<model_id>.pth``, so this run never overwrites a plain run's."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--model_id" and i + 1 < len(out):
            if not out[i + 1].endswith(suffix):
                out[i + 1] += suffix
            return out
        if arg.startswith("--model_id="):
            value = arg.split("=", 1)[1]
            out[i] = f"--model_id={value if value.endswith(suffix) else value + suffix}"
            return out
    return out + [f"--model_id=lavt{suffix}"]


def _option(argv: Sequence[str], name: str, default: Optional[str]) -> Optional[str]:
    value = default
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def build_parser() -> argparse.ArgumentParser:
    return build_runner_parser("LAVT", "LAVT-RIS", "conv1_1", text_dim=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    # torch >= 2.0's launcher passes --local-rank, torchrun only LOCAL_RANK; LAVT's args.py
    # (and data/dataset_refer_bert.py, which parses sys.argv at import) knows --local_rank only.
    raw, local_rank = normalize_local_rank(raw, host_flag="--local_rank")
    own, host_args = split_runner_argv(raw)
    args, unknown = build_parser().parse_known_args(own)
    try:
        settings = retrofit_settings(args)
    except ValueError as err:
        raise SystemExit(f"run_lavt.py: {err}") from None
    passed: List[str] = [*unknown, *host_args]
    if args.init_from_host is not None:
        if Path(args.script).name != "train.py":
            raise SystemExit(
                "--init-from-host starts a training run from a LAVT checkpoint; LAVT's test.py loads "
                "--resume strictly, so test the checkpoint that a run started with --init-from-host "
                "wrote (same retrofit options, --resume ./checkpoints/model_best_<model_id>.pth)"
            )
        if _option(passed, "--resume", ""):
            raise SystemExit("--init-from-host and --resume exclude each other: --resume continues a "
                             "retrofitted run, --init-from-host starts one from a plain LAVT checkpoint")
        if not Path(args.init_from_host).expanduser().is_file():
            raise SystemExit(f"run_lavt.py: --init-from-host {str(args.init_from_host)!r}: no such file")
    # a wrong --host-root is said before anything else, then a missing host dependency
    check_host_or_exit(Path(__file__).name, "LAVT", args.host_root, args.script, LAVT_LAYOUT, LAVT_DEPENDENCIES,
                       check_dependencies=not args.skip_deps_check)
    passed = suffixed_model_id(passed, settings["output_suffix"])
    if _is_main():
        model_id = _option(passed, "--model_id", None)
        out_dir = _option(passed, "--output-dir", "./checkpoints/")
        print(
            f"vlaligner: LAVT {args.script} with head {args.head}; model_id {model_id} "
            f"(best checkpoint: {out_dir.rstrip('/')}/model_best_{model_id}.pth)"
            + (f"; local rank {local_rank} passed as --local_rank" if local_rank is not None else ""),
            flush=True,
        )
    run_host_script(
        globals(), host="LAVT", host_root=args.host_root, script=args.script, argv=passed,
        settings=settings, patch=patch_lavt_builders, env_key=ENV_KEY, required=LAVT_LAYOUT,
        chdir=not args.keep_cwd,
    )


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":
    # LAVT launches workers with torch.distributed.launch (each runs this file as __main__);
    # this branch only matters for a fork of LAVT that spawns workers itself.
    resume_in_spawned_child(globals(), patch=patch_lavt_builders, env_key=ENV_KEY)
