"""Which examples each training step reads: shuffled epochs, sharded over ranks, resumable exactly.

Every training stage (pre-training windows, SFT rows, draft distillation) draws its batches
from one `EpochSampler`, so they agree on what an epoch, a resume and a data-parallel step mean:
- each epoch visits the examples in an order fixed by (seed, epoch), so the state is just
  (epoch, cursor) and a resumed run reads exactly what an uninterrupted one would;
- a global step takes `world * batch_size` examples of that order and rank r reads the r-th
  slice of them, so ranks never share an example within an epoch;
- an epoch ends when fewer than a whole global step remain (the tail waits for a later
  epoch's order rather than mixing two epochs in one step).
"""

from __future__ import annotations

import numpy as np

from athanor.errors import AthanorError


class EpochSampler:
    """`fit_batch` shrinks the batch to what one epoch holds per rank (a small fine-tuning set
    still trains); without it, or with fewer examples than ranks, too little data is an error."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 what: str = "examples", fit_batch: bool = False) -> None:
        if fit_batch and n >= world:
            batch_size = min(batch_size, n // world)
        if n < batch_size * world:
            raise AthanorError(f"only {n} {what}: too few for one step of {batch_size} per rank x {world} "
                               f"rank(s); lower the batch size (or the example length) or add data")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """This rank's `batch_size` example indices for the next step."""
        step = self.batch_size * self.world
        if self.cursor + step > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * self.batch_size
        self.cursor += step
        return self._permutation()[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
