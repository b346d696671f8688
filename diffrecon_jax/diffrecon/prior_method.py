"""DiffRecon's prior scored as a method of its own (`prior`): no network, only the first guesses
the two diffusion models correct (prior.py).

Stage 1 is `prior.coarse_guess` (observed coarse cells exact, hidden ones the climatology at the
level of the window's observations, per cell with `Prior.local`), stage 2 `prior.fine_base`
(the completed coarse map split by the climatology's shares of each block), with the very
`Prior` a trained DiffRecon workdir holds (prior.npz). In a results table the difference between
the `diffrecon` and `prior` columns is what the networks add on the same masks.
Deterministic: `samples` is None.
"""
from __future__ import annotations

import jax
import numpy as np

from diffrecon_jax import batching
from diffrecon_jax.diffrecon import prior as prior_lib

# Windows per compiled call: bounds host memory on large grids; one shape, one compile.
_BATCH = 256


class PriorMethod:
  """`reconstruct(view, slices)` of the prior alone (module docstring)."""

  name = "prior"
  sampler = None

  def __init__(self, prior: prior_lib.Prior, history: int):
    """prior: a fitted `prior.Prior` (a trained model's `models.prior`); history: the number of
    past slices in the stage-1 window (the model's `task.history`)."""
    self.prior = prior
    self.history = int(history)
    self.calendar_table = {"table": prior.table or "week or day (calendar rule)",
                           "chosen_by": "the trained model's prior (prior.npz)"}

    def both(obs, mask, slots):
      coarse = prior_lib.coarse_guess(prior, obs, mask, slots)
      return coarse, prior_lib.fine_base(prior, coarse, slots[:, -1])

    self._run = jax.jit(both)

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """view: evaluate.ObservedTask; slices (n,) current-slice indices, each with `history`
    slices before it -> dict(coarse (n, I, J, C), fine (n, N*I, N*J, C) float32 physical,
    samples None)."""
    slices = np.asarray(slices, np.int64)
    if slices.size and slices.min() < self.history:
      raise ValueError(f"slice {slices.min()} has too little history (needs {self.history} "
                       f"before)")
    slots = self.prior.slots(view.timestamps)
    idx = slices[:, None] + np.arange(-self.history, 1)[None, :]          # (n, t)
    # Windows (n, t): the arrays are gathered per batch, so host memory stays one batch's.
    coarse, fine = batching.run_batched(
        lambda part: self._run(view.coarse_obs_norm[part], view.mask[part], slots[part]), [idx],
        min(_BATCH, len(slices)))
    return {"coarse": view.coarse_norm.inverse(coarse).astype(np.float32),
            "fine": view.fine_norm.inverse(fine).astype(np.float32),
            "samples": None}
