"""No evaluated method can read what the evaluation hides.

`evaluate.evaluate_method` hands a method only an `evaluate.ObservedTask`: the coarse series with
its hidden cells NaN, the mask, the external features and the train split's truth. These tests
check it from both sides: every method's reconstructions are unchanged when junk is written into
everything it must not see (`assert_no_leakage`), and the view itself holds nothing more
(`test_the_view_holds_only_what_the_contract_shows`).

A new method is covered by adding its factory (task -> method) to `METHOD_FACTORIES`.
"""
import dataclasses

import numpy as np
import pytest

from diffrecon_jax import evaluate
from diffrecon_jax.baselines import climatology, interp
from tests import _train_helpers as helpers

# name -> factory(task) -> method. A factory gets the task the evaluation scores (clean or
# poisoned), so anything a method computes when it is built must come from the train split.
METHOD_FACTORIES = [
    ("interp", lambda task: interp.InterpBaseline()),
    ("climatology", lambda task: climatology.ClimatologyBaseline()),
    ("diffrecon", lambda task: helpers.tiny_diffrecon(config=_fixed_table_config(), task=task)),
]


def _fixed_table_config():
  """The tiny DiffRecon config (3 DDIM steps, batches of 8) with its prior's calendar table
  fixed. With "auto" the table is chosen on the validation split when the model is built for
  training (tests/test_climatology_choice.py: never on the test split) and saved with the prior,
  so a trained model's table is fixed before any evaluation; here the model is rebuilt from the
  poisoned task, which a trained one never is."""
  config = helpers.tiny_config()
  config.sampling.steps = 3
  config.eval.batch_size = 8
  config.climatology.table = "week"
  return config
PATTERNS = ("random:0.4", "large_scale:0.25")
N_SLICES = 8  # test slices per evaluation (DiffRecon completes these and their history)


class Recorder:
  """Wraps a method and keeps every (view, slices, reconstruction) it was asked for."""

  def __init__(self, method):
    self.method, self.calls = method, []
    self.name, self.sampler = method.name, getattr(method, "sampler", None)

  def reconstruct(self, view, slices):
    rec = self.method.reconstruct(view, slices)
    self.calls.append((view, np.asarray(slices), rec))
    return rec


def poisoned(task, mask: np.ndarray, seed: int = 0):
  """`task` with junk (random values in [1e5, 1e6)) in every coarse cell that `mask` (T, I, J)
  hides and in every fine value, from the validation split on (physical and normalised arrays,
  and the series itself). The train split is left alone: the view shows it by contract."""
  rs = np.random.RandomState(seed)
  junk = lambda a: (1e5 + 9e5 * rs.random_sample(a.shape)).astype(a.dtype)
  v0 = task.split.val_start
  hide = np.zeros(mask.shape, bool)
  hide[v0:] = mask[v0:] == 0
  hide = np.broadcast_to(hide[..., None], task.coarse_phys.shape)
  coarse_phys, coarse = task.coarse_phys.copy(), task.coarse.copy()
  coarse_phys[hide] = junk(coarse_phys)[hide]
  coarse[hide] = junk(coarse)[hide]
  late = lambda a: np.concatenate([a[:v0], junk(a[v0:])])
  series = dataclasses.replace(task.series, values=late(task.series.values))
  return dataclasses.replace(task, series=series, coarse_phys=coarse_phys, coarse=coarse,
                             fine_phys=late(task.fine_phys), fine=late(task.fine))


def assert_no_leakage(factories, task, patterns=PATTERNS, n_slices: int = N_SLICES) -> None:
  """For every (name, factory): evaluates the method on `task` (all patterns), then for each
  pattern on `poisoned(task, that pattern's mask)` (same masks, same seeds), and asserts
  identical reconstructions, while the scores, which see the junk truth, differ."""
  masks = [evaluate.eval_mask(task, evaluate.patterns_lib.parse_pattern(p), 0)[0]
           for p in patterns]
  for name, make in factories:
    clean = Recorder(make(task))
    res_clean = evaluate.evaluate_method(task, clean, patterns, seed=0, max_slices=n_slices)
    assert len(clean.calls) == len(patterns), name
    for k, (spec, mask) in enumerate(zip(patterns, masks)):
      bad = poisoned(task, mask)
      rec = Recorder(make(bad))
      (res_bad,) = evaluate.evaluate_method(bad, rec, (spec,), seed=0, max_slices=n_slices)
      (_, slices_a, a), (_, slices_b, b) = clean.calls[k], rec.calls[0]
      np.testing.assert_array_equal(slices_a, slices_b)
      for key in ("coarse", "fine", "samples"):
        if a[key] is None:
          assert b[key] is None, (name, spec, key)
          continue
        np.testing.assert_array_equal(a[key], b[key],
                                      err_msg=f"{name} {spec}: {key} depends on hidden data")
      # The junk did reach what the evaluation scores against: the fine scores differ.
      assert res_bad["mae"] > 1e3 * res_clean[k]["mae"], (name, spec)


