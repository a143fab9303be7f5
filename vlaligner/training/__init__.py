"""Training and evaluation of referring-segmentation models, as a package.

Each module has one job:

- ``options``: the command lines of ``train`` and ``evaluate`` (presets, checks).
- ``recipes``: the named training recipes (optimizer, lr, warm-up, clipping, loss terms).
- ``trainer``: the training loop (``Trainer``), for EAVL or any model with its call signature.
- ``evaluation``: masks, metrics and query diversity of a model over a loader.
- ``checkpoint``: training checkpoints written atomically, loaded with hash checks.
- ``outputs``: the run's output folder (files it owns) and its logs.
- ``schedule``: warm-up + polynomial decay of the learning rate.
- ``sampler``: the data order, a pure function of (seed, epoch), sharded over processes.
- ``rng``: seeds and random-generator states.
- ``distributed``: torchrun's environment and the collectives training needs.
- ``commands``: ``train_main`` / ``evaluate_main``, what the scripts and ``vlaligner`` run.

Import direction: core (``vlaligner.*`` modules) <- ``models`` <- ``training`` <- ``cli``.
"""

from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from .commands import evaluate_main, run_evaluation, train_main
from .distributed import DistEnv, unwrap_model
from .evaluation import evaluate, format_metrics_table, predict_masks
from .recipes import RECIPES, Recipe, resolve_recipe
from .sampler import ShardedSampler
from .schedule import PolyDecay, build_poly_scheduler, poly_lr_factor
from .trainer import Trainer, build_model

__all__ = [
    "Trainer",
    "build_model",
    "train_main",
    "evaluate_main",
    "run_evaluation",
    "Recipe",
    "RECIPES",
    "resolve_recipe",
    "evaluate",
    "predict_masks",
    "format_metrics_table",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "DistEnv",
    "unwrap_model",
    "ShardedSampler",
    "PolyDecay",
    "poly_lr_factor",
    "build_poly_scheduler",
]
