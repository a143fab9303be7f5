"""The learning-rate schedule: linear warm-up, then polynomial decay per optimizer step.

The paper decays with power 0.9 per iteration from the base rate; the from-scratch recipes
add a linear warm-up (``warmup_steps``), so that Adam's first updates on a random model do
not overshoot.
"""

from __future__ import annotations

import torch

__all__ = ["poly_lr_factor", "PolyDecay", "build_poly_scheduler"]


def poly_lr_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """The factor ``(1 - step / total_steps) ** power`` of polynomial decay, clamped at 0.

    ``step`` counts optimizer steps already taken (0 for the first update), so the first
    update uses the base learning rate and the factor reaches 0 after ``total_steps``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return max(0.0, 1.0 - step / total_steps) ** power


class PolyDecay:
    """A JSON-friendly callable for ``LambdaLR``: polynomial decay per step.

    ``LambdaLR.state_dict`` stores the ``__dict__`` of callable objects (not of functions),
    so ``total_steps`` and ``power`` travel with the scheduler's state.
    """

    def __init__(self, *, total_steps: int, power: float = 0.9, warmup_steps: int = 0) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.total_steps = int(total_steps)
        self.power = float(power)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        factor = poly_lr_factor(step, self.total_steps, self.power)
        if step < self.warmup_steps:
            factor *= (step + 1) / self.warmup_steps
        return factor


def build_poly_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, power: float = 0.9, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with polynomial decay, to be stepped once per optimizer step (per iteration)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, PolyDecay(total_steps=total_steps, power=power, warmup_steps=warmup_steps)
    )
