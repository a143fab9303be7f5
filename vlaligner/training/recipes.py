"""Named training recipes: how a model is optimised, chosen per situation.

A recipe is the optimiser, its learning rate and weight decay, the warm-up and decay of the
learning rate, gradient clipping, the loss terms and the foreground prior of the mask bias.
The paper fine-tunes pretrained encoders with a small learning rate; a small model that starts
from random weights needs another recipe entirely (measured: docs/training.md, "Recipes").

- ``paper-finetune``: the paper's recipe for Swin-B + BERT-base (Adam, lr 5e-5, poly decay
  0.9 per iteration, BCE only).
- ``scratch-small``: the from-scratch recipe of the tiny model (AdamW lr 5e-4, weight decay
  0.01, 200 warm-up steps, poly decay, gradient norm clipped at 1, BCE + soft Dice (weight 1)
  taken at the input size, mask bias at the foreground prior, and the loader's horizontal
  flip that swaps "left" / "right" in the sentence). Dice pulls the foreground in from the
  first hundred steps, where BCE alone first learns "background everywhere"; with the flip
  the tiny default reached 71.01 ± 0.67 val mIoU over 3 seeds against 69.49 ± 1.79 without
  (docs/training.md, "The tiny default").
- ``demo``: the ten-minute CPU demo's recipe, under the name it has always recorded: the same
  fields as ``scratch-small`` since the demo took the flip too (it had added Dice to
  ``scratch-small`` before ``scratch-small`` took it; docs/training.md, "The demo at two
  threads").
- ``adam-poly``: Adam at lr 1e-3 with polynomial decay, no warm-up, clipping or weight decay,
  BCE only: the hosts' own optimisation (VLT's learning rate), the default of
  ``adapters/vlt/train_vlt.py`` and the recipe of ``benchmarks/retrofit.py``.

``resolve_recipe`` picks the default for a model (``paper-finetune`` for Swin-B,
``scratch-small`` for the tiny model), or the one named by ``--recipe``, and applies the
options given explicitly on the command line on top of it. Every run prints the resolved recipe
and records it in its checkpoints' ``training_state.json`` and in ``run_config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

__all__ = ["Recipe", "RECIPES", "DEFAULT_RECIPE", "resolve_recipe", "RECIPE_FIELDS"]


@dataclass(frozen=True)
class Recipe:
    """One way to optimise a model.

    Attributes:
        name: the recipe's name (``custom`` suffix when options overrode it).
        optimizer: ``adam`` or ``adamw`` (decoupled weight decay).
        lr: base learning rate.
        weight_decay: weight decay (L2 for Adam, decoupled for AdamW).
        warmup_steps: optimizer steps of linear warm-up from lr / warmup_steps.
        poly_power: power of the polynomial decay per optimizer step (0.9).
        clip_grad: clip the global gradient norm to this (0: off).
        dice_weight: weight of a soft Dice term added to the BCE (0: BCE only, as the paper).
        mask_bias_init: initial mask logit of a model built from scratch (a foreground prior),
            or None to keep the builder's default. Not applied to ``--init-from`` / ``--resume``.
        upsample_logits: take the loss at the input size, the stride-4 logits upsampled
            bilinearly as the evaluation reads them (True), or on the logits' grid with the
            target resized by nearest sampling, as CRIS (False; half a cell off: see
            :func:`vlaligner.losses.mask_bce_loss`).
        augment: the training loader's random horizontal flip (p = 0.5) that also swaps
            "left" and "right" in the sentence (:class:`~vlaligner.data.RefDataset`'s
            ``augment``).
    """

    name: str
    optimizer: str
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    poly_power: float = 0.9
    clip_grad: float = 0.0
    dice_weight: float = 0.0
    mask_bias_init: Optional[float] = None
    upsample_logits: bool = False
    augment: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"recipe {self.name!r}: optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"recipe {self.name!r}: lr must be positive, got {self.lr}")
        for key in ("weight_decay", "warmup_steps", "clip_grad", "dice_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe {self.name!r}: {key} must be >= 0, got {getattr(self, key)}")
        if not self.poly_power >= 0:
            raise ValueError(f"recipe {self.name!r}: poly_power must be >= 0, got {self.poly_power}")

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for the log: every field."""
        parts = [f"{self.optimizer} lr {self.lr:g}"]
        if self.weight_decay:
            parts.append(f"weight decay {self.weight_decay:g}")
        parts.append(f"{self.warmup_steps} warm-up steps" if self.warmup_steps else "no warm-up")
        parts.append(f"poly {self.poly_power:g}")
        parts.append(f"clip {self.clip_grad:g}" if self.clip_grad else "no clipping")
        parts.append("BCE" + (f" + {self.dice_weight:g} Dice" if self.dice_weight else "")
                     + (" at the input size" if self.upsample_logits else " on the logits' grid"))
        if self.mask_bias_init is not None:
            parts.append(f"mask bias {self.mask_bias_init:g}")
        parts.append("flip with left/right swap" if self.augment else "no augmentation")
        return f"recipe {self.name}: " + ", ".join(parts)


#: The named recipes.
RECIPES: Dict[str, Recipe] = {
    "paper-finetune": Recipe(name="paper-finetune", optimizer="adam", lr=5e-5),
    "scratch-small": Recipe(
        name="scratch-small", optimizer="adamw", lr=5e-4, weight_decay=0.01, warmup_steps=200,
        clip_grad=1.0, dice_weight=1.0, mask_bias_init=-2.2, upsample_logits=True, augment=True,
    ),
    "demo": Recipe(
        name="demo", optimizer="adamw", lr=5e-4, weight_decay=0.01, warmup_steps=200,
        clip_grad=1.0, dice_weight=1.0, mask_bias_init=-2.2, upsample_logits=True, augment=True,
    ),
    "adam-poly": Recipe(name="adam-poly", optimizer="adam", lr=1e-3),
}

#: The recipe a model gets when ``--recipe`` is not given.
DEFAULT_RECIPE: Dict[str, str] = {"swin-b": "paper-finetune", "tiny": "scratch-small"}

#: Recipe fields that have a command-line option of the same name (``--lr``, ``--clip-grad``, ...).
RECIPE_FIELDS = (
    "optimizer", "lr", "weight_decay", "warmup_steps", "poly_power", "clip_grad", "dice_weight", "mask_bias_init",
    "upsample_logits", "augment",
)


def resolve_recipe(model: str, name: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Recipe:
    """The recipe for ``model`` (``swin-b`` or ``tiny``): ``name`` or the model's default, with
    ``overrides`` (fields given explicitly; None values are ignored) applied on top.

    Raises:
        ValueError: unknown recipe or model, unknown field, or a value the recipe refuses.
    """
    if name is None:
        if model not in DEFAULT_RECIPE:
            raise ValueError(f"no default recipe for model {model!r}; expected one of {sorted(DEFAULT_RECIPE)}")
        name = DEFAULT_RECIPE[model]
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    changes = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    unknown = sorted(set(changes) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(f"unknown recipe fields {unknown}; expected some of {list(RECIPE_FIELDS)}")
    changes = {k: v for k, v in changes.items() if getattr(recipe, k) != v}
    if changes:
        recipe = dataclasses.replace(recipe, name=f"{name}+custom", **changes)
    return recipe
