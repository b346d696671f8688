"""What FODE and STCF add to UrbanFM's frame: the neural-ODE block (fode.py) and the contrastive
pre-training of the encoders (stcf.py). Shapes, loss decrease and the N^2 constraint of both are
in test_supervised_baselines.py, with the other networks of the shared loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.baselines import fode, stcf, supervised
from tests import _train_helpers as helpers
from tests import test_supervised_baselines as sb

FRAME = (2, 2, (0., 0.), (1., 1.), (0., 0.), (1., 1.), "sum")


def _inputs(n: int = 3, seed: int = 0):
  rs = np.random.RandomState(seed)
  return (rs.standard_normal((n, 4, 3, 2)).astype(np.float32),
          rs.random_sample((n, 5)).astype(np.float32))


def test_rk4_solves_a_linear_ode_to_fourth_order():
  # dh/dtau = -2 h: h(1) = h0 exp(-2); RK4's error shrinks ~16x per halving of the step.
  h0 = jnp.ones((2, 3))
  errs = [float(jnp.abs(fode.rk4_solve(lambda h, t: -2.0 * h, h0, s) - np.exp(-2.0)).max())
          for s in (2, 4, 8)]
  assert errs[0] < 1e-2 and errs[1] < errs[0] / 10 and errs[2] < errs[1] / 10, errs
  with pytest.raises(ValueError, match="ode_steps"):
    fode.rk4_solve(lambda h, t: h, h0, 0)


def test_fode_block_starts_as_the_identity_and_its_steps_share_one_field():
  x, ext = _inputs()
  params = {s: fode.FODE(*FRAME, 8, ode_steps=s).init(jax.random.PRNGKey(0), x, ext)
            for s in (1, 4)}
  shapes = lambda p: jax.tree_util.tree_map(jnp.shape, p)
  # One set of parameters whatever the grid: an ODE, not a deeper network.
  assert shapes(params[1]) == shapes(params[4])
  assert "ode_field" in params[1]["params"]
  # The field's output layers start at zero: at init the solver steps change nothing.
  out = [fode.FODE(*FRAME, 8, ode_steps=s).apply(params[1], x, ext) for s in (1, 4)]
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_fode_solver_grid_matters_and_converges():
  x, ext = _inputs()
  params = sb._perturbed(fode.FODE(*FRAME, 8, ode_steps=1).init(jax.random.PRNGKey(0), x, ext),
                         scale=0.3)
  out = {s: np.asarray(fode.FODE(*FRAME, 8, ode_steps=s).apply(params, x, ext))
         for s in (1, 2, 8, 16)}
  coarse_gap, fine_gap = np.abs(out[1] - out[2]).max(), np.abs(out[8] - out[16]).max()
  assert coarse_gap > 1e-4, coarse_gap  # the block is not trivial: the grid changes the output
  assert fine_gap < coarse_gap / 10, (coarse_gap, fine_gap)  # and it converges as it refines


def test_fode_refuses_an_odd_width():
  x, ext = _inputs()
  with pytest.raises(ValueError, match="features must be even"):
    fode.FODE(*FRAME, 7).init(jax.random.PRNGKey(0), x, ext)


def test_info_nce_rewards_matching_rows():
  rs = np.random.RandomState(0)
  z = rs.standard_normal((6, 8)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  matched = float(stcf.info_nce(z, z, 0.1))
  shuffled = float(stcf.info_nce(z, z[::-1], 0.1))
  assert matched < 0.1 < np.log(6) < shuffled, (matched, shuffled)


@pytest.mark.parametrize("task", ["spatial", "temporal"])
def test_contrastive_pretraining_lowers_its_loss(task):
  task_ = helpers.tiny_task()
  x = np.nan_to_num(task_.coarse_norm.apply(task_.coarse_phys[:task_.split.val_start]))
  x = np.concatenate([x, x]).astype(np.float32)  # two stacks of consecutive slices
  params, losses = stcf.pretrain_encoder(task, x, 2, features=8, steps=80, batch_size=16,
                                         lr=3e-3, temperature=0.2, seed=0)
  assert losses.shape == (80,) and np.isfinite(losses).all()
  # Neighbouring slices look alike: the temporal task stays hard, its loss falls less.
  assert losses[-10:].mean() < 0.85 * losses[:5].mean(), (losses[:5], losses[-10:])
  assert set(params["params"]) == {"Conv_0", "_ResBlock_0", "_ResBlock_1"}


def test_pretraining_refuses_stacks_it_cannot_pair():
  x = np.zeros((5, 4, 3, 2), np.float32)
  with pytest.raises(ValueError, match="stacks"):
    stcf.pretrain_encoder("temporal", x, 2, features=4, steps=1, batch_size=2, lr=1e-3,
                          temperature=0.1, seed=0)
  with pytest.raises(ValueError, match="task"):
    stcf.pretrain_encoder("spectral", x, 1, features=4, steps=1, batch_size=2, lr=1e-3,
                          temperature=0.1, seed=0)


def test_pretrainer_writes_both_encoders_and_nothing_else():
  x, ext = _inputs(n=6)
  net = stcf.STCF(*FRAME, 8, 1, encoder_features=4)
  init = net.init(jax.random.PRNGKey(0), x, ext)
  pre = stcf.Pretrainer(features=4, steps=3, batch_size=4, lr=1e-2, temperature=0.1, seed=0)
  out = pre(init, x, 2)
  for name in init["params"]:
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), init["params"][name], out["params"][name]))
    assert same == (name not in ("spatial_encoder", "temporal_encoder")), name
  assert set(pre.losses) == {"spatial", "temporal"} and pre.losses["spatial"].shape == (3,)
  net.apply(out, x, ext)  # the written parameters fit the network
  wide = stcf.Pretrainer(features=8, steps=1, batch_size=4, lr=1e-2, temperature=0.1, seed=0)
  with pytest.raises(ValueError, match="encoder_features"):
    wide(init, x, 2)


def test_stcf_baseline_pretrains_before_fine_tuning():
  c = sb.tiny_config("stcf", steps=3)
  method = supervised.build("stcf", c)
  method.fit(sb._view(helpers.tiny_task()))
  assert set(method.pretrain.losses) == {"spatial", "temporal"}
  assert method.pretrain.losses["temporal"].shape == (c.baselines.stcf_pretrain_steps,)
  # Fine-tuning starts from the pre-trained encoders, not from a fresh initialisation.
  c0 = sb.tiny_config("stcf", steps=3)
  c0.baselines.stcf_pretrain_steps = 0
  fresh = supervised.build("stcf", c0)
  fresh.pretrain = None
  fresh.fit(sb._view(helpers.tiny_task()))
  enc = lambda m: m.params["params"]["spatial_encoder"]["Conv_0"]["kernel"]
  assert not np.allclose(enc(method), enc(fresh))
