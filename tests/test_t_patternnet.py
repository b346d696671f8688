"""Tests for diffrecon/t_patternnet.py (paper eqs. 26-34)."""
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.diffrecon.t_patternnet import (TPatternNet, TimesBlock, candidate_periods,
                                               detect_periods, fft_period_weights, period_groups)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _key(seed: int) -> jax.Array:
  # RBG keys: initialising with the default threefry keys compiles several times slower on CPU.
  return jax.random.key(seed, impl="rbg")


def _periodic(t, periods, b=1, d=4, noise=0.3, seed=0):
  """(b, t, d) sum of sinusoids (one set of periods per sample) plus Gaussian noise."""
  rng = np.random.default_rng(seed)
  steps = np.arange(t)
  out = rng.normal(scale=noise, size=(b, t, d))
  for s, sample_periods in enumerate(periods):
    for amp, period in sample_periods:
      phase = rng.uniform(0, 2 * np.pi, size=d)
      out[s] += amp * np.sin(2 * np.pi * steps[:, None] / period + phase)
  return jnp.asarray(out, jnp.float32)


# ----------------------------------------------------------------------------- periods


def test_candidate_periods_and_groups():
  assert candidate_periods(12) == (12, 6, 4, 3, 3, 2)
  unique, onehot = period_groups(12)
  assert unique == (12, 6, 4, 3, 2)
  np.testing.assert_array_equal(onehot.sum(axis=1), 1)
  np.testing.assert_array_equal(onehot[:, unique.index(3)], [0, 0, 0, 1, 1, 0])
  assert candidate_periods(2) == (2,)
  with pytest.raises(ValueError, match="at least 2"):
    candidate_periods(1)


def test_fft_period_weights_matches_numpy():
  x = _periodic(12, [[(1.0, 4)], [(1.0, 6), (0.5, 3)]], b=2, d=3)
  amps, weights, periods = fft_period_weights(x, top_k=2)
  ref = np.abs(np.fft.rfft(np.asarray(x), axis=1)).mean(-1)[:, 1:7]
  np.testing.assert_allclose(np.asarray(amps), ref, rtol=1e-5, atol=1e-5)
  assert periods == (12, 6, 4, 3, 3, 2)
  weights = np.asarray(weights)
  for row_w, row_a in zip(weights, ref):
    top = np.argsort(row_a)[::-1][:2]
    expected = np.zeros(6)
    expected[top] = np.exp(row_a[top]) / np.exp(row_a[top]).sum()
    np.testing.assert_allclose(row_w, expected, rtol=1e-5, atol=1e-6)
  assert np.count_nonzero(weights, axis=1).tolist() == [2, 2]


def test_detect_period_48_of_4_days():
  x = _periodic(192, [[(1.0, 48), (0.4, 24)]], d=3, noise=0.5, seed=1)
  periods, amps = detect_periods(x, top_k=2)
  assert periods.shape == (1, 2) and periods.dtype == jnp.int32
  assert int(periods[0, 0]) == 48 and int(periods[0, 1]) == 24
  assert float(amps[0, 0]) > float(amps[0, 1])


def test_detect_period_12():
  x = _periodic(48, [[(1.0, 12)], [(1.0, 8)]], b=2, d=2, noise=0.3, seed=2)
  periods, _ = detect_periods(x, top_k=1)
  assert periods[:, 0].tolist() == [12, 8]  # per-sample choice


def test_detect_period_real_nyc_taxi():
  flow = np.load(REPO_ROOT / "diffrecon_jax/data/embedded/nytaxi/flow_train.npz")["flow"]
  series = flow[:384].sum(axis=(1, 2))[None]  # (1, 384, 2): in/out flow of the whole city
  periods, _ = detect_periods(jnp.asarray(series, jnp.float32), top_k=3)
  assert int(periods[0, 0]) == 48  # one day of 30-minute slots


# ----------------------------------------------------------------------------- TimesBlock


