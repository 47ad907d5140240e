"""How long training runs: the epochs that follow from the data (train.min_steps).

One epoch over a small dataset is a handful of optimizer steps, too few to learn from, and a share
of them is warm-up (109 records in steps of 16 are 7 steps, 0.7 of them warm-up at warmup_ratio 0.1).
So the train stage runs at least `min_steps` optimizer steps: train.epochs, raised to the epochs that
many steps need. Early stopping on the validation loss still keeps the best evaluation's weights, so
the extra epochs cannot overfit silently. The train stage, the cost estimate and the dry run all take
the epochs from `training_length`, so what is estimated is what runs.

Torch-free on purpose: the cost estimate and the pull-request comment use it without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingLength:
    records: int
    records_per_step: int
    steps_per_epoch: int
    epochs: int          # what training runs
    asked_epochs: int    # train.epochs
    min_steps: int       # train.min_steps (0: the rule is off)

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def describe(self) -> str:
        """e.g. "109 records, batch 16: 7 steps per epoch; training 6 epochs (min_steps 40)"."""
        head = (f"{self.records} records, batch {self.records_per_step}: {self.steps_per_epoch} "
                f"step{'s' if self.steps_per_epoch != 1 else ''} per epoch; training {self.epochs} "
                f"epoch{'s' if self.epochs != 1 else ''}")
        if self.epochs > self.asked_epochs:
            return f"{head} (min_steps {self.min_steps}; train.epochs is {self.asked_epochs})"
        if self.min_steps:
            return f"{head} (train.epochs; {self.steps} steps >= min_steps {self.min_steps})"
        return f"{head} (train.epochs; min_steps off)"


def steps_per_epoch(records: int, records_per_step: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch, as stages.core.training.epoch_steps cuts it: steps of
    records_per_step records, a last step smaller than the process count merged into the one before."""
    if records <= 0:
        return 0
    steps = math.ceil(records / records_per_step)
    last = records - (steps - 1) * records_per_step
    return steps - 1 if steps > 1 and last < world_size else steps


def training_length(records: int, records_per_step: int, epochs: int, min_steps: int,
                    world_size: int = 1) -> TrainingLength:
    """train.epochs, or more when that gives fewer than min_steps optimizer steps."""
    per_epoch = steps_per_epoch(records, records_per_step, world_size)
    needed = math.ceil(min_steps / per_epoch) if min_steps and per_epoch else 0
    return TrainingLength(records, records_per_step, per_epoch, max(epochs, needed), epochs, min_steps)
