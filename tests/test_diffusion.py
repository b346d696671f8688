"""Tests for diffrecon_jax.diffusion: schedules, forward process, loss, samplers, summaries."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax.models import diffusion

MU, SIGMA = 1.5, 0.5  # data distribution N(MU, SIGMA^2) per cell for the analytic denoiser


def gaussian_eps_fn(schedule, mu=MU, sigma=SIGMA):
  """Optimal eps for data ~ N(mu, sigma^2): E[eps | x_tau] = sqrt(1-abar) (x - m) / v.

  x_tau ~ N(sqrt(abar) mu, abar sigma^2 + 1 - abar) and Cov(eps, x_tau) = sqrt(1 - abar).
  `mu` may be an array broadcasting against x (per-input means).
  """
  def eps_fn(x, tau):
    ab = schedule.alpha_bars[tau].reshape((-1,) + (1,) * (x.ndim - 1))
    m = jnp.sqrt(ab) * mu
    v = ab * sigma ** 2 + 1.0 - ab
    return jnp.sqrt(1.0 - ab) * (x - m) / v
  return eps_fn


def chain_moments(schedule, seq, eta, mu, sigma):
  """Exact mean / std of a sampler's output under `gaussian_eps_fn` (float64 numpy reference).

  With the optimal eps of Gaussian data every reverse step is affine in x plus Gaussian noise,
  x_prev = A x + b + s z, so the moments follow m' = A m + b, v' = A^2 v + s^2 from N(0, 1).
  Written independently of the sampler code, in the textbook DDIM form.
  """
  ab = np.asarray(schedule.alpha_bars, np.float64)
  m, v = 0.0, 1.0
  for k, t in enumerate(seq):
    a_t = ab[t]
    a_p = ab[seq[k + 1]] if k + 1 < len(seq) else 1.0
    s = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    c = np.sqrt(1 - a_t) / (a_t * sigma ** 2 + 1 - a_t)
    step = lambda x: (np.sqrt(a_p / a_t) * (x - np.sqrt(1 - a_t) * c * (x - np.sqrt(a_t) * mu))
                      + np.sqrt(1 - a_p - s ** 2) * c * (x - np.sqrt(a_t) * mu))
    b = step(0.0)
    a = step(1.0) - b
    m, v = a * m + b, a * a * v + s * s
  return m, np.sqrt(v)


@pytest.fixture(scope="module")
def sched():
  return diffusion.make_schedule("quad", 50, 1e-4, 0.5)


# ---- schedules, forward process, loss ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "quad", "cosine"])
def test_schedule_properties(kind):
  s = diffusion.make_schedule(kind, 50, 1e-4, 0.5)
  assert s.num_steps == 50
  for leaf in jax.tree_util.tree_leaves(s):
    assert leaf.dtype == jnp.float32 and leaf.shape == (50,)
  ab = np.asarray(s.alpha_bars)
  assert (np.diff(ab) < 0).all() and 0 < ab[-1] < ab[0] < 1
  np.testing.assert_allclose(np.asarray(s.alpha_bars_prev)[1:], ab[:-1], rtol=1e-6)
  assert float(s.posterior_variance[0]) == 0.0
  pv = np.asarray(s.posterior_variance)[1:]
  assert (pv > 0).all() and (pv <= np.asarray(s.betas)[1:] + 1e-7).all()


def test_schedule_endpoints():
  q = diffusion.make_schedule("quad", 50, 1e-4, 0.5)
  np.testing.assert_allclose([float(q.betas[0]), float(q.betas[-1])], [1e-4, 0.5], rtol=1e-6)
  # quad is linear in sqrt(beta), not in beta
  sq = np.sqrt(np.asarray(q.betas, np.float64))
  np.testing.assert_allclose(np.diff(sq), np.diff(sq)[0], rtol=1e-3)
  lin = diffusion.make_schedule("linear", 10, 1e-3, 0.2)
  np.testing.assert_allclose(np.diff(np.asarray(lin.betas)), (0.2 - 1e-3) / 9, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(lin.alpha_bars), np.cumprod(1 - np.linspace(1e-3, 0.2, 10)),
                             rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(kind="bogus"), dict(num_steps=0),
                                    dict(beta_start=0.6, beta_end=0.5), dict(beta_end=1.0)])
def test_schedule_rejects_bad_input(kwargs):
  with pytest.raises(ValueError):
    diffusion.make_schedule(**kwargs)


def test_q_sample_statistics_and_predict_x0(sched):
  n = 40000
  x0 = jnp.full((n, 1), 2.0)
  tau = jnp.full((n,), 10, jnp.int32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  xt = diffusion.q_sample(sched, x0, tau, noise)
  ab = float(sched.alpha_bars[10])
  assert abs(float(xt.mean()) - 2.0 * np.sqrt(ab)) < 0.02
  assert abs(float(xt.std()) - np.sqrt(1 - ab)) < 0.02
  # predict_x0 inverts q_sample given the true noise (eq. 10 generalised).
  np.testing.assert_allclose(diffusion.predict_x0(sched, xt, tau, noise), x0, atol=1e-4)
  # per-example steps broadcast over trailing axes
  x0b = jnp.ones((3, 2, 2))
  xt = diffusion.q_sample(sched, x0b, jnp.array([0, 10, 49]), jnp.zeros_like(x0b))
  np.testing.assert_allclose(xt[:, 0, 0], np.asarray(sched.sqrt_alpha_bars)[[0, 10, 49]],
                             rtol=1e-6)


def test_eps_loss():
  a = jnp.zeros((2, 3))
  b = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
  assert float(diffusion.eps_loss(a, b)) == pytest.approx(14.0 / 6)
  w = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  assert float(diffusion.eps_loss(a, b, w)) == pytest.approx(2.5)
  assert float(diffusion.eps_loss(a, b, jnp.zeros_like(w))) == 0.0
  with pytest.raises(ValueError):
    diffusion.eps_loss(a, b[:, :2])


def test_ddim_timesteps():
  np.testing.assert_array_equal(diffusion.ddim_timesteps(50, 50), np.arange(49, -1, -1))
  seq = diffusion.ddim_timesteps(50, 7)
  assert seq[0] == 49 and seq[-1] == 0 and len(set(seq.tolist())) == 7 and (np.diff(seq) < 0).all()
  assert diffusion.ddim_timesteps(50, 1).tolist() == [49]
  with pytest.raises(ValueError):
    diffusion.ddim_timesteps(50, 51)


# ---- samplers ----------------------------------------------------------------------------------

SHAPE = (4000, 2)


@functools.partial(jax.jit, static_argnames=("method", "num_steps"))
def _run(sched, rng, x_init, method, num_steps=None, eta=0.0):
  # eta is traced, so eta = 0 and eta = 1 share one compiled chain
  eps_fn = gaussian_eps_fn(sched)
  if method == "ddpm":
    return diffusion.sample_ddpm(eps_fn, sched, SHAPE, rng, x_init=x_init)
  return diffusion.sample_ddim(eps_fn, sched, SHAPE, rng, num_steps, eta, x_init=x_init)


def _start(seed):
  return jax.random.normal(jax.random.key(seed), SHAPE)


def _check_moments(x, mean, std, name):
  n = x.size  # standard errors of the sample mean and std, 4.5 sigma tolerance
  assert abs(float(x.mean()) - mean) < 4.5 * std / np.sqrt(n), (name, float(x.mean()), mean)
  assert abs(float(x.std()) - std) < 4.5 * std / np.sqrt(2 * n), (name, float(x.std()), std)


def test_samplers_follow_their_exact_chain(sched):
  """Quad T=50 (the project default): each sampler's output has its chain's exact moments."""
  rng, x_init = jax.random.key(3), _start(3)
  t = sched.num_steps
  ddpm = _run(sched, rng, x_init, "ddpm")
  runs = {("ddpm", t, 1.0): ddpm}
  for s, eta in [(t, 1.0), (t, 0.0), (10, 0.0), (10, 1.0)]:
    runs[("ddim", s, eta)] = _run(sched, rng, x_init, "ddim", s, eta)
  for (method, s, eta), x in runs.items():
    mean, std = chain_moments(sched, diffusion.ddim_timesteps(t, s), eta, MU, SIGMA)
    _check_moments(x, mean, std, (method, s, eta))
  # S = T with eta = 1 is ancestral sampling: same rng -> the same draws.
  np.testing.assert_allclose(runs[("ddim", t, 1.0)], ddpm, atol=1e-3)
  # the deterministic sampler is a different chain from the same start
  assert float(jnp.max(jnp.abs(runs[("ddim", t, 0.0)] - ddpm))) > 0.1


def test_samplers_recover_the_data_distribution():
  """With a fine schedule (cosine, T=200) both samplers give N(MU, SIGMA^2) and agree."""
  fine = diffusion.make_schedule("cosine", 200)
  ddpm = _run(fine, jax.random.key(5), _start(5), "ddpm")
  ddim = _run(fine, jax.random.key(6), _start(6), "ddim", 200, 0.0)
  for x in (ddpm, ddim):
    assert abs(float(x.mean()) - MU) < 0.02
    assert abs(float(x.std()) - SIGMA) < 0.03
  assert abs(float(ddpm.std()) - float(ddim.std())) < 0.03


def test_ddim_eta0_is_deterministic_given_start(sched):
  x_init = _start(7)
  a = _run(sched, jax.random.key(0), x_init, "ddim", 10, 0.0)
  b = _run(sched, jax.random.key(1), x_init, "ddim", 10, 0.0)
  np.testing.assert_array_equal(a, b)
  # with eta = 1 the chain injects noise, so the loop rng matters
  c = _run(sched, jax.random.key(0), x_init, "ddim", 10, 1.0)
  d = _run(sched, jax.random.key(1), x_init, "ddim", 10, 1.0)
  assert float(jnp.max(jnp.abs(c - d))) > 0.1
  # for Gaussian data the probability-flow map is affine and increasing in the start noise
  corr = np.corrcoef(np.asarray(x_init).ravel(), np.asarray(a).ravel())[0, 1]
  assert corr > 0.999


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_known_cells_hold_exactly(sched, method):
  rs = np.random.RandomState(0)
  known = jnp.asarray(rs.normal(size=(4, 5, 3, 2)) * 3.0, jnp.float32)
  mask = jnp.asarray(rs.rand(4, 5, 3, 1) < 0.5, jnp.float32)  # broadcasts over channels
  eps_fn = gaussian_eps_fn(sched)
  if method == "ddpm":
    sample = lambda k, m: diffusion.sample_ddpm(eps_fn, sched, k.shape, jax.random.key(0), k, m)
  else:
    sample = lambda k, m: diffusion.sample_ddim(eps_fn, sched, k.shape, jax.random.key(0), 5,
                                                0.0, k, m)
  out = jax.jit(sample)(known, mask)
  m = np.broadcast_to(np.asarray(mask) > 0.5, known.shape)
  np.testing.assert_array_equal(np.asarray(out)[m], np.asarray(known)[m])
  # unobserved cells are sampled, not copied
  assert np.abs(np.asarray(out)[~m] - np.asarray(known)[~m]).min() > 0.0
  with pytest.raises(ValueError, match="known"):
    diffusion.sample_ddpm(eps_fn, sched, known.shape, jax.random.key(0), known, None)


def tied_eps_fn(schedule):
  """Optimal eps for maps (B, I, J, C) whose I*J cells all hold one value v ~ N(0, 1) per channel.

  x_tau = sqrt(abar) v 1 + sqrt(1 - abar) eps, so Cov(x_tau) = abar 11^T + (1 - abar) I and
  E[eps | x_tau] = (x - k sum(x) 1) / sqrt(1 - abar) with k = abar / (1 - abar + d abar): the
  prediction for a cell depends on every cell (a spatial sum), unlike `gaussian_eps_fn`.
  """
  def eps_fn(x, tau):
    ab = schedule.alpha_bars[tau].reshape((-1, 1, 1, 1))
    k = ab / (1.0 - ab + x.shape[1] * x.shape[2] * ab)
    return (x - k * x.sum(axis=(1, 2), keepdims=True)) / jnp.sqrt(1.0 - ab)
  return eps_fn


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_known_cells_steer_the_hidden_ones_at_every_step(sched, method):
  """With a denoiser that mixes cells, imposing the observed cells at every reverse step is what
  carries their information to the hidden cells: the hidden cells of each map come out near the
  map's shared value v, while imposing only at the end leaves them unconditional draws."""
  b, shape = 256, (256, 4, 4, 1)
  rs = np.random.RandomState(0)
  v = rs.uniform(-2.0, 2.0, size=(b, 1, 1, 1)).astype(np.float32)
  known = jnp.broadcast_to(jnp.asarray(v), shape)
  mask = jnp.asarray(rs.rand(*shape) < 0.5, jnp.float32)
  eps_fn = tied_eps_fn(sched)
  if method == "ddpm":
    sample = lambda *kn: diffusion.sample_ddpm(eps_fn, sched, shape, jax.random.key(0), *kn)
  else:
    sample = lambda *kn: diffusion.sample_ddim(eps_fn, sched, shape, jax.random.key(0), 10, 1.0,
                                               *kn)
  every = np.asarray(jax.jit(lambda k, m: sample(k, m))(known, mask))
  end_only = np.where(np.asarray(mask) > 0, known, np.asarray(jax.jit(lambda: sample())()))
  hidden = np.asarray(mask) == 0
  err_every = np.abs(every - np.asarray(known))[hidden].mean()
  err_end = np.abs(end_only - np.asarray(known))[hidden].mean()
  assert err_every < 0.25, err_every   # measured: 0.04 (ddpm), 0.12 (ddim)
  assert err_end > 0.8, err_end        # measured: 1.2, 1.1 (the test can tell them apart)
  np.testing.assert_array_equal(every[~hidden], np.asarray(known)[~hidden])


