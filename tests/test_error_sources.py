"""Where DiffRecon's fine error comes from (`error_sources`): its per-group MAEs add up, the
prior's numbers are the prior's, and the binomial floor is the binomial's."""
import numpy as np

from diffrecon_jax import error_sources
from diffrecon_jax.diffrecon.prior_method import PriorMethod
from tests import _train_helpers as helpers


def test_imports_beside_the_other_commands():
  """Its flags are defined only when it runs as the program: importing it in one process with
  `experiments` (its own --config / --workdir) must not define a flag twice."""
  import importlib
  from absl import flags
  importlib.import_module("diffrecon_jax.experiments")  # raised DuplicateFlagError before
  assert flags.FLAGS.find_module_defining_flag("config") != "diffrecon_jax.error_sources"


def test_binomial_floor_matches_the_distribution():
  truth = np.zeros((1, 2, 2, 1))
  # Certain shares leave no noise.
  assert error_sources.binomial_floor(np.full_like(truth, 40.0), np.zeros_like(truth), truth) == 0
  assert error_sources.binomial_floor(np.full_like(truth, 40.0), np.ones_like(truth), truth) == 0
  # Binomial(100, 1/2): E|X - 50| = 3.96 (exact sum over the pmf).
  totals, shares = np.full((1, 8, 8, 1), 100.0), np.full((1, 8, 8, 1), 0.5)
  got = error_sources.binomial_floor(totals, shares, np.zeros_like(totals), draws=256)
  assert abs(got - 3.96) < 0.15, got
  # Cells without a truth do not count.
  holes = np.zeros_like(totals)
  holes[:, :4] = np.nan
  assert abs(error_sources.binomial_floor(totals, shares, holes, draws=256) - 3.96) < 0.2


def test_groups_add_up_and_zero_weights_give_the_prior():
  config = helpers.tiny_config()
  config.sampling.steps, config.sampling.n_samples, config.eval.batch_size = 2, 2, 8
  task = helpers.tiny_task()
  method = helpers.tiny_diffrecon(config, task)
  prior = PriorMethod(method.models.prior, task.history)
  lo, _ = task.split.range("val")
  slices = np.arange(lo, lo + 10)
  specs = ["fixed:0.4", "random:0.4"]
  rows = error_sources.pattern_rows(method, prior, task, specs, slices, seed=0)
  assert [r["pattern"] for r in rows] == specs
  for r in rows:
    s = r["share_under_hidden"]
    assert 0.2 < s < 0.6
    np.testing.assert_allclose(r["mae"], (1 - s) * r["mae_under_observed"]
                               + s * r["mae_under_hidden"], rtol=1e-9)
    np.testing.assert_allclose(r["prior_mae"], (1 - s) * r["prior_mae_under_observed"]
                               + s * r["prior_mae_under_hidden"], rtol=1e-9)
    assert r["mae"] != r["prior_mae"]  # the (untrained) networks move the point
  method.coarse_weight = method.fine_weight = 0.0
  for r in error_sources.pattern_rows(method, prior, task, specs, slices, seed=0):
    np.testing.assert_allclose(r["mae"], r["prior_mae"], rtol=1e-5)

  alone = error_sources.split_alone(method, task, slices)
  # The prior's split of the true coarse map, computed here from its shares directly.
  n = task.scale
  truth = task.fine_phys[slices].astype(np.float64)
  clim = method.models.prior.fine[method.models.prior.slots(task.series.timestamps)[slices]]
  blocks = lambda a: a.reshape(a.shape[0], a.shape[1] // n, n, a.shape[2] // n, n, a.shape[3])
  total = blocks(clim).sum(axis=(2, 4), keepdims=True)
  share = np.where(total > 1e-6, blocks(clim) / np.where(total > 1e-6, total, 1.0), 1 / n ** 2)
  split = (share * blocks(truth).sum(axis=(2, 4), keepdims=True)).reshape(truth.shape)
  np.testing.assert_allclose(alone["prior_mae"], np.abs(split - truth).mean(), rtol=1e-3)
  assert alone["net_weighted_mae"] == alone["prior_mae"]  # weight 0
  assert 0 < alone["binomial_floor_mae"] < alone["prior_mae"]
  text = error_sources.markdown(rows, alone, {"workdir": "W", "split": "val", "slices": 10,
                                              "seed": 0, "coarse_weight": 0.0,
                                              "fine_weight": 0.0})
  assert "| fixed:0.4 |" in text and "binomial floor" in text
