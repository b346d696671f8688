"""The weights of the networks' corrections over the prior in DiffRecon's point estimate
(`calibration.choose_point_weights`, `DiffReconMethod.coarse_weight` / `fine_weight`)."""
import numpy as np
import pytest

from diffrecon_jax import evaluate
from diffrecon_jax.diffrecon import calibration
from diffrecon_jax.diffrecon.prior_method import PriorMethod
from tests import _train_helpers as helpers


def _setup(pattern="random:0.4"):
  config = helpers.tiny_config()
  config.sampling.steps, config.sampling.n_samples, config.eval.batch_size = 2, 2, 8
  task = helpers.tiny_task()
  method = helpers.tiny_diffrecon(config, task)
  mask, _ = evaluate.eval_mask(task, evaluate.patterns_lib.parse_pattern(pattern), 0)
  lo, _ = task.split.range("test")
  return task, method, evaluate.observe(task, mask, pattern), np.arange(lo, lo + 10)


def test_zero_weights_give_the_prior_and_weights_keep_observed_cells_and_pooling():
  from diffrecon_jax.data import coarsen
  task, method, view, slices = _setup()
  full = method.reconstruct(view, slices)
  method.coarse_weight = method.fine_weight = 0.0
  none = method.reconstruct(view, slices)
  prior = PriorMethod(method.models.prior, task.history).reconstruct(view, slices)
  # Weight 0: exactly the prior's completion and split (what the `prior` row scores).
  np.testing.assert_allclose(none["coarse"], prior["coarse"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(none["fine"], prior["fine"], rtol=1e-5, atol=1e-4)
  assert np.abs(full["fine"] - none["fine"]).max() > 1e-3  # the networks do move it
  method.coarse_weight, method.fine_weight = 0.5, 0.5
  half = method.reconstruct(view, slices)
  observed = view.mask[slices] > 0.5
  np.testing.assert_allclose(half["coarse"][observed], full["coarse"][observed], rtol=1e-6)
  hidden = ~observed
  np.testing.assert_allclose(half["coarse"][hidden],
                             0.5 * (full["coarse"][hidden] + prior["coarse"][hidden]),
                             rtol=1e-4, atol=1e-3)
  # The weighted fine point still pools exactly to the weighted completion.
  np.testing.assert_allclose(coarsen.coarsen(half["fine"], task.scale, "sum"), half["coarse"],
                             rtol=1e-4, atol=1e-2)


def test_choice_takes_the_lowest_validation_mae_and_reads_no_test_value():
  task, method, _, _ = _setup()
  specs = ("random:0.4", "large_scale:0.25")
  got = calibration.choose_point_weights(method, task, specs, seed=0, max_slices=12)
  for stage in ("coarse", "fine"):
    maes = {float(w): m for w, m in got[stage]["val_mae"].items()}
    assert got[stage]["weight"] == min(maes, key=maes.get)
    assert len(maes) == len(calibration.WEIGHT_GRID)
  assert (method.coarse_weight, method.fine_weight) == (got["coarse"]["weight"],
                                                        got["fine"]["weight"])
  # The test split's values play no part.
  lo, hi = task.split.range("test")
  changed = task.fine_phys.copy()
  changed[lo:hi] *= 3.0
  import dataclasses
  other = dataclasses.replace(task, fine_phys=changed)
  again = calibration.choose_point_weights(method, other, specs, seed=0, max_slices=12)
  assert again["coarse"]["val_mae"] == got["coarse"]["val_mae"]
  assert again["fine"]["val_mae"] == got["fine"]["val_mae"]
