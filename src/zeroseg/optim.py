"""Learning-rate schedules used by the papers' recipes."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupPolyLR", "warmup_poly_factor"]


def warmup_poly_factor(
    step: int, total_steps: int, power: float, warmup_steps: int = 0, warmup_ratio: float = 1e-6, min_lr_ratio: float = 0.0
) -> float:
    """LR factor of mmseg's poly schedule with linear warm-up (the SegFormer / ZegCLIP recipes).

    ``poly = (1 - min_lr_ratio) * (1 - step / total_steps) ** power + min_lr_ratio``; during the
    first ``warmup_steps`` the factor is scaled by ``1 - (1 - step / warmup_steps) * (1 - warmup_ratio)``.
    """
    progress = min(step, total_steps) / max(total_steps, 1)
    factor = (1.0 - min_lr_ratio) * (1.0 - progress) ** power + min_lr_ratio
    if step < warmup_steps:
        factor *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return factor


class WarmupPolyLR(LambdaLR):
    """Poly decay over ``total_steps`` optimizer steps with an optional linear warm-up.

    Args:
        optimizer: the optimizer (Hydra completes this partial in ``configure_optimizers``).
        total_steps: steps of the whole schedule (``${trainer.max_steps}``).
        power: poly exponent (SegFormer 1.0, ZegCLIP 0.9).
        warmup_steps: linear warm-up length (SegFormer 1500; 0 for none).
        warmup_ratio: LR factor at step 0 of the warm-up.
        min_lr_ratio: final LR as a fraction of the base LR.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        power: float = 1.0,
        warmup_steps: int = 0,
        warmup_ratio: float = 1e-6,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"scheduler total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.power = total_steps, power
        self.warmup_steps, self.warmup_ratio, self.min_lr_ratio = warmup_steps, warmup_ratio, min_lr_ratio
        super().__init__(
            optimizer, lambda step: warmup_poly_factor(step, total_steps, power, warmup_steps, warmup_ratio, min_lr_ratio)
        )
