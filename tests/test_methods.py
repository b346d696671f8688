"""The method interface and the one registry (methods.py), and the one padded batch runner
(batching.run_batched)."""
import jax
import numpy as np
import pytest

from diffrecon_jax import batching, experiments, methods, nofg, run
from diffrecon_jax.diffrecon import ablations
from diffrecon_jax.diffrecon import prior as prior_lib
from diffrecon_jax.diffrecon.prior_method import PriorMethod
from tests import _train_helpers as helpers


@pytest.mark.parametrize("name", methods.buildable())
def test_every_buildable_name_builds_a_method(name):
  m = methods.build(name, helpers.tiny_config())
  assert isinstance(m, methods.Method) and m.name == name
  assert m.sampler is None or isinstance(m.sampler, dict)
  # The baselines learn on the train split (fit).
  if methods.REGISTRY[name].group == "baselines":
    assert isinstance(m, methods.Trainable)


def test_references_build_without_a_config():
  for name in methods.names("references"):
    assert methods.build(name).name == name


def test_names_trained_by_diffrecon_have_a_config_and_no_builder():
  c = helpers.tiny_config()
  for name in set(methods.names()) - set(methods.buildable()):
    cfg = methods.method_config(c, name)
    assert cfg.method in (methods.MAIN, methods.PRIOR)
    assert ablations.method_name(cfg) in (name, methods.MAIN) or name == methods.PRIOR
    with pytest.raises(ValueError, match=f"unknown method {name!r}"):
      methods.build(name, c)


def test_ablation_names_come_from_ablations():
  got = set(methods.names("ablations"))
  want = {f"diffrecon-{a}" for a in ablations.ABLATIONS if a != "noFG"}
  want |= {f"diffc-{n}" for n in methods.NOFG_NETWORKS}
  assert got == want


def test_experiments_and_run_accept_exactly_the_registered_names(tmp_path):
  assert experiments.parse_methods("all") == list(methods.names())
  for group in methods.GROUPS:
    assert set(methods.names(group)) <= set(experiments.parse_methods(group))
  with pytest.raises(ValueError, match="unknown method or group"):
    experiments.parse_methods("vdsr")
  c = helpers.tiny_config()
  # run: DiffRecon, or a method built from the config (nothing to train: refused before data).
  for name in methods.buildable():
    c.method = name
    with pytest.raises(ValueError, match="nothing to train"):
      run.run(c, str(tmp_path / name), "train")
  for name in set(methods.names()) - set(methods.buildable()) - {methods.MAIN}:
    c.method = name
    with pytest.raises(ValueError, match="unknown method"):
      run.run(c, str(tmp_path / "x"), "evaluate")


def test_model_methods_satisfy_the_protocol():
  task = helpers.tiny_task()
  dr = helpers.tiny_diffrecon(task=task)
  assert isinstance(dr, methods.Method)
  assert isinstance(PriorMethod(prior_lib.fit_prior(task), task.history), methods.Method)
  fine = methods.build("srcnn", helpers.tiny_config())
  assert isinstance(nofg.DiffCThenFine(dr, fine, "diffc-srcnn"), methods.Method)


def test_run_batched_pads_with_the_last_row_and_cuts_the_padding():
  x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
  seen = []

  def double(a):
    seen.append(a.copy())
    return a * 2

  (out,) = batching.run_batched(double, [x], 4)
  np.testing.assert_array_equal(out, x * 2)
  assert [s.shape[0] for s in seen] == [4, 4, 4]
  np.testing.assert_array_equal(seen[-1], x[[8, 9, 9, 9]])


def test_run_batched_keys_do_not_depend_on_the_workers():
  x = np.arange(10, dtype=np.float32)[:, None]
  # (3, B): the batch on axis 1, as a sampler's (S, B, ...) samples.
  fn = lambda a, key: jax.random.uniform(key, (3, 1)) + a[:, 0][None]
  key = jax.random.PRNGKey(0)
  (one,) = batching.run_batched(fn, [x], 4, rng=key, out_axis=1)
  (two,) = batching.run_batched(fn, [x], 4, rng=key, out_axis=1, workers=2, first_alone=False)
  assert one.shape == (3, 10)
  np.testing.assert_array_equal(one, two)
  want = np.asarray(jax.random.uniform(jax.random.fold_in(key, 2), (3, 1))) + x[8:, 0][None]
  np.testing.assert_array_equal(one[:, 8:], want)
