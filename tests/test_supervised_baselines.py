"""The deterministic super-resolution baselines (SRCNN, SRResNet, UrbanFM, FODE, STCF) and their
shared loop."""
import json

import jax
import numpy as np
import pytest

from diffrecon_jax import evaluate, run
from diffrecon_jax.baselines import fode, srcnn, srresnet, stcf, supervised, urbanfm
from diffrecon_jax.data import coarsen
from tests import _train_helpers as helpers
from tests import test_leakage


def tiny_config(method: str = "srcnn", steps: int = 3):
  """The tiny embedded nytaxi task with the smallest networks and a few steps."""
  c = helpers.tiny_config()
  c.method = method
  c.patterns.eval = ("random:0.4", "large_scale:0.25")
  b = c.baselines
  b.steps, b.batch_size, b.log_every = steps, 8, 0
  b.srcnn_features = (8, 4)
  b.srresnet_features, b.srresnet_blocks = 8, 1
  b.urbanfm_features, b.urbanfm_blocks = 8, 1
  b.fode_features, b.fode_ode_steps = 8, 1
  b.stcf_features, b.stcf_blocks, b.stcf_encoder_features, b.stcf_pretrain_steps = 8, 1, 4, 3
  return c


def _view(task, ratio: float = 0.4, seed: int = 0):
  rng = np.random.default_rng(seed)
  mask = (rng.random(task.coarse_valid.shape) > ratio).astype(np.float32)
  return evaluate.observe(task, mask)


@pytest.mark.parametrize("name", supervised.NETWORKS)
def test_reconstruction_shapes_and_observed_cells(name):
  task = helpers.tiny_task()
  view = _view(task)
  method = supervised.build(name, tiny_config(name))
  slices = np.arange(task.split.val_start, task.split.val_start + 5)
  rec = method.reconstruct(view, slices)
  (i, j), (h, w), c = task.coarse_shape, task.fine_shape, task.channels
  assert rec["coarse"].shape == (5, i, j, c) and rec["fine"].shape == (5, h, w, c)
  assert rec["samples"] is None and rec["fine"].dtype == np.float32
  assert np.isfinite(rec["fine"]).all()
  obs = view.mask[slices] > 0
  np.testing.assert_array_equal(rec["coarse"][obs], task.coarse_phys[slices][obs])
  assert method.losses.shape == (3,)


def test_networks_map_coarse_to_fine_shapes():
  x = np.zeros((2, 4, 3, 2), np.float32)
  ext = np.zeros((2, 5), np.float32)
  nets = [srcnn.SRCNN(3, 2, (8, 4)), srresnet.SRResNet(3, 2, 8, 1),
          urbanfm.UrbanFM(3, 2, (0., 0.), (1., 1.), (0., 0.), (1., 1.), "sum", 8, 1),
          fode.FODE(3, 2, (0., 0.), (1., 1.), (0., 0.), (1., 1.), "sum", 8, ode_steps=2),
          stcf.STCF(3, 2, (0., 0.), (1., 1.), (0., 0.), (1., 1.), "sum", 8, 1,
                    encoder_features=4)]
  for net in nets:
    params = net.init(jax.random.PRNGKey(0), x, ext)
    assert net.apply(params, x, ext).shape == (2, 12, 9, 2), type(net).__name__


@pytest.mark.parametrize("name", supervised.NETWORKS)
def test_training_lowers_the_loss(name):
  c = tiny_config(name, steps=60)
  method = supervised.build(name, c)
  method.fit(_view(helpers.tiny_task()))
  first, last = method.losses[:5].mean(), method.losses[-10:].mean()
  assert last < 0.7 * first, (name, first, last)


def _perturbed(params, seed: int = 3, scale: float = 0.1):
  """params plus Gaussian noise: no zero-initialised layer left (FODE's field starts at zero)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
      tree, [a + scale * rs.standard_normal(a.shape).astype(np.float32) for a in leaves])


# The networks with UrbanFM's frame (its N^2-Normalization): class and extra arguments.
FRAMED = {"urbanfm": (urbanfm.UrbanFM, {}), "fode": (fode.FODE, {"ode_steps": 2}),
          "stcf": (stcf.STCF, {"encoder_features": 4})}


@pytest.mark.parametrize("name", sorted(FRAMED))
@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_urbanfm_fine_maps_pool_exactly_to_the_coarse_input(aggregation, name):
  rs = np.random.RandomState(0)
  coarse = (rs.random_sample((3, 4, 3, 2)) * 50 + 1).astype(np.float32)
  cm, cs, fm, fs = (20., 5.), (9., 3.), (4., 1.), (2., 0.5)
  cls, extra = FRAMED[name]
  net = cls(2, 2, cm, cs, fm, fs, aggregation, 8, 1, **extra)
  x = (coarse - np.asarray(cm, np.float32)) / np.asarray(cs, np.float32)
  ext = rs.random_sample((3, 5)).astype(np.float32)
  params = _perturbed(net.init(jax.random.PRNGKey(1), x, ext))
  fine = np.asarray(net.apply(params, x, ext)) * np.asarray(fs) + np.asarray(fm)
  np.testing.assert_allclose(coarsen.coarsen(fine, 2, aggregation), coarse, rtol=1e-5)
  # Not a trivial split: the shares differ inside a block.
  assert np.ptp(fine[0, :2, :2, 0]) > 1e-3


@pytest.mark.parametrize("name", sorted(FRAMED))
def test_urbanfm_reconstruction_pools_to_the_completed_coarse_map(name):
  task = helpers.tiny_task()
  rec = supervised.build(name, tiny_config(name)).reconstruct(
      _view(task), np.arange(task.split.val_start, task.split.val_start + 6))
  np.testing.assert_allclose(coarsen.coarsen(rec["fine"], task.scale, task.series.aggregation),
                             rec["coarse"], rtol=1e-4, atol=1e-3)


def test_never_reads_hidden_values():
  factories = [(n, lambda task, n=n: supervised.build(n, tiny_config(n)))
               for n in supervised.NETWORKS]
  test_leakage.assert_no_leakage(factories, helpers.tiny_task())


def test_unknown_network_is_refused():
  with pytest.raises(ValueError, match="unknown supervised baseline"):
    supervised.build("vdsr", tiny_config())


def test_evaluate_mode_trains_then_scores(tmp_path):
  c = tiny_config("srcnn", steps=5)
  c.eval.max_slices = 6
  with pytest.raises(ValueError, match="use --mode=evaluate"):
    run.run(c, str(tmp_path), mode="train")
  (doc,) = run.run(c, str(tmp_path), mode="evaluate")
  assert doc["method"] == "srcnn"
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["pattern"] for r in saved["results"]] == ["random", "large_scale"]
  assert all(np.isfinite(r["mae"]) for r in saved["results"])
