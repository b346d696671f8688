"""Tests for diffrecon/grid_stack.py and diffrecon/st_pointformer.py (paper eqs. 14-25)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.diffrecon import st_pointformer
from diffrecon_jax.diffrecon.grid_stack import stack_to_grid, stacked_channels
from diffrecon_jax.diffrecon.st_pointformer import (STPointFormer, blockwise_attention,
                                                 manual_attention)


def _key(seed: int) -> jax.Array:
  # RBG keys: initialising with the default threefry keys compiles several times slower on CPU.
  return jax.random.key(seed, impl="rbg")

# ----------------------------------------------------------------------------- grid_stack


def _reference_stack(x: np.ndarray, down_shape) -> np.ndarray:
  """Loop version of eq. 24 with the documented padding / nearest-neighbour rules."""
  b, t, n_i, n_j, d = x.shape
  i_down, j_down = down_shape
  if n_i < i_down:
    x = x[:, :, (np.arange(i_down) * n_i) // i_down]
  if n_j < j_down:
    x = x[:, :, :, (np.arange(j_down) * n_j) // j_down]
  n_i, n_j = x.shape[2:4]
  bi, bj = -(-n_i // i_down), -(-n_j // j_down)
  y = np.zeros((b, i_down, j_down, t * bi * bj * d), x.dtype)
  for p in range(i_down):
    for q in range(j_down):
      for s in range(t):
        for u in range(bi):
          for v in range(bj):
            row, col = p * bi + u, q * bj + v
            if row < n_i and col < n_j:
              c = ((s * bi + u) * bj + v) * d
              y[:, p, q, c:c + d] = x[:, s, row, col]
  return y


def test_stack_worked_example():
  x = np.arange(16.0).reshape(1, 1, 4, 4, 1)
  y = np.asarray(stack_to_grid(x, (2, 2)))
  np.testing.assert_array_equal(y[0], [[[0, 1, 4, 5], [2, 3, 6, 7]],
                                       [[8, 9, 12, 13], [10, 11, 14, 15]]])


@pytest.mark.parametrize("shape,down", [
    ((2, 3, 4, 4, 2), (2, 2)),   # divisible
    ((1, 2, 5, 3, 2), (2, 2)),   # non-divisible: zero padding on both axes
    ((2, 2, 2, 3, 1), (4, 6)),   # point grid coarser than bottleneck: upsample both axes
    ((1, 2, 5, 7, 1), (8, 2)),   # upsample rows (5 -> 8, not a multiple), pad columns
])
def test_stack_matches_reference(shape, down):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  y = np.asarray(jax.jit(stack_to_grid, static_argnums=1)(x, down))
  b, t, n_i, n_j, d = shape
  assert y.shape == (b, down[0], down[1], stacked_channels(t, n_i, n_j, d, down))
  np.testing.assert_array_equal(y, _reference_stack(x, down))


def test_stack_padding_and_upsampling_content():
  # Non-divisible: I = 3 rows into 2 cells -> bi = 2, the 2nd cell is (row 2, zero row).
  x = np.arange(3.0).reshape(1, 1, 3, 1, 1)
  y = np.asarray(stack_to_grid(x, (2, 1)))
  np.testing.assert_array_equal(y[0, :, 0], [[0, 1], [2, 0]])
  # I = 5 < Id = 8: every source row survives (repeat-by-2-then-crop would drop row 4).
  x = np.arange(5.0).reshape(1, 1, 5, 1, 1)
  y = np.asarray(stack_to_grid(x, (8, 1)))
  np.testing.assert_array_equal(y[0, :, 0, 0], [0, 0, 1, 1, 2, 3, 3, 4])
  # I = 2 < Id = 4 divides: plain repetition.
  x = np.arange(2.0).reshape(1, 1, 2, 1, 1)
  np.testing.assert_array_equal(np.asarray(stack_to_grid(x, (4, 1)))[0, :, 0, 0], [0, 0, 1, 1])


def test_stack_bad_input():
  with pytest.raises(ValueError, match="B, t, I, J, D"):
    stack_to_grid(np.zeros((2, 4, 4, 1)), (2, 2))
  with pytest.raises(ValueError, match="down_shape"):
    stack_to_grid(np.zeros((1, 1, 4, 4, 1)), (0, 2))


# ----------------------------------------------------------------------------- ST-PointFormer

MODEL = STPointFormer(d_model=16, num_heads=2, num_layers=2, ff_dim=32)


def _inputs(seed, t=4, n_i=8, n_j=6, c=2, f=3, b=2, p_obs=0.5):
  rng = np.random.default_rng(seed)
  mask = (rng.uniform(size=(b, t, n_i, n_j)) < p_obs).astype(np.float32)
  values = rng.normal(size=(b, t, n_i, n_j, c)).astype(np.float32) * mask[..., None]
  external = rng.normal(size=(b, t, f)).astype(np.float32)
  return jnp.asarray(values), jnp.asarray(mask), jnp.asarray(external)


@pytest.fixture(scope="module")
def params():
  return jax.jit(MODEL.init)(_key(0), *_inputs(0))


APPLY = jax.jit(MODEL.apply)


@pytest.mark.parametrize("t,n_i,n_j,c", [(4, 8, 6, 2), (3, 7, 4, 1), (2, 6, 12, 3)])
def test_output_shape(t, n_i, n_j, c):
  # Abstract evaluation traces the whole module (every shape check) without compiling it; the
  # numbers are checked by the tests below on the (4, 8, 6, 2) configuration.
  values, mask, external = _inputs(1, t, n_i, n_j, c)
  out, variables = jax.eval_shape(MODEL.init_with_output, _key(0), values, mask,
                                  external)
  assert out.shape == (2, t, n_i, n_j, 16)
  assert variables["params"]["pos_time"].shape == (t, 16)
  assert variables["params"]["pos_space"].shape == (n_i, n_j, 16)


def test_missing_values_have_no_effect(params):
  values, mask, external = _inputs(2)
  base = np.asarray(APPLY(params, values, mask, external))
  missing = (mask == 0)[..., None]
  junk = np.random.default_rng(3).normal(scale=100.0, size=values.shape).astype(np.float32)
  for fill in (junk, np.full(values.shape, np.nan, np.float32)):
    changed = jnp.where(missing, fill, values)
    out = np.asarray(APPLY(params, changed, mask, external))
    np.testing.assert_allclose(out, base, atol=1e-6, rtol=0)
  # Changing one observed value changes outputs, also at missing points (they attend to it).
  b, s, i, j = map(int, np.argwhere(np.asarray(mask) == 1)[0])
  poked = values.at[b, s, i, j, 0].add(3.0)
  out = np.asarray(APPLY(params, poked, mask, external))
  assert not np.allclose(out[b], base[b], atol=1e-4)
  assert np.abs(out[b][np.asarray(mask[b]) == 0] - base[b][np.asarray(mask[b]) == 0]).max() > 1e-4
  # ... and never leaks across samples of the batch.
  np.testing.assert_allclose(out[1 - b], base[1 - b], atol=1e-6, rtol=0)


def test_mask_changes_output(params):
  values, mask, external = _inputs(4)
  base = np.asarray(APPLY(params, values, mask, external))
  # Same values, one more point declared missing: the output must change.
  b, s, i, j = map(int, np.argwhere(np.asarray(mask) == 1)[0])
  out = np.asarray(APPLY(params, values, mask.at[b, s, i, j].set(0.0), external))
  assert not np.allclose(out, base, atol=1e-4)


def test_missing_points_are_masked_as_keys(params):
  # Keys at missing points are masked: what a missing token carries never reaches observed points
  # (it does reach the missing queries themselves).
  values, mask, external = _inputs(12)
  base = np.asarray(APPLY(params, values, mask, external))
  p2 = jax.tree_util.tree_map(lambda a: a, params)
  p2["params"]["missing_token"] = params["params"]["missing_token"] + 1.0
  out = np.asarray(APPLY(p2, values, mask, external))
  observed = np.asarray(mask) == 1
  np.testing.assert_allclose(out[observed], base[observed], atol=1e-6, rtol=0)
  assert np.abs(out[~observed] - base[~observed]).max() > 1e-3


def test_all_missing_is_finite(params):
  values, mask, external = _inputs(5)
  mask = mask.at[0].set(0.0)  # sample 0 fully unobserved
  mask = mask.at[1, 2].set(0.0)  # one slice of sample 1 unobserved
  out = np.asarray(APPLY(params, values, mask, external))
  assert np.isfinite(out).all()
  out = np.asarray(APPLY(params, values, jnp.zeros_like(mask), external))
  assert np.isfinite(out).all()
  # With nothing observed the output depends only on position + external (values ignored).
  out2 = np.asarray(APPLY(params, values * 7.0 + 1.0, jnp.zeros_like(mask), external))
  np.testing.assert_allclose(out, out2, atol=1e-6, rtol=0)


def test_compiles_once(params):
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(p, v, m, e):
    return MODEL.apply(p, v, m, e)

  outs = [np.asarray(fwd(params, *_inputs(seed, p_obs=p_obs)))
          for seed, p_obs in [(6, 0.5), (7, 0.1), (8, 0.0)]]
  assert not np.allclose(outs[0], outs[1])


def test_gradient_finite_with_nan_junk(params):
  values, mask, external = _inputs(9)
  values = jnp.where((mask == 0)[..., None], jnp.nan, values)

  def loss(p, v):
    return jnp.mean(MODEL.apply(p, v, mask, external) ** 2)

  g_params, g_values = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, values)
  leaves = jax.tree_util.tree_leaves(g_params)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
  assert sum(float(jnp.abs(leaf).sum()) for leaf in leaves) > 0
  g_values = np.asarray(g_values)
  assert np.isfinite(g_values).all()
  assert np.all(g_values[np.asarray(mask) == 0] == 0)


def test_dropout_and_impl_options(params):
  values, mask, external = _inputs(10)
  base = np.asarray(APPLY(params, values, mask, external))
  xla = STPointFormer(d_model=16, num_heads=2, num_layers=2, ff_dim=32, attention_impl="xla")
  # The CPU default is the manual path: equal to float32 rounding, not bit for bit.
  np.testing.assert_allclose(np.asarray(jax.jit(xla.apply)(params, values, mask, external)),
                             base, atol=1e-5, rtol=0)
  drop = STPointFormer(d_model=16, num_heads=2, num_layers=2, ff_dim=32, dropout=0.5)
  out = jax.jit(lambda p, r: drop.apply(p, values, mask, external, deterministic=False,
                                        rngs={"dropout": r}))(params, _key(1))
  assert np.isfinite(np.asarray(out)).all() and not np.allclose(np.asarray(out), base)


def test_shape_errors(params):
  values, mask, external = _inputs(11)
  with pytest.raises(ValueError, match="pos_time"):
    jax.eval_shape(MODEL.apply, params, values[:, :3], mask[:, :3], external[:, :3])
  with pytest.raises(ValueError, match="mask must have shape"):
    jax.eval_shape(MODEL.apply, params, values, mask[..., :3], external)
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(STPointFormer(d_model=10, num_heads=3).init, _key(0), values,
                   mask, external)


# ----------------------------------------------------------------------------- manual attention


def _qkv_mask(seed, b=3, l=24, n=2, h=4):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, l, n, h)).astype(np.float32) * 2.0)
             for _ in range(3))
  mask = rng.uniform(size=(b, 1, 1, l)) < 0.5
  mask[1] = False  # every key of sample 1 masked: uniform weights, as in the reference
  mask[2, ..., -5:] = False  # trailing padding
  return q, k, v, jnp.asarray(mask)


def test_manual_attention_matches_reference():
  q, k, v, mask = _qkv_mask(0)
  # A random cotangent (not a symmetric loss) for the gradients w.r.t. q, k, v.
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))

  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grads(attention, q, k, v, mask):
    out, vjp = jax.vjp(lambda *a: attention(*a, mask), q, k, v)
    return out, vjp(w)

  reference = lambda *a: jax.nn.dot_product_attention(*a[:3], mask=a[3], implementation="xla")
  ref = jax.tree_util.tree_leaves(out_and_grads(reference, q, k, v, mask))
  # chunk_bytes: all 6 (sample, head) items at once (vmap); 4 items per lax.map step + a
  # remainder of 2.
  for chunk_bytes in (2**20, 4 * 24 * 24 * 4):
    new = out_and_grads(functools.partial(manual_attention, chunk_bytes=chunk_bytes),
                        q, k, v, mask)
    for x, x_ref in zip(jax.tree_util.tree_leaves(new), ref):
      np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), atol=1e-5, rtol=0)
      assert np.abs(np.asarray(x_ref)).max() > 1e-2
  # Masked keys have no influence: change v there, the output stays.
  v2 = jnp.where(jnp.swapaxes(mask[:, 0], 1, 2)[..., None], v, 100.0)
  out2 = out_and_grads(manual_attention, q, k, v2, mask)[0]
  np.testing.assert_allclose(np.asarray(out2)[[0, 2]], np.asarray(ref[0])[[0, 2]], atol=1e-5,
                             rtol=0)


def test_manual_attention_bad_mask():
  q, k, v, mask = _qkv_mask(0)
  with pytest.raises(ValueError, match="key_mask must have shape"):
    manual_attention(q, k, v, mask[:, 0])


def test_manual_path_matches_dot_product_attention(params):
  # Whole module, same parameters: 'manual' vs jax.nn.dot_product_attention ('xla'), with
  # masked keys, a fully unobserved sample (only the register token is visible) and padding
  # (4 * 8 * 6 + 1 = 193 tokens, padded to 200).
  values, mask, external = _inputs(13)
  mask = mask.at[1].set(0.0)
  kw = dict(d_model=16, num_heads=2, num_layers=2, ff_dim=32)
  target = jnp.asarray(np.random.default_rng(14).normal(size=(2, 4, 8, 6, 16)).astype(np.float32))

  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grads(impl, params, values, mask, external):
    model = STPointFormer(attention_impl=impl, **kw)
    out, vjp = jax.vjp(lambda p: model.apply(p, values, mask, external), params)
    return out, jax.tree_util.tree_leaves(vjp(target))

  out_ref, grads_ref = out_and_grads("xla", params, values, mask, external)
  for impl in ("manual", "blockwise"):  # blockwise: 200 tokens in blocks of 128, padded to 256
    out, grads = out_and_grads(impl, params, values, mask, external)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=1e-5, rtol=0)
    for g, g_ref in zip(grads, grads_ref):
      # float32 rounding relative to each leaf's size (key biases have zero gradient up to noise).
      scale = max(float(np.abs(np.asarray(g_ref)).max()), 10.0)
      np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=2e-6 * scale, rtol=0)


def test_blockwise_attention_matches_reference_and_is_linear_in_memory():
  """Values and gradients equal to jax.nn.dot_product_attention (masked keys, a row with every
  key masked, L not a multiple of the block); the compiled forward + backward working memory
  grows about linearly with L where the (L, L) scores of `manual_attention` grow quadratically."""
  rs = np.random.RandomState(0)
  b, l, n, h = 2, 300, 2, 8
  q, k, v = (jnp.asarray(rs.randn(b, l, n, h), jnp.float32) for _ in range(3))
  mask = rs.rand(b, 1, 1, l) > 0.5
  mask[1] = False
  mask = jnp.asarray(mask)
  w = jnp.asarray(rs.randn(b, l, n, h).astype(np.float32))

  def out_and_grads(attention):
    out, vjp = jax.vjp(lambda *a: attention(*a, mask), q, k, v)
    return [out, *vjp(w)]

  ref = out_and_grads(lambda *a: jax.nn.dot_product_attention(*a[:3], mask=a[3],
                                                              implementation="xla"))
  # All 4 (sample, head) items in one step; one per step; 3 per step (the last step padded).
  for chunk_bytes in (2**30, 1, 3 * l * 64 * 4):
    new = out_and_grads(functools.partial(blockwise_attention, block=64, chunk_bytes=chunk_bytes))
    for x, x_ref in zip(new, ref):
      np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), atol=2e-5, rtol=0)

  def working_bytes(attention, length):
    spec = jax.ShapeDtypeStruct((2, length, 2, 8), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(attention(q, k, v, m) ** 2),
                            argnums=(0, 1, 2)))
    compiled = grad.lower(spec, spec, spec, jax.ShapeDtypeStruct((2, 1, 1, length), jnp.bool_))
    return compiled.compile().memory_analysis().temp_size_in_bytes

  # Lengths where one lax.map step of blockwise_attention holds one item's (L, block) scores
  # (its chunk_bytes: fewer items per step at larger L, so memory grows more slowly below).
  blockwise = [working_bytes(blockwise_attention, length) for length in (2048, 4096)]
  manual = [working_bytes(manual_attention, length) for length in (2048, 4096)]
  assert blockwise[1] / blockwise[0] < 2.5 < 3.0 < manual[1] / manual[0], (blockwise, manual)
  assert blockwise[1] < manual[1] / 8


def test_default_impl_by_backend(params):
  # attention_impl=None traces exactly as 'manual' on CPU and as jax.nn.dot_product_attention
  # ('xla') elsewhere.
  values, mask, external = _inputs(15)
  jaxpr = lambda impl: str(jax.make_jaxpr(
      STPointFormer(d_model=16, num_heads=2, num_layers=2, ff_dim=32, attention_impl=impl).apply)(
          params, values, mask, external))
  expected = "manual" if jax.default_backend() == "cpu" else "xla"
  assert jaxpr("manual") != jaxpr("xla")
  assert jaxpr(None) == jaxpr(expected)
  if jax.default_backend() == "cpu":
    # Above BLOCKWISE_FROM_POINTS ST-points the CPU default is the blockwise path (memory
    # linear in the points); the 4 x 8 x 6 = 192 points here cross a threshold of 100.
    assert jaxpr("blockwise") != jaxpr("manual")
    original = st_pointformer.BLOCKWISE_FROM_POINTS
    try:
      st_pointformer.BLOCKWISE_FROM_POINTS = 100
      assert jaxpr(None) == jaxpr("blockwise")
    finally:
      st_pointformer.BLOCKWISE_FROM_POINTS = original
  with pytest.raises(ValueError, match="attention_impl"):
    jax.eval_shape(STPointFormer(d_model=16, num_heads=2, num_layers=2, ff_dim=32,
                                 attention_impl="flash").apply, params, values, mask, external)
