"""Which calendar table the `climatology` reference and DiffRecon's prior use, chosen by data.

An analyst's first reference on periodic urban data is a calendar mean; which calendar (slot of
the day, slot of the week, or the week pulled towards the day: `climatology.TABLES`) depends on
how many training weeks there are and how different the weekdays are. Rather than a rule of
thumb, every candidate table is scored as the `climatology` reference on the VALIDATION split
under the evaluation patterns (masks drawn from the evaluation's mask seed plus
`CHOICE_SEED_OFFSET`, so even a `fixed` pattern hides other cells than in the scored evaluation)
and the one with the lowest mean fine MAE over the patterns is kept (a tie keeps the simpler,
earlier one). Only the train and validation splits are read: changing the test split changes
nothing (tests/test_climatology_choice.py). The `climatology` reference
(baselines/climatology.py) and DiffRecon's prior (diffrecon/model.py) both use the choice.

`config.climatology.table` = "auto" makes this choice; "day", "week" or "blend:k" fixes it.
"""
from __future__ import annotations

import time

import numpy as np
from absl import logging

from diffrecon_jax import evaluate as evaluate_lib
from diffrecon_jax.data import climatology as clim_lib
from diffrecon_jax.data import patterns as patterns_lib

# As the calibration's masks (calibration.CALIBRATION_SEED_OFFSET): other layouts than the test's.
CHOICE_SEED_OFFSET = 1


def validation_mae(task, table: str, pattern_specs, seed: int) -> float:
  """Mean over `pattern_specs` of the `climatology` reference's fine MAE with `table` on the
  validation split (masks from `seed`; every finite fine cell of the scored slices)."""
  slices, _ = evaluate_lib.evaluation_slices(task, "val")
  method = clim_lib.CalendarClimatology(table=table)
  maes = []
  for spec in pattern_specs:
    mask, _ = evaluate_lib.eval_mask(task, patterns_lib.parse_pattern(spec), seed)
    view = evaluate_lib.observe(task, mask)
    total, count = 0.0, 0
    for piece in evaluate_lib.contiguous_pieces(slices):
      truth = task.fine_phys[piece]
      err = np.abs(method.reconstruct(view, piece)["fine"].astype(np.float64) - truth)
      finite = np.isfinite(err)
      total += float(err[finite].sum())
      count += int(finite.sum())
    maes.append(total / max(count, 1))
  return float(np.mean(maes))


def choose_table(task, pattern_specs, seed: int, candidates=clim_lib.TABLES) -> dict:
  """The candidate with the lowest `validation_mae` -> {"table", "chosen_by", "val_mae":
  {candidate: MAE}, "patterns", "mask_seed_base", "seconds"}."""
  start = time.perf_counter()
  seed = int(seed) + CHOICE_SEED_OFFSET
  scores = {c: validation_mae(task, c, pattern_specs, seed) for c in candidates}
  best = min(candidates, key=lambda c: (scores[c], candidates.index(c)))
  out = {"table": best, "chosen_by": "validation MAE",
         "val_mae": {c: round(v, 6) for c, v in scores.items()},
         "patterns": list(pattern_specs), "mask_seed_base": seed,
         "seconds": round(time.perf_counter() - start, 1)}
  logging.info("climatology table: %s (validation MAE %s; %.1f s)", best,
               ", ".join(f"{c} {v:.4f}" for c, v in scores.items()), out["seconds"])
  return out


def resolve_table(config, task) -> dict:
  """The calendar table for `config` (`config.climatology.table`) on `task`: a fixed one as
  given, "auto" chosen on the validation split (`choose_table`), or, where the validation split
  has no slice to score, by the calendar rule (`climatology.choose_period`)."""
  spec = str(config.climatology.table)  # configs/default.py; saved configs: settings.migrate
  if spec != "auto":
    clim_lib.parse_table(spec)  # a clear error for a misspelt table
    return {"table": spec, "chosen_by": "config (climatology.table)"}
  try:
    return choose_table(task, tuple(config.patterns.eval), int(config.patterns.eval_mask_seed))
  except ValueError as err:  # no scorable validation slice (a very short series)
    n_train = int(task.split.val_start)
    period = clim_lib.choose_period(task.series.timestamps[:n_train],
                                    task.time_axis.interval_minutes)
    table = "day" if period < 7 * clim_lib.time_axis.default_slots_per_day(
        task.time_axis.interval_minutes) else "week"
    logging.warning("climatology table by the calendar rule (%s): %s", table, err)
    return {"table": table, "chosen_by": f"calendar rule (no validation choice: {err})"}

