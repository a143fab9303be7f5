"""Run CRIS's own ``train.py`` or ``test.py`` with the Vision-Language Aligner retrofitted.

Axis legend: b batch, n queries, l words, c channels, h w space.

Usage (from anywhere; the user's checkout is never edited)::

    python adapters/cris/run_cris.py --host-root ~/CRIS.pytorch \\
        [--script train.py|test.py] [--head aligner|fixed] [--num-queries 24] \\
        [--kernel-size 3] [--no-estimator] [--query-dim D] [--no-global-vision] [--keep-cwd] \\
        [--init-from-host CKPT] [--output-suffix SUFFIX] [--skip-deps-check] \\
        --config config/refcoco/cris_r50.yaml [--opts KEY VALUE ...]

Options this script does not know (``--config``, ``--opts``, ...) go to CRIS's script
unchanged; everything after a bare ``--`` does too. What happens:

0. a launcher's ``--local-rank`` / ``--local_rank`` is taken out (CRIS's parser knows neither:
   it starts one worker per GPU itself; several launcher processes are refused); CRIS's
   third-party imports are checked (one line naming what to ``pip install`` if any is
   missing);
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

CRIS's ``utils.config`` loaders are wrapped too: ``exp_name`` gets the suffix ``_aligner``
(``_fixed``, or ``--output-suffix``), so this run writes to ``<output_folder>/<exp_name><suffix>``
and never into a plain CRIS run's folder. With ``--init-from-host CKPT`` (a CRIS
``best_model.pth``) the retrofitted model starts from its weights: backbone, neck and decoder
as they are, the Projector's up-projection into the aligner's identical one, ``proj.txt``
dropped, the rest new; a one-screen report is printed.

Checkpoints written this way hold the aligner (keys ``proj.*`` and ``query_generator.*``); to
test one, run ``test.py`` through this script with the same retrofit options.
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
    regroup_params,
    resume_in_spawned_child,
    retrofit_settings,
    run_host_script,
    split_runner_argv,
)

ENV_KEY = "VLALIGNER_RUN_CRIS"
#: Files whose presence says that a folder is a CRIS checkout.
CRIS_LAYOUT = ("model/__init__.py", "model/segmenter.py", "model/layers.py")
#: The third-party modules CRIS's train.py / test.py import (directly or through utils/,
#: engine/ and model/, read at e596332), and the pip package of each.
CRIS_DEPENDENCIES = {
    "cv2": "opencv-python", "loguru": "loguru", "yaml": "pyyaml", "lmdb": "lmdb", "pyarrow": "pyarrow",
    "ftfy": "ftfy", "regex": "regex", "tqdm": "tqdm", "wandb": "wandb", "PIL": "pillow", "numpy": "numpy",
}
#: Where the retrofit's up-projection takes CRIS's Projector.vis weights from (--init-from-host).
CRIS_KEY_MAP = {"proj.vis.": "proj.mask_generator.projection.layers."}


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
    init_from = settings.get("init_from_host")

    def build_segmenter(args: Any):
        model, param_list = original(args)
        size = int(getattr(args, "input_size", 416)) // 16
        new_model = retrofit_cris(model, grid_size=(size, size), **retrofit_kwargs)
        groups = regroup_params(param_list, new_model, anchor=list(model.proj.parameters()))
        main_process = int(getattr(args, "rank", 0) or 0) == 0
        if init_from:
            from adapters.host_checkpoint import load_host_checkpoint

            report = load_host_checkpoint(new_model, init_from, entries=("state_dict",), key_map=CRIS_KEY_MAP)
            if main_process:
                print(report.format(), flush=True)
        if main_process and getattr(args, "output_dir", None):
            print(f"vlaligner: this run writes to {args.output_dir}", flush=True)
        return new_model, groups

    build_segmenter.__vlaligner_original__ = original  # type: ignore[attr-defined]
    build_segmenter.__doc__ = "CRIS's build_segmenter with the Vision-Language Aligner retrofitted."
    package.build_segmenter = build_segmenter
    if settings.get("output_suffix"):
        patch_cris_config(settings["output_suffix"])


def suffixed(cfg: Any, suffix: str) -> Any:
    """Append ``suffix`` to ``cfg.exp_name`` (once): CRIS writes to ``output_folder/exp_name``."""
    name = getattr(cfg, "exp_name", None)
    if isinstance(name, str) and not name.endswith(suffix):
        cfg.exp_name = name + suffix
    return cfg


def patch_cris_config(suffix: str) -> None:
    """Wrap CRIS's ``utils.config`` loaders so that every config they return has the suffixed
    ``exp_name`` (after the file and after ``--opts``): checkpoints, logs and test outputs of
    this run go to ``output_folder/<exp_name><suffix>``, never into a plain CRIS run's folder."""
    try:
        config = importlib.import_module("utils.config")
    except ImportError:  # a checkout without utils/config.py (a stand-in): nothing to rename
        return
    for name in ("load_cfg_from_cfg_file", "merge_cfg_from_list"):
        original = getattr(config, name, None)
        if original is None or getattr(original, "__vlaligner_original__", None) is not None:
            continue

        def wrapped(*a: Any, __original=original, **k: Any) -> Any:
            return suffixed(__original(*a, **k), suffix)

        wrapped.__vlaligner_original__ = original  # type: ignore[attr-defined]
        wrapped.__name__ = name
        setattr(config, name, wrapped)


def build_parser() -> argparse.ArgumentParser:
    return build_runner_parser("CRIS", "CRIS.pytorch", "Projector")


def main(argv: Optional[Sequence[str]] = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    # CRIS's train.py takes no local rank: it starts one worker per GPU itself.
    raw, local_rank = normalize_local_rank(raw, host_flag=None)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise SystemExit(
            f"run_cris.py was started as one of {world} processes (WORLD_SIZE={world}), but CRIS's train.py "
            "starts one worker per visible GPU itself (torch.multiprocessing.spawn): run it once, with "
            "plain python, not under torchrun / torch.distributed.launch with several processes"
        )
    own, host_args = split_runner_argv(raw)
    args, unknown = build_parser().parse_known_args(own)
    try:
        settings = retrofit_settings(args)
    except ValueError as err:
        raise SystemExit(f"run_cris.py: {err}") from None
    if args.init_from_host is not None and Path(args.script).name != "train.py":
        raise SystemExit(
            "--init-from-host starts a training run from a CRIS checkpoint; CRIS's test.py loads "
            "<output_folder>/<exp_name>/best_model.pth strictly, so test the checkpoint that a run "
            "started with --init-from-host wrote (same retrofit options, no --init-from-host)"
        )
    if args.init_from_host is not None and not Path(args.init_from_host).expanduser().is_file():
        raise SystemExit(f"run_cris.py: --init-from-host {str(args.init_from_host)!r}: no such file")
    # a wrong --host-root is said before anything else, then a missing host dependency
    check_host_or_exit(Path(__file__).name, "CRIS", args.host_root, args.script, CRIS_LAYOUT, CRIS_DEPENDENCIES,
                       check_dependencies=not args.skip_deps_check)
    print(
        f"vlaligner: CRIS {args.script} with head {args.head}; its experiment name gets the suffix "
        f"{settings['output_suffix']!r} (outputs in <output_folder>/<exp_name>{settings['output_suffix']})"
        + (f"; local rank {local_rank} ignored (CRIS spawns its own workers)" if local_rank is not None else ""),
        flush=True,
    )
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