def _dynamic_timesblock(block, x, top_k):
  """TimesNet-style reference: host-side top-k per sample, only the chosen branches computed."""
  outs = []
  for s in range(x.shape[0]):
    xs = x[s:s + 1]
    amps = np.abs(np.fft.rfft(np.asarray(xs), axis=1)).mean(-1)[0, 1:x.shape[1] // 2 + 1]
    freqs = np.argsort(-amps, kind="stable")[:top_k] + 1
    w = np.exp(amps[freqs - 1] - amps[freqs - 1].max())
    w /= w.sum()
    out = xs
    for weight, f in zip(w, freqs):
      out = out + weight * block.branch(xs, int(np.ceil(x.shape[1] / f)))
    outs.append(out)
  return jnp.concatenate(outs, axis=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_timesblock_equals_dynamic_choice(top_k):
  x = _periodic(12, [[(1.0, 4)], [(1.0, 6), (0.6, 3)], [(1.0, 3), (0.8, 2.4)]], b=3, d=8,
                seed=3)
  # The samples prefer different periods, so a batch-shared choice would be wrong; in the third,
  # f = 4 and f = 5 both give period 3 (one shared branch, weights summed).
  top2 = detect_periods(x, 2)[0].tolist()
  assert [row[0] for row in top2] == [4, 6, 3] and top2[2] == [3, 3]
  block = TimesBlock(d_model=8, d_ff=8, top_k=top_k, num_kernels=2)
  params = jax.jit(block.init)(_key(0), x)
  out = jax.jit(block.apply)(params, x)
  ref = _dynamic_timesblock(block.bind(params), x, top_k)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  assert not np.allclose(np.asarray(out), np.asarray(x), atol=1e-3)  # branches contribute


def test_timesblock_branch_fold_layout():
  # eq. 30 as TimesNet: zero-pad to rows * p and fold row-major, x2[:, r, c] = x[:, r * p + c]
  # (ceil(t / p) rows of one period each); 3x3 kernels make the layout matter.
  t, d = 10, 4
  x = _periodic(t, [[(1.0, 4)]], b=1, d=d, seed=4)
  block = TimesBlock(d_model=d, d_ff=4, top_k=1, num_kernels=2)
  periods = (10, 5, 4, 3, 2)
  folded = []
  for p in periods:
    rows = -(-t // p)
    x2 = np.zeros((1, rows, p, d), np.float32)
    for i in range(t):
      x2[:, i // p, i % p] = x[:, i]
    folded.append(jnp.asarray(x2))

  def run(m, x, folded):
    pipeline = lambda z: m.inception_out(jax.nn.gelu(m.inception_in(z), False))
    return [m.branch(x, p) for p in periods], [pipeline(z) for z in folded]

  params = jax.jit(block.init)(_key(1), x)
  branches, convolved = jax.jit(lambda p, x, f: block.apply(p, x, f, method=run))(
      params, x, folded)
  for p, branch, y2 in zip(periods, branches, convolved):
    expected = np.stack([np.asarray(y2)[:, i // p, i % p] for i in range(t)], axis=1)
    np.testing.assert_allclose(np.asarray(branch), expected, atol=1e-5)


# ----------------------------------------------------------------------------- TPatternNet

MODEL = TPatternNet(d_model=8, d_ff=8, top_k=2, num_blocks=2, num_kernels=2, out_channels=3)


def _series(seed, t=12, n_i=4, n_j=3, c=2, b=2, periods=((4,), (6,))):
  rng = np.random.default_rng(seed)
  steps = np.arange(t)
  x = rng.normal(scale=0.2, size=(b, t, n_i, n_j, c))
  for s in range(b):
    for period in periods[s]:
      phase = rng.uniform(0, 2 * np.pi, size=(1, n_i, n_j, c))
      x[s] += np.sin(2 * np.pi * steps[:, None, None, None] / period + phase)
  external = rng.normal(size=(b, t, 5))
  return jnp.asarray(x, jnp.float32), jnp.asarray(external, jnp.float32)


@pytest.fixture(scope="module")
def params():
  return jax.jit(MODEL.init)(_key(0), *_series(0))


@pytest.mark.parametrize("t,n_i,n_j,c", [(4, 8, 6, 2), (3, 7, 4, 1), (2, 6, 12, 3)])
def test_output_shape(t, n_i, n_j, c):
  x = jnp.zeros((2, t, n_i, n_j, c))
  out, variables = jax.eval_shape(MODEL.init_with_output, _key(0), x)
  assert out.shape == (2, t, n_i, n_j, 3)
  assert variables["params"]["embed"]["pos_time"].shape == (t, 8)


def test_equals_dynamic_choice_end_to_end(params):
  series, external = _series(1)
  out = jax.jit(MODEL.apply)(params, series, external)
  assert out.shape == (2, 12, 4, 3, 3) and np.isfinite(np.asarray(out)).all()
  bound = MODEL.bind(params)
  x = bound.embed(series, external)
  for block, norm in zip(bound.blocks, bound.norms):
    x = norm(_dynamic_timesblock(block, x, MODEL.top_k))
  ref = bound.head(x, (4, 3))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_compiles_once_for_different_periods(params):
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(p, s, e):
    return MODEL.apply(p, s, e)

  chosen = []
  for seed, periods in [(2, ((4,), (6,))), (3, ((3,), (12,))), (4, ((2,), (4,)))]:
    series, external = _series(seed, periods=periods)
    assert np.isfinite(np.asarray(fwd(params, series, external))).all()
    emb = MODEL.apply(params, series, external, method=lambda m, s, e: m.embed(s, e))
    chosen.append(tuple(detect_periods(emb, 1)[0][:, 0].tolist()))
  assert len(set(chosen)) > 1  # the data really moved the dominant period


def test_gradient_finite(params):
  series, external = _series(5)

  def loss(p, s):
    return jnp.mean(MODEL.apply(p, s, external) ** 2)

  g_params, g_series = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, series)
  leaves = jax.tree_util.tree_leaves(g_params)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
  assert np.isfinite(np.asarray(g_series)).all() and float(jnp.abs(g_series).sum()) > 0


def test_shape_errors(params):
  series, external = _series(6)
  with pytest.raises(ValueError, match="history of 12 slices"):
    jax.eval_shape(MODEL.apply, params, series[:, :6], external[:, :6])
  with pytest.raises(ValueError, match=r"\(B, t, I, J, C\)"):
    jax.eval_shape(MODEL.apply, params, series[..., 0], external)
  with pytest.raises(ValueError, match="at least 2"):
    jax.eval_shape(MODEL.init, _key(0), series[:, :1])
