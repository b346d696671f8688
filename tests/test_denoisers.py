"""Tests for diffrecon_jax.diffrecon.denoisers (Diffusion-C and Diffusion-F noise predictors)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffrecon_jax.models import diffusion
from diffrecon_jax.diffrecon.denoisers import DiffusionCNet, DiffusionFNet
from tests.test_unet import numpy_init

TINY_C = dict(base_channels=8, emb_dim=16, d_model=16, num_heads=2, num_layers=1, ff_dim=16,
              inter_dim=8)
TINY_F = dict(base_channels=8, emb_dim=16, d_model=8, d_ff=8, top_k=2, num_blocks=1,
              num_kernels=2, encoder_channels=2, inter_dim=8)
# numeric tests compile: one U-Net level halves the compile time (shape tests cover two levels)
ONE_LEVEL = dict(channel_mults=(1,))
# (t, I, J, C, N, F external or 0)
COMBOS = [(4, 8, 6, 2, 2, 5), (3, 7, 4, 1, 2, 0), (2, 6, 12, 1, 4, 3), (3, 14, 8, 3, 2, 3)]


def c_inputs(rs, b, t, i, j, c, f):
  mask = (rs.rand(b, t, i, j) < 0.6).astype(np.float32)
  obs = rs.normal(size=(b, t, i, j, c)).astype(np.float32) * mask[..., None]
  cond = {"obs": jnp.asarray(obs), "mask": jnp.asarray(mask),
          "external": jnp.asarray(rs.normal(size=(b, t, f)), jnp.float32) if f else None}
  return jnp.asarray(rs.normal(size=(b, i, j, c)), jnp.float32), cond


def f_inputs(rs, b, t, i, j, c, n, f):
  cond = {"coarse": jnp.asarray(rs.normal(size=(b, t, i, j, c)), jnp.float32),
          "external": jnp.asarray(rs.normal(size=(b, t, f)), jnp.float32) if f else None}
  return jnp.asarray(rs.normal(size=(b, n * i, n * j, c)), jnp.float32), cond


def abstract(tree):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.mark.parametrize("t,i,j,c,n,f", COMBOS)
@pytest.mark.parametrize("use_inter", [True, False])
def test_output_shapes(t, i, j, c, n, f, use_inter):
  # eval_shape: traces init and apply without compiling, so every combination is cheap.
  rs = np.random.RandomState(0)
  tau = jnp.zeros((2,), jnp.int32)
  x, cond = c_inputs(rs, 2, t, i, j, c, f)
  cnet = DiffusionCNet(use_inter=use_inter, **TINY_C)
  p = jax.eval_shape(lambda: cnet.init(jax.random.key(0), x, tau, cond))
  assert jax.eval_shape(cnet.apply, p, abstract(x), tau, abstract(cond)).shape == (2, i, j, c)
  assert ("STPointFormer_0" in p["params"]) == use_inter
  xf, condf = f_inputs(rs, 2, t, i, j, c, n, f)
  fnet = DiffusionFNet(scale=n, use_inter=use_inter, **TINY_F)
  p = jax.eval_shape(lambda: fnet.init(jax.random.key(0), xf, tau, condf))
  out = jax.eval_shape(fnet.apply, p, abstract(xf), tau, abstract(condf))
  assert out.shape == (2, n * i, n * j, c)
  assert ("TPatternNet_0" in p["params"]) == use_inter


def test_cnet_numeric_history_reaches_output_and_compiles_once():
  """Changing a history slice changes eps_hat only through the ST-PointFormer branch."""
  rs = np.random.RandomState(1)
  t, i, j, c = 3, 7, 4, 2
  x, cond = c_inputs(rs, 2, t, i, j, c, 4)
  tau = jnp.array([3, 40], jnp.int32)
  history_changed = dict(cond, obs=cond["obs"].at[:, 0].add(1.0))
  for use_inter in (True, False):
    net = DiffusionCNet(use_inter=use_inter, **TINY_C, **ONE_LEVEL)
    params = numpy_init(net, x, tau, cond)
    apply = jax.jit(chex.assert_max_traces(lambda *a: net.apply(*a), n=1))
    chex.clear_trace_counter()
    y = apply(params, x, tau, cond)
    chex.assert_shape(y, (2, i, j, c))
    chex.assert_tree_all_finite(y)
    y_hist = apply(params, x, tau, history_changed)  # new data, same shapes: no retrace
    y_tau = apply(params, x, tau + 5, cond)
    # the step must matter clearly, also when GroupNorm groups hold one channel (8 of 8 here)
    assert float(jnp.max(jnp.abs(y - y_tau))) > 1e-3
    moved = float(jnp.max(jnp.abs(y - y_hist)))
    assert (moved > 1e-5) if use_inter else (moved == 0.0)


def test_fnet_numeric_history_reaches_output():
  rs = np.random.RandomState(2)
  t, i, j, c, n = 4, 3, 2, 1, 2
  x, cond = f_inputs(rs, 2, t, i, j, c, n, 3)
  tau = jnp.array([0, 9], jnp.int32)
  net = DiffusionFNet(scale=n, **TINY_F, **ONE_LEVEL)
  params = numpy_init(net, x, tau, cond)
  apply = jax.jit(net.apply)
  y = apply(params, x, tau, cond)
  chex.assert_shape(y, (2, n * i, n * j, c))
  chex.assert_tree_all_finite(y)
  history_changed = dict(cond, coarse=cond["coarse"].at[:, 0].add(1.0))
  assert float(jnp.max(jnp.abs(y - apply(params, x, tau, history_changed)))) > 1e-5
  # the current coarse slice also conditions the U-Net directly (upsampled input channels)
  no_encoder = DiffusionFNet(scale=n, use_inter=False, **TINY_F, **ONE_LEVEL)
  p2 = numpy_init(no_encoder, x, tau, cond)
  apply2 = jax.jit(no_encoder.apply)
  y2 = apply2(p2, x, tau, cond)
  current_changed = dict(cond, coarse=cond["coarse"].at[:, -1].add(1.0))
  assert float(jnp.max(jnp.abs(y2 - apply2(p2, x, tau, current_changed)))) > 1e-5
  # ablation: without T-PatternNet the history is ignored
  assert float(jnp.max(jnp.abs(y2 - apply2(p2, x, tau, history_changed)))) == 0.0


def test_bad_shapes_raise():
  rs = np.random.RandomState(0)
  x, cond = c_inputs(rs, 2, 3, 8, 6, 2, 0)
  tau = jnp.zeros((2,), jnp.int32)
  net = DiffusionCNet(**TINY_C)
  with pytest.raises(ValueError, match="x_tau"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x[..., :1], tau, cond))
  with pytest.raises(ValueError, match="mask"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x, tau, dict(cond, mask=cond["mask"][0])))
  with pytest.raises(ValueError, match="obs"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x, tau, {"mask": cond["mask"]}))
  xf, condf = f_inputs(rs, 2, 3, 4, 4, 1, 2, 0)
  with pytest.raises(ValueError, match="N=3"):
    jax.eval_shape(lambda: DiffusionFNet(scale=3, **TINY_F).init(jax.random.key(0), xf, tau,
                                                                  condf))


def test_tiny_diffusion_c_overfits_a_fixed_batch():
  """Fixed (x0, tau, noise): the epsilon loss must fall by at least an order of magnitude."""
  rs = np.random.RandomState(3)
  b, t, i, j, c = 4, 3, 8, 6, 2
  x0, cond = c_inputs(rs, b, t, i, j, c, 3)
  sched = diffusion.make_schedule("quad", 50)
  tau = jnp.array([2, 10, 25, 45], jnp.int32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_tau = diffusion.q_sample(sched, x0, tau, noise)
  # normalisation gradients compile slowly on CPU: one U-Net level keeps this test short
  net = DiffusionCNet(**TINY_C, **ONE_LEVEL)
  params = numpy_init(net, x_tau, tau, cond)
  opt = optax.adam(1e-2)

  @jax.jit
  def loss_fn(p):
    return diffusion.eps_loss(net.apply(p, x_tau, tau, cond), noise)

  @jax.jit
  def train_step(p, s):
    # one step per call: a lax.scan around it costs more compile time than 60 dispatches
    g = jax.grad(loss_fn)(p)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s

  state = opt.init(params)
  first = float(loss_fn(params))
  for _ in range(60):
    params, state = train_step(params, state)
  last = float(loss_fn(params))
  assert np.isfinite(last) and last < first / 10.0, (first, last)


@pytest.mark.parametrize("which", ["c", "f"])
def test_precomputed_inter_gives_the_same_noise_prediction(which):
  """S_inter computed once (inter_only) and passed back as `inter=` equals the full call; the
  samplers rely on this to run the sequence encoder once per input instead of once per step."""
  rs = np.random.RandomState(3)
  t, i, j, c, n, f = 3, 6, 4, 1, 2, 2
  tau = jnp.array([1, 30], jnp.int32)
  if which == "c":
    x, cond = c_inputs(rs, 2, t, i, j, c, f)
    net = DiffusionCNet(**TINY_C, **ONE_LEVEL)
  else:
    x, cond = f_inputs(rs, 2, t, i, j, c, n, f)
    net = DiffusionFNet(scale=n, **TINY_F, **ONE_LEVEL)
  params = numpy_init(net, x, tau, cond)
  inter = net.apply(params, None, None, cond, inter_only=True)
  chex.assert_shape(inter, (2, None, None, net.inter_dim))
  full = net.apply(params, x, tau, cond)
  cached = net.apply(params, x, tau, cond, inter=inter)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-6, atol=1e-6)
  # A different S_inter must change the prediction (the cached path really uses it).
  moved = net.apply(params, x, tau, cond, inter=inter + 1.0)
  assert float(jnp.max(jnp.abs(moved - full))) > 1e-4
  with pytest.raises(ValueError, match="inter must be"):
    net.apply(params, x, tau, cond, inter=inter[:, :1])
  with pytest.raises(ValueError, match="x_tau must be"):
    net.apply(params, None, tau, cond, inter=inter)
