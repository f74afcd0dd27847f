"""Merge-then-reinitialize for block-orthogonal layers (POET's schedule).

Every T steps each block layer folds its rotations into its frozen weight (W0 <- R_out W0 R_inᵀ), resets
them to the identity, draws fresh permutations (from a per-layer seed and the merge count, so every DDP
rank draws the same ones without communicating) and drops the optimizer state of the reset parameters
(momentum of the old rotation means nothing for the new one). The model's function is unchanged up to
rounding. Small rotations keep the Cayley–Neumann series accurate, and the fresh permutations let small
blocks reach every pair of coordinates over time.
"""
import warnings
from typing import Optional

import torch
from torch import nn

from .block import OPTBlockLinear


@torch.no_grad()
def merge_and_reset(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Merge and reset every OPTBlockLinear of ``model`` (see the module docstring); returns how many.
    Pass the optimizer so that the state of the reset parameters is cleared."""
    count = 0
    for module in model.modules():
        if isinstance(module, OPTBlockLinear):
            module.merge_and_reset(optimizer)
            count += 1
    if count == 0:
        warnings.warn("opt_fast.nn.merge_and_reset: the model has no OPTBlockLinear (block layers, "
                      "convert(..., block_size=b)); dense OPT layers have nothing to merge (stochastic ones "
                      "resample: opt_fast.nn.resample)", stacklevel=2)
    return count


class MergeSchedule:
    """Call ``step()`` after every optimizer step: every ``every`` steps it runs merge_and_reset.

        schedule = MergeSchedule(model, every=200, optimizer=opt)   # POET's default interval at b = 256
        for batch in data:
            loss(model(batch)).backward(); opt.step(); opt.zero_grad()
            schedule.step()

    Its state (the step count) goes into checkpoints with ``state_dict()`` / ``load_state_dict()``, so a
    resumed run merges at the same steps as an uninterrupted one.
    """

    def __init__(self, model: nn.Module, every: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"opt_fast.nn.MergeSchedule: every must be a positive int, got {every!r}")
        self.model, self.every, self.optimizer = model, every, optimizer
        self.steps = 0

    def step(self) -> bool:
        """Count one training step; True if it merged."""
        self.steps += 1
        if self.steps % self.every:
            return False
        merge_and_reset(self.model, self.optimizer)
        return True

    def state_dict(self):
        return {"steps": self.steps, "every": self.every}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        if "every" in state and int(state["every"]) != self.every:
            warnings.warn(f"opt_fast.nn.MergeSchedule: the checkpoint merged every {state['every']} steps, this "
                          f"schedule every {self.every} (kept): later merges fall on other steps than the "
                          f"saved run's", stacklevel=2)