def test_sampler_compiles_once(sched):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(rng, known, mask):
    return diffusion.sample_many(lambda x, t, c: gaussian_eps_fn(sched, mu=c)(x, t),
                                 jnp.zeros((3, 1, 1)) + known.mean(), sched, (3, 4, 2), rng,
                                 n_samples=4, num_steps=5, known=known, known_mask=mask)

  chex.clear_trace_counter()
  for seed in range(3):
    rs = np.random.RandomState(seed)
    out = run(jax.random.key(seed), jnp.asarray(rs.normal(size=(3, 4, 2)), jnp.float32),
              jnp.asarray(rs.rand(3, 4, 2) < 0.3, jnp.float32))
    assert out["median"].shape == (3, 4, 2)


def test_sample_many_tiles_conditioning_per_input(sched):
  mus = jnp.array([-2.0, 0.0, 3.0])
  denoise = lambda x, t, c: gaussian_eps_fn(sched, mu=c["mu"][:, None], sigma=0.3)(x, t)
  out = jax.jit(lambda rng: diffusion.sample_many(
      denoise, {"mu": mus}, sched, (3, 8), rng, n_samples=300, method="ddim", num_steps=20,
      eta=1.0, return_samples=True))(jax.random.key(0))
  assert out["samples"].shape == (300, 3, 8)
  for k in ("median", "mean", "q05", "q95"):
    assert out[k].shape == (3, 8)
  np.testing.assert_allclose(out["samples"].mean(axis=(0, 2)), mus, atol=0.06)
  np.testing.assert_allclose(out["mean"].mean(axis=1), mus, atol=0.06)
  np.testing.assert_allclose(out["median"].mean(axis=1), mus, atol=0.06)
  assert (out["q05"] < out["median"]).all() and (out["median"] < out["q95"]).all()
  # 90 % interval of the chain's Gaussian output: +/- 1.645 std
  std = chain_moments(sched, diffusion.ddim_timesteps(50, 20), 1.0, 0.0, 0.3)[1]
  np.testing.assert_allclose((out["q95"] - out["q05"]).mean(axis=1), 2 * 1.645 * std, rtol=0.1)
  with pytest.raises(ValueError, match="method"):
    diffusion.sample_many(denoise, {"mu": mus}, sched, (3, 8), jax.random.key(0), n_samples=2,
                          method="euler")