def test_no_method_reads_hidden_coarse_cells_or_non_train_fine_truth():
  assert_no_leakage(METHOD_FACTORIES, helpers.tiny_task())


class _Zeros:
  """Stand-in method: records its views and predicts zeros."""
  name, sampler = "zeros", None

  def __init__(self):
    self.views = []

  def reconstruct(self, view, slices):
    self.views.append(view)
    n = len(slices)
    return {"coarse": np.zeros((n,) + view.coarse_shape + (view.channels,), np.float32),
            "fine": np.zeros((n,) + view.fine_shape + (view.channels,), np.float32),
            "samples": None}


VIEW_FIELDS = {"name", "coarse_obs", "mask", "external", "timestamps", "interval_minutes",
               "scale", "aggregation", "history", "split", "coarse_norm", "fine_norm",
               "train_fine", "train_coarse", "pattern"}  # pattern: the spec, e.g. "random:0.4"


def test_the_view_holds_only_what_the_contract_shows():
  task = helpers.tiny_task()
  method = _Zeros()
  evaluate.evaluate_method(task, method, PATTERNS, seed=0, split="val", max_slices=5)
  assert len(method.views) == len(PATTERNS)
  v0 = task.split.val_start
  truth = [task.fine_phys, task.coarse_phys, task.fine, task.coarse, task.series.values]
  for spec, view in zip(PATTERNS, method.views):
    assert isinstance(view, evaluate.ObservedTask)
    assert {f.name for f in dataclasses.fields(view)} == VIEW_FIELDS
    assert view.pattern == spec  # what per-pattern calibration keys on
    mask, _ = evaluate.eval_mask(task, evaluate.patterns_lib.parse_pattern(spec), 0)
    np.testing.assert_array_equal(view.mask, mask)
    hidden = np.broadcast_to((mask == 0)[..., None], view.coarse_obs.shape)
    assert hidden.any() and np.isnan(view.coarse_obs[hidden]).all(), spec
    np.testing.assert_array_equal(view.coarse_obs[~hidden], task.coarse_phys[~hidden])
    np.testing.assert_array_equal(view.coarse_obs_norm[hidden], 0.0)
    np.testing.assert_array_equal(view.coarse_obs_norm[~hidden], task.coarse[~hidden])
    # Truth: the train split's and nothing later.
    np.testing.assert_array_equal(view.train_fine, task.fine_phys[:v0])
    np.testing.assert_array_equal(view.train_coarse, task.coarse_phys[:v0])
    for f in dataclasses.fields(view):
      a = getattr(view, f.name)
      if not isinstance(a, np.ndarray):
        continue
      # Only train_fine has fine maps, and only the train split's.
      if a.shape[1:] == task.fine_phys.shape[1:]:
        assert f.name == "train_fine" and a.shape[0] == v0, f.name
      # Copies that lead nowhere: no `.base` into the task's arrays, and read-only.
      assert not any(np.shares_memory(a, t) for t in truth), f.name
      assert not a.flags.writeable, f.name
    assert view.coarse_shape == task.coarse_shape and view.fine_shape == task.fine_shape
    assert (view.channels, view.window, view.scale) == (task.channels, task.window, task.scale)
    assert view.aggregation == task.series.aggregation and view.name == task.series.name


def test_evaluating_the_train_split_is_refused():
  with pytest.raises(ValueError, match="train split's truth"):
    evaluate.evaluate_method(helpers.tiny_task(), _Zeros(), PATTERNS, seed=0, split="train")
