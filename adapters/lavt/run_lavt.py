"""Run LAVT's own ``train.py`` or ``test.py`` with the Vision-Language Aligner retrofitted.

Axis legend: b batch, n queries, l words, e language width, c channels, h w space.

Usage (the user's checkout is never edited, and nothing of LAVT is copied)::

    python -m torch.distributed.launch --nproc_per_node 4 --master_port 12345 \\
        adapters/lavt/run_lavt.py --host-root ~/LAVT-RIS [--script train.py|test.py] \\
        [--head aligner|fixed] [--num-queries 24] [--kernel-size 3] [--no-estimator] \\
        [--query-dim D] [--no-global-vision] [--keep-cwd] \\
        --model lavt --dataset refcoco --model_id refcoco --batch-size 8 --lr 0.00005 \\
        --wd 1e-2 --swin_type base --pretrained_swin_weights ./pretrained_weights/...pth \\
        --epochs 40 --img_size 480

Options this script does not know go to LAVT's script unchanged (``--local_rank`` from the
launcher included); everything after a bare ``--`` does too. What happens:

1. the checkout is put first on ``sys.path`` and made the working directory (LAVT's defaults,
   ``./refer/data/`` and ``./checkpoints/``, are relative to it; ``--keep-cwd`` keeps yours);
2. LAVT's ``lib.segmentation`` is imported and its builders ``lavt`` and ``lavt_one`` are
   wrapped: each builds LAVT as usual and passes the model through
   :func:`adapters.lavt.retrofit_lavt` (grid ``img_size // 16``). ``train.py`` optimises
   ``classifier.parameters()``, where the retrofit puts the aligner and generator, so they
   train with the classifier's settings;
3. the script runs as ``__main__`` with your arguments.

Checkpoints written this way hold the aligner (``classifier.aligner.*``,
``classifier.query_generator.*``); test them through this script with the same options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from adapters import (  # noqa: E402  (the repo root must be importable first)
    build_runner_parser,
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
    for name in BUILDERS:
        original = getattr(segmentation, name, None)
        if original is None or getattr(original, "__vlaligner_original__", None) is not None:
            continue
        segmentation.__dict__[name] = _wrap_builder(original, retrofit_lavt, retrofit_kwargs)


def _wrap_builder(original: Any, retrofit: Any, retrofit_kwargs: Dict[str, Any]) -> Any:
    def builder(pretrained: str = "", args: Any = None):
        model = original(pretrained=pretrained, args=args)
        size = int(getattr(args, "img_size", 480)) // 16
        return retrofit(model, grid_size=(size, size), **retrofit_kwargs)

    builder.__vlaligner_original__ = original  # type: ignore[attr-defined]
    builder.__name__ = getattr(original, "__name__", "builder")
    builder.__doc__ = f"LAVT's {builder.__name__} with the Vision-Language Aligner retrofitted."
    return builder


def build_parser() -> argparse.ArgumentParser:
    return build_runner_parser("LAVT", "LAVT-RIS", "conv1_1", text_dim=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    own, host_args = split_runner_argv(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(own)
    settings = retrofit_settings(args)
    passed: List[str] = [*unknown, *host_args]
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
