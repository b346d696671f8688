"""The calendar table chosen by data (calendar_choice.py) and DiffRecon's prior
scored alone (prior_method.py): the blend is the week pulled towards the day by a pseudo-count,
the choice is the lowest validation MAE and never reads the test split, and the `prior` method
is the model's first guesses exactly, with observed cells kept and fine maps that pool."""
import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffrecon_jax import evaluate
from diffrecon_jax.diffrecon import prior as prior_lib
from diffrecon_jax import run
from diffrecon_jax.baselines.climatology import ClimatologyBaseline, prepare_reference
from diffrecon_jax.data import climatology as cl
from diffrecon_jax import calendar_choice as choice
from diffrecon_jax.data import coarsen, nyc_dsan, patterns, pipeline
from diffrecon_jax.diffrecon.prior_method import PriorMethod

HISTORY = 3
PATTERNS = ("fixed:0.6", "random:0.4")


def _hourly(days: int) -> np.ndarray:
  return np.datetime64("2024-01-01T00:00") + np.arange(days * 24) * np.timedelta64(60, "m")


def test_blend_lies_between_week_and_day_by_its_pseudo_count():
  ts = _hourly(14)                               # two weeks: every week slot seen twice
  rng = np.random.default_rng(0)
  x = rng.gamma(2.0, 3.0, size=(len(ts), 2, 2, 1))
  week, pw = cl.fit_climatology(x, ts, 60, "week")
  day, pd = cl.fit_climatology(x, ts, 60, "day")
  assert (pw, pd) == (168, 24)
  day_of_slot = np.tile(day, (7, 1, 1, 1))
  for k in (0.5, 2.0):
    blend, pb = cl.fit_climatology(x, ts, 60, f"blend:{k}")
    assert pb == 168
    # two values per week slot: (2 * week + k * day) / (2 + k)
    np.testing.assert_allclose(blend, (2 * week + k * day_of_slot) / (2 + k), rtol=1e-12)
  np.testing.assert_allclose(cl.fit_climatology(x, ts, 60, "blend:0")[0], week)
  np.testing.assert_allclose(cl.fit_climatology(x, ts, 60, "blend:1e9")[0], day_of_slot,
                             rtol=1e-6)


def test_week_slots_without_data_take_the_day_slot_mean():
  ts = _hourly(3)                                # Mon-Wed only: Thu-Sun week slots empty
  x = np.arange(len(ts), dtype=np.float64).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 1))
  week, _ = cl.fit_climatology(x, ts, 60, "week")
  day, _ = cl.fit_climatology(x, ts, 60, "day")
  np.testing.assert_allclose(week[3 * 24:], np.tile(day, (4, 1, 1, 1)))
  with pytest.raises(ValueError, match="blend:K"):
    cl.fit_climatology(x, ts, 60, "fortnight")
  with pytest.raises(ValueError, match="blend:K"):
    ClimatologyBaseline(table="blend:-1")


@pytest.fixture(scope="module")
def task():
  return pipeline.build_task(nyc_dsan.load_nybike(), scale=2, history=HISTORY)


def _config(table="auto"):
  c = ml_collections.ConfigDict()
  c.patterns = ml_collections.ConfigDict({"eval": PATTERNS, "eval_mask_seed": 0})
  c.climatology = ml_collections.ConfigDict({"table": table})
  return c


def test_choice_is_the_lowest_validation_mae_and_ignores_the_test_split(task):
  candidates = ("day", "week", "blend:2")
  got = choice.choose_table(task, PATTERNS, 0, candidates)
  scores = {c: choice.validation_mae(task, c, PATTERNS, 0 + choice.CHOICE_SEED_OFFSET)
            for c in candidates}
  assert got["table"] == min(scores, key=scores.get)
  assert got["val_mae"] == pytest.approx(scores, rel=1e-6)
  assert len(set(np.round(list(scores.values()), 6))) == 3   # the candidates differ
  # Scrambling the test split's truth changes nothing.
  lo, hi = task.split.range("test")
  fine, coarse = task.fine_phys.copy(), task.coarse_phys.copy()
  rng = np.random.default_rng(1)
  fine[lo:hi] = rng.permutation(fine[lo:hi].ravel()).reshape(fine[lo:hi].shape) * 3.0
  coarse[lo:hi] = coarsen.coarsen(fine[lo:hi], task.scale, task.series.aggregation)
  scrambled = dataclasses.replace(task, fine_phys=fine, coarse_phys=coarse)
  assert choice.choose_table(scrambled, PATTERNS, 0, candidates)["val_mae"] == got["val_mae"]


def test_resolve_table_fixed_auto_and_reference(task):
  assert choice.resolve_table(_config("day"), task)["table"] == "day"
  with pytest.raises(ValueError, match="blend:K"):
    choice.resolve_table(_config("weekly"), task)
  ref = ClimatologyBaseline()
  prepare_reference(ref, _config("blend:2"), task)
  assert ref.table == "blend:2" and ref.calendar_table["chosen_by"].startswith("config")
  doc = evaluate.results_document(task, ref, [{"pattern": "fixed", "missing_ratio": 0.6,
                                               "n_test_slices": 1, "seconds": 1.0,
                                               "maps_per_second": 1.0, "mae": 1.0}], 0)
  assert doc["calendar_table"]["table"] == "blend:2"
  assert "calendar table `blend:2`" in evaluate.results_markdown([doc])


def test_prior_method_is_the_models_first_guess(task):
  prior = prior_lib.fit_prior(task, local=True, table="blend:2")
  assert prior.table == "blend:2"
  method = PriorMethod(prior, HISTORY)
  mask, _ = evaluate.eval_mask(task, patterns.parse_pattern("random:0.6"), 0)
  lo, _ = task.split.range("val")
  slices = np.arange(lo + 10, lo + 40)
  view = evaluate.observe(task, mask)
  rec = method.reconstruct(view, slices)
  assert rec["samples"] is None
  idx = slices[:, None] + np.arange(-HISTORY, 1)[None, :]
  slots = prior.slots(task.series.timestamps)
  guess = prior_lib.coarse_guess(prior, jnp.asarray(view.coarse_obs_norm[idx]),
                                 jnp.asarray(view.mask[idx]), jnp.asarray(slots[idx]))
  np.testing.assert_allclose(rec["coarse"], task.coarse_norm.inverse(np.asarray(guess)),
                             rtol=1e-5, atol=1e-4)
  m = mask[slices] > 0
  np.testing.assert_allclose(rec["coarse"][m], task.coarse_phys[slices][m], rtol=1e-5,
                             atol=1e-3)
  np.testing.assert_allclose(coarsen.coarsen(rec["fine"], task.scale, task.series.aggregation),
                             rec["coarse"], rtol=1e-4, atol=1e-3)


def test_a_trained_diffrecon_is_scored_beside_its_prior():
  prior_like = type("Models", (), {"prior": type("P", (), {"table": "week"})()})()
  method = type("M", (), {"models": prior_like})()
  task_like = type("T", (), {"history": 2})()
  names = [m.name for m in run.references_for(method, task_like)]
  assert names == ["prior"] + list(run.reference_names())
  no_prior = type("M", (), {"models": type("Models", (), {"prior": None})()})()
  assert [m.name for m in run.references_for(no_prior, task_like)] == list(run.reference_names())
