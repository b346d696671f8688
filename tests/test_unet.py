"""Tests for diffrecon_jax.models.unet."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.models import unet as unet_lib
from diffrecon_jax.models.unet import UNet, bottleneck_shape, group_count


def numpy_init(module, *args, seed: int = 0, **kwargs):
  """Parameters with the shapes `module.init` would give, filled on the host with numpy.

  Compiling `init` costs about a second per random initializer on these CPUs (XLA optimises every
  threefry instance), i.e. a minute for a U-Net; `jax.eval_shape` only traces. Kernels get a
  fan-in scaled normal (like lecun_normal), biases 0, norm scales 1, other tables N(0, 0.02^2).
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rs = np.random.RandomState(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = math.prod(s.shape[:-1])
      return jnp.asarray(rs.normal(size=s.shape) / math.sqrt(fan_in), s.dtype)
    if name == "bias":
      return jnp.zeros(s.shape, s.dtype)
    if name == "scale":
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rs.normal(size=s.shape) * 0.02, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_bottleneck_shape_and_groups():
  assert bottleneck_shape(8, 6, 2) == (4, 3)
  assert bottleneck_shape(7, 4, 2) == (4, 2)
  assert bottleneck_shape(25, 53, 3) == (7, 14)
  assert bottleneck_shape(5, 5, 1) == (5, 5)
  assert UNet.bottleneck_shape(14, 8, 3) == (4, 2)
  assert group_count(24, 8) == 8 and group_count(12, 8) == 6 and group_count(7, 8) == 7
  assert group_count(10, 8) == 5
  with pytest.raises(ValueError):
    bottleneck_shape(4, 4, 0)


def test_timestep_embedding_distinct():
  e = unet_lib.timestep_embedding(jnp.arange(10), 16)
  assert e.shape == (10, 16)
  d = np.asarray(jnp.linalg.norm(e[:, None] - e[None], axis=-1))
  assert (d + np.eye(10) > 1e-3).all()


# (H, W, C, external F or None, inter Di or None, channel_mults)
CASES = [
    (8, 6, 1, None, None, (1, 2)),
    (7, 4, 2, 3, 5, (1, 2)),
    (6, 12, 3, None, 5, (1, 2)),
    (16, 12, 2, 3, None, (1, 2, 2)),
    (32, 32, 1, 3, 5, (1, 2, 2)),
    (25, 53, 3, 3, 5, (1, 2, 2)),
]


@pytest.mark.parametrize("h,w,c,f,di,mults", CASES)
def test_unet_shapes(h, w, c, f, di, mults):
  # Shapes only: eval_shape traces without compiling (padding, skips, crop and the inter check
  # are all static), so every grid is cheap.
  b = 2
  model = UNet(out_channels=c, base_channels=8, channel_mults=mults, emb_dim=16)
  x = jax.ShapeDtypeStruct((b, h, w, c + 2), jnp.float32)
  tau = jax.ShapeDtypeStruct((b,), jnp.int32)
  ext = None if f is None else jax.ShapeDtypeStruct((b, f), jnp.float32)
  inter = None
  if di is not None:
    hd, wd = bottleneck_shape(h, w, len(mults))
    inter = jax.ShapeDtypeStruct((b, hd, wd, di), jnp.float32)
  params = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), x, tau, ext, inter)
  y = jax.eval_shape(model.apply, params, x, tau, ext, inter)
  assert y.shape == (b, h, w, c) and y.dtype == jnp.float32


def test_unet_numeric_uses_all_conditioning():
  """A 7x4 grid (padded to 8x4 inside): finite output that depends on tau, external and inter."""
  b, h, w, c = 2, 7, 4, 2
  model = UNet(out_channels=c, base_channels=8, emb_dim=16)
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.normal(size=(b, h, w, c + 2)), jnp.float32)
  ext = jnp.asarray(rs.normal(size=(b, 3)), jnp.float32)
  hd, wd = bottleneck_shape(h, w, 2)
  inter = jnp.asarray(rs.normal(size=(b, hd, wd, 5)), jnp.float32)
  tau = jnp.array([0, 7], jnp.int32)
  params = numpy_init(model, x, tau, ext, inter)
  apply = jax.jit(model.apply)
  y = apply(params, x, tau, ext, inter)
  chex.assert_shape(y, (b, h, w, c))
  chex.assert_tree_all_finite(y)
  diff = lambda a: float(jnp.max(jnp.abs(y - a)))
  assert diff(apply(params, x, tau + 20, ext, inter)) > 1e-5
  assert diff(apply(params, x, tau, -ext, inter)) > 1e-5
  assert diff(apply(params, x, tau, ext, 0.0 * inter)) > 1e-5


def test_unet_rejects_wrong_inter_grid():
  model = UNet(out_channels=1, base_channels=8, emb_dim=16)
  x = jnp.zeros((1, 8, 6, 1))
  tau = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="inter"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, tau, None, jnp.zeros((1, 3, 3, 4))))


@pytest.mark.parametrize("shape,groups", [((3, 5, 4, 16), 8), ((2, 7, 6, 6), 3), ((2, 4, 8), 1)])
def test_group_norm_equals_flax_group_norm(shape, groups):
  """unet.GroupNorm (CPU-friendly layout) computes flax.linen.GroupNorm with the same parameter
  tree, and folds a FiLM scale/shift exactly as GN(x) * (1 + s) + t."""
  import flax.linen as nn
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.normal(size=shape) * 3.0 + 1.5, jnp.float32)
  ours = unet_lib.GroupNorm(num_groups=groups)
  params = ours.init(jax.random.key(0), x)
  ref = nn.GroupNorm(num_groups=groups)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      ref.init(jax.random.key(0), x))
  c = shape[-1]
  params = {"params": {"scale": jnp.asarray(rs.normal(size=c), jnp.float32),
                       "bias": jnp.asarray(rs.normal(size=c), jnp.float32)}}
  want = ref.apply(params, x)
  np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-4, atol=1e-4)
  film_scale = jnp.asarray(rs.normal(size=(shape[0], c)), jnp.float32)
  film_shift = jnp.asarray(rs.normal(size=(shape[0], c)), jnp.float32)
  bshape = (shape[0],) + (1,) * (len(shape) - 2) + (c,)
  np.testing.assert_allclose(
      ours.apply(params, x, film_scale, film_shift),
      want * (1.0 + film_scale.reshape(bshape)) + film_shift.reshape(bshape),
      rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="do not divide"):
    unet_lib.GroupNorm(num_groups=5).init(jax.random.key(0), x)
