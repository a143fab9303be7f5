"""Run CRIS's own ``train.py`` or ``test.py`` with the Vision-Language Aligner retrofitted.

Axis legend: b batch, n queries, l words, c channels, h w space.

Usage (from anywhere; the user's checkout is never edited)::

    python adapters/cris/run_cris.py --host-root ~/CRIS.pytorch \\
        [--script train.py|test.py] [--head aligner|fixed] [--num-queries 24] \\
        [--kernel-size 3] [--no-estimator] [--query-dim D] [--no-global-vision] [--keep-cwd] \\
        --config config/refcoco/cris_r50.yaml [--opts KEY VALUE ...]

Options this script does not know (``--config``, ``--opts``, ...) go to CRIS's script
unchanged; everything after a bare ``--`` does too. What happens:

1. the checkout is put first on ``sys.path`` and made the working directory (CRIS's configs
   use paths relative to it; ``--keep-cwd`` keeps yours);
2. CRIS's ``model`` package is imported and ``model.build_segmenter`` is wrapped: it builds
   CRIS as usual, passes the model through :func:`adapters.cris.retrofit_cris` (grid from
   ``cfg.input_size``) and moves the aligner's parameters into the parameter group that held
   the replaced ``Projector`` (base learning rate);
3. the chosen script runs as ``__main__`` with your arguments. CRIS's ``train.py`` starts
   one worker per GPU with ``torch.multiprocessing.spawn``; each worker re-imports this file,
   which patches the builder again before defining the script's functions, so every worker
   builds the retrofitted model.

Checkpoints written this way hold the aligner (keys ``proj.*`` and ``query_generator.*``); to
test one, run ``test.py`` through this script with the same retrofit options.
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
    regroup_params,
    resume_in_spawned_child,
    retrofit_settings,
    run_host_script,
    split_runner_argv,
)

ENV_KEY = "VLALIGNER_RUN_CRIS"
#: Files whose presence says that a folder is a CRIS checkout.
CRIS_LAYOUT = ("model/__init__.py", "model/segmenter.py", "model/layers.py")


def patch_cris_builder(settings: Dict[str, Any]) -> None:
    """Wrap ``model.build_segmenter`` of the CRIS checkout on ``sys.path`` (idempotent)."""
    from adapters.cris.retrofit import retrofit_cris

    package = importlib.import_module("model")
    host_root = Path(settings["host_root"]).resolve()
    origin = Path(getattr(package, "__file__", "") or "").resolve()
    if host_root not in origin.parents:
        raise ImportError(
            f"the module 'model' was imported from {str(origin)!r}, not from the CRIS checkout "
            f"{str(host_root)!r}: another package named 'model' shadows CRIS's"
        )
    original = package.build_segmenter
    if getattr(original, "__vlaligner_original__", None) is not None:
        return
    retrofit_kwargs = dict(settings["retrofit"])

    def build_segmenter(args: Any):
        model, param_list = original(args)
        size = int(getattr(args, "input_size", 416)) // 16
        new_model = retrofit_cris(model, grid_size=(size, size), **retrofit_kwargs)
        groups = regroup_params(param_list, new_model, anchor=list(model.proj.parameters()))
        return new_model, groups

    build_segmenter.__vlaligner_original__ = original  # type: ignore[attr-defined]
    build_segmenter.__doc__ = "CRIS's build_segmenter with the Vision-Language Aligner retrofitted."
    package.build_segmenter = build_segmenter


def build_parser() -> argparse.ArgumentParser:
    return build_runner_parser("CRIS", "CRIS.pytorch", "Projector")


def main(argv: Optional[Sequence[str]] = None) -> None:
    own, host_args = split_runner_argv(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(own)
    settings = retrofit_settings(args)
    passed: List[str] = [*unknown, *host_args]
    run_host_script(
        globals(), host="CRIS", host_root=args.host_root, script=args.script, argv=passed,
        settings=settings, patch=patch_cris_builder, env_key=ENV_KEY, required=CRIS_LAYOUT,
        chdir=not args.keep_cwd,
    )


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":
    # A worker started by CRIS's train.py with the spawn method (see run_host_script).
    resume_in_spawned_child(globals(), patch=patch_cris_builder, env_key=ENV_KEY)