def test_tile_batch_is_sample_major():
  x = jnp.arange(6).reshape(3, 2)
  t = diffusion.tile_batch({"a": x, "none": None}, 2)
  assert t["none"] is None
  np.testing.assert_array_equal(t["a"].reshape(2, 3, 2)[1], x)


def test_summarize_hand_example():
  samples = jnp.array([5.0, 1.0, 4.0, 2.0, 3.0]).reshape(5, 1, 1)
  samples = jnp.concatenate([samples, 10 * samples], axis=2)  # (S=5, B=1, 2)
  out = diffusion.summarize(samples)
  np.testing.assert_allclose(out["median"], [[3.0, 30.0]], rtol=1e-6)
  np.testing.assert_allclose(out["mean"], [[3.0, 30.0]], rtol=1e-6)
  np.testing.assert_allclose(out["q05"], [[1.2, 12.0]], rtol=1e-6)
  np.testing.assert_allclose(out["q95"], [[4.8, 48.0]], rtol=1e-6)


def test_x0_clip_bounds_the_samples_of_a_diverging_model():
  sched = diffusion.make_schedule("quad", 50, 1e-4, 0.5)
  bad_eps = lambda x, tau: jnp.full_like(x, 100.0)  # a badly trained predictor
  for method in ("ddim", "ddpm"):
    kw = {"num_steps": 10, "eta": 1.0} if method == "ddim" else {}
    fn = diffusion.sample_ddim if method == "ddim" else diffusion.sample_ddpm
    free = fn(bad_eps, sched, (4, 3, 3, 1), jax.random.key(0), **kw)
    clipped = fn(bad_eps, sched, (4, 3, 3, 1), jax.random.key(0), x0_clip=3.0, **kw)
    assert float(jnp.abs(free).max()) > 100.0
    assert float(jnp.abs(clipped).max()) <= 3.0 + 1e-5
