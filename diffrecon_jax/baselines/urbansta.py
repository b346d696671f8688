"""UrbanSTA (R. Wang, Y. Liu, Y. Gong, W. Liu, M. Chen, Y. Yin, Y. Zheng: "Fine-grained urban
flow inference with unobservable data via spacetime attraction learning", IEEE ICDM 2023; the
DiffRecon paper's reference [13]) as a deterministic baseline, as the DiffRecon paper describes
it: a completion network (STA) with a spatiotemporal attention encoder, then a fine-grained
inference network (FIN), trained separately and then jointly.

STA: the window of `history + 1` coarse maps ending at the current slice, hidden cells zero-filled
(0 = the train mean after z-scoring) with the observation mask as an extra channel and the
window's external features added per slice, is embedded per cell and slice, then passes through
`num_layers` encoder layers of temporal multi-head self-attention (each cell across the window),
spatial multi-head self-attention (each slice across the cells) and a feed-forward block (each
with a residual and layer norm). The current slice's tokens give the completed current map; the
observed cells keep their observed values.
FIN: UrbanFM (`urbanfm.UrbanFM`, with its N^2-Normalization) on the completed coarse map and the
current slice's external features, so each N x N block of the fine map pools exactly to its
completed coarse cell.
Training ("two stages" in the paper: the networks separately, then together): stage 1 trains STA
on train-split windows under masks drawn afresh for every window from `config.patterns.train`
(`patterns.sample_train_masks`, exactly as Diffusion-C's training draws them: a new random layout
per window for `fixed`, so the evaluation's layout is as likely as any other), its loss on the
hidden cells (`loss_on_hidden`) or on every cell; stage 2 trains FIN on the complete coarse maps
of the train split -> their fine maps;
stage 3 fine-tunes both on masked windows with the fine loss plus `completion_weight` times the
completion loss. Adam, MSE, random batches, a fixed number of steps per stage and a seed.

Simplified or guessed (the paper's code and sizes were not at hand): learned position embeddings
(slice of the window, cell of the grid) instead of the paper's encodings; one post-norm
encoder layer type stacked `num_layers` times; widths, depths and steps sized for a 2-core CPU
(configs/default.py `c.urbansta`); windows reaching before the first slice repeat the first map
and windows across holes in the time axis are taken as they are stored; cells that are NaN in the
data count as hidden inputs and carry no loss.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffrecon_jax import batching
from diffrecon_jax.baselines import adam, supervised, urbanfm
from diffrecon_jax.data import patterns as patterns_lib


def window_indices(slices: np.ndarray, history: int) -> np.ndarray:
  """(n,) current slices -> (n, history + 1) indices of their windows, oldest first; indices
  before the series' start are clipped to 0 (the first map repeated)."""
  slices = np.asarray(slices, np.int64)
  return np.maximum(slices[:, None] + np.arange(-history, 1)[None, :], 0)


class _EncoderLayer(nn.Module):
  """Temporal, then spatial self-attention, then a feed-forward block on (B, W, S, D) tokens
  (W slices of the window, S cells of the grid)."""
  num_heads: int
  ff_dim: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    d = h.shape[-1]
    attend = lambda: nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=d,
                                                     out_features=d)
    # Temporal: each cell attends over the slices of its window.
    ht = jnp.swapaxes(h, 1, 2)  # (B, S, W, D)
    ht = nn.LayerNorm()(ht + attend()(ht, ht))
    h = jnp.swapaxes(ht, 1, 2)
    # Spatial: each slice's cells attend over each other.
    h = nn.LayerNorm()(h + attend()(h, h))
    ff = nn.Dense(d)(nn.relu(nn.Dense(self.ff_dim)(h)))
    return nn.LayerNorm()(h + ff)


class STA(nn.Module):
  """Completion network: (B, W, I, J, C) normalised coarse window (0 where hidden), (B, W, I, J)
  mask (1 = observed), (B, W, F) external features -> (B, I, J, C) normalised prediction of the
  current (last) map at every cell."""
  channels: int
  features: int = 32
  num_heads: int = 4
  num_layers: int = 2
  ff_dim: int = 64

  @nn.compact
  def __call__(self, obs: jax.Array, mask: jax.Array, external: jax.Array) -> jax.Array:
    b, w, i, j, c = obs.shape
    x = jnp.concatenate([obs * mask[..., None], mask[..., None]], -1).reshape(b, w, i * j, c + 1)
    h = nn.Dense(self.features, name="embed")(x)
    h = h + nn.Dense(self.features, name="external")(external)[:, :, None]
    h = h + self.param("slice_pos", nn.initializers.normal(0.02), (w, 1, self.features))
    h = h + self.param("cell_pos", nn.initializers.normal(0.02), (1, i * j, self.features))
    for _ in range(self.num_layers):
      h = _EncoderLayer(self.num_heads, self.ff_dim)(h)
    return nn.Dense(self.channels, name="out")(h[:, -1]).reshape(b, i, j, self.channels)


def merge_observed(pred: jax.Array, obs: jax.Array, mask: jax.Array) -> jax.Array:
  """(B, I, J, C) prediction, current observed map and (B, I, J) mask -> observed where
  observed, predicted elsewhere (the completed map)."""
  m = mask[..., None]
  return m * obs + (1.0 - m) * pred


def _weighted_mse(pred, target, weight):
  """Mean squared error over the cells with weight 1 (weight broadcasts against pred)."""
  weight = jnp.broadcast_to(weight, pred.shape)
  return jnp.sum(weight * (pred - target) ** 2) / jnp.maximum(jnp.sum(weight), 1.0)


class UrbanSTAMethod:
  """UrbanSTA as an evaluated method (`evaluate.evaluate_method`'s contract).

  Args:
    features, num_heads, num_layers, ff_dim: STA's width, heads, encoder layers, feed-forward width.
    fin_features, fin_blocks: FIN's (UrbanFM's) width and residual blocks.
    steps_sta, steps_fin, steps_joint: Adam steps of stages 1, 2, 3 (0 skips a stage).
    batch_size: windows / maps per step.
    lr: stages 1-2's Adam rate; lr_joint: stage 3's.
    loss_on_hidden: STA's loss on the hidden cells only (else on every valid cell).
    completion_weight: weight of the completion loss beside the fine loss in stage 3.
    train_patterns: pattern specs of the stage 1 and 3 training masks.
    seed: initialisation, training masks and batches.
    eval_batch: windows per network call at reconstruction.
    log_every: training log cadence (0 = silent).
  """

  name = "urbansta"
  sampler = None

  def __init__(self, *, features: int = 32, num_heads: int = 4, num_layers: int = 2,
               ff_dim: int = 64, fin_features: int = 32, fin_blocks: int = 4,
               steps_sta: int = 1000, steps_fin: int = 1000, steps_joint: int = 500,
               batch_size: int = 32, lr: float = 1e-3, lr_joint: float = 2e-4,
               loss_on_hidden: bool = True, completion_weight: float = 1.0,
               train_patterns: tuple = ("random:0.4",), seed: int = 0, eval_batch: int = 256,
               log_every: int = 0):
    for label, v in (("features", features), ("num_heads", num_heads),
                     ("num_layers", num_layers), ("ff_dim", ff_dim),
                     ("fin_features", fin_features), ("batch_size", batch_size),
                     ("eval_batch", eval_batch)):
      if int(v) < 1:
        raise ValueError(f"urbansta: {label} must be positive, got {v}")
    if features % num_heads:
      raise ValueError(f"urbansta: num_heads ({num_heads}) must divide features ({features})")
    for label, v in (("fin_blocks", fin_blocks), ("steps_sta", steps_sta),
                     ("steps_fin", steps_fin), ("steps_joint", steps_joint),
                     ("log_every", log_every)):
      if int(v) < 0:
        raise ValueError(f"urbansta: {label} must be >= 0, got {v}")
    if not (lr > 0 and lr_joint > 0 and completion_weight >= 0):
      raise ValueError(f"urbansta: lr ({lr}) and lr_joint ({lr_joint}) must be positive and "
                       f"completion_weight ({completion_weight}) >= 0")
    if (steps_sta or steps_joint) and not train_patterns:
      raise ValueError("urbansta: stages 1 and 3 need training patterns (config.patterns.train)")
    self.train_patterns = tuple(train_patterns)
    for spec in self.train_patterns:
      patterns_lib.parse_pattern(spec)
    self.sta = STA(0, int(features), int(num_heads), int(num_layers), int(ff_dim))  # channels set in fit
    self.fin_features, self.fin_blocks = int(fin_features), int(fin_blocks)
    self.steps = {"sta": int(steps_sta), "fin": int(steps_fin), "joint": int(steps_joint)}
    self.batch_size, self.lr, self.lr_joint = int(batch_size), float(lr), float(lr_joint)
    self.loss_on_hidden, self.completion_weight = bool(loss_on_hidden), float(completion_weight)
    self.seed, self.eval_batch, self.log_every = int(seed), int(eval_batch), int(log_every)
    self._key = None
    self.params = None
    self.losses = {}  # stage -> (steps,) float32 batch losses before each update

  # ---- training ----

  def _networks(self, view) -> tuple:
    """(STA, FIN) modules for the view's shapes and normalisers."""
    sta = self.sta.clone(channels=view.channels)
    fin = urbanfm.UrbanFM(
        view.scale, view.channels, tuple(map(float, view.coarse_norm.mean)),
        tuple(map(float, view.coarse_norm.std)), tuple(map(float, view.fine_norm.mean)),
        tuple(map(float, view.fine_norm.std)), view.aggregation, self.fin_features,
        self.fin_blocks)
    return sta, fin

  def _train_arrays(self, view) -> dict:
    """The train split as device arrays: coarse (T, I, J, C) normalised with NaN -> 0, valid
    (T, I, J), fine (T, H, W, C) normalised with NaN -> 0 and its weights, external (T, F),
    and the training patterns encoded for `patterns.sample_train_masks`."""
    v0 = int(view.split.val_start)
    if view.train_fine.shape[0] != v0 or view.train_coarse.shape[0] != v0:
      raise ValueError(f"urbansta: train_fine / train_coarse have {view.train_fine.shape[0]} / "
                       f"{view.train_coarse.shape[0]} slices, the training split {v0}")
    raw = np.asarray(view.train_coarse, np.float32)
    coarse, _ = supervised.finite_or_zero(view.coarse_norm.apply(raw))
    valid = np.isfinite(raw).all(-1).astype(np.float32)
    fine, fine_w = supervised.finite_or_zero(
        view.fine_norm.apply(np.asarray(view.train_fine, np.float32)))
    patterns = [patterns_lib.parse_pattern(spec) for spec in self.train_patterns
                ] or [patterns_lib.parse_pattern("random:0.0")]
    kinds, ratios, *layouts = patterns_lib.encode_train_patterns(patterns, view.coarse_shape)
    arrays = dict(coarse=coarse, valid=valid, fine=fine, fine_w=fine_w,
                  external=np.asarray(view.external[:v0], np.float32), kinds=kinds,
                  ratios=ratios, layouts=layouts[0] if layouts else None)
    return {k: None if v is None else jnp.asarray(v) for k, v in arrays.items()}

  def _masked_batch(self, data, key, history: int) -> dict:
    """A random batch of train windows, each under a mask drawn from a random training
    pattern (`patterns.sample_train_masks`; cells NaN in the data count as hidden)."""
    k_t, k_p = jax.random.split(key)
    n = data["coarse"].shape[0]
    t = jax.random.randint(k_t, (self.batch_size,), 0, n)
    win = jnp.maximum(t[:, None] + jnp.arange(-history, 1)[None, :], 0)  # (B, W)
    drawn = patterns_lib.sample_train_masks(k_p, self.batch_size, history + 1,
                                            data["coarse"].shape[1:3], data["kinds"],
                                            data["ratios"], data["layouts"])
    mask = drawn * data["valid"][win]
    return dict(obs=data["coarse"][win], mask=mask, external=data["external"][win],
                ext_now=data["external"][t], target=data["coarse"][t],
                valid=data["valid"][t], fine=data["fine"][t], fine_w=data["fine_w"][t])

  def _completion_loss(self, pred, batch):
    """Normalised MSE of the current map on the hidden (or all) valid cells."""
    weight = batch["valid"] * ((1.0 - batch["mask"][:, -1]) if self.loss_on_hidden else 1.0)
    return _weighted_mse(pred, batch["target"], weight[..., None])

  def _adam(self, stage: str, params, loss_fn, lr: float, seed: int):
    """`steps[stage]` Adam steps (`adam.minimise`) of loss_fn(params, key) -> scalar; returns
    the params and records the losses in self.losses[stage]."""
    # The train arrays stay closed over (no data argument): the compiled step is as before.
    params, self.losses[stage] = adam.minimise(
        params, lambda p, _, key: loss_fn(p, key), (), steps=self.steps[stage], lr=lr,
        key=jax.random.PRNGKey(seed), log_every=self.log_every, name=f"urbansta {stage}")
    return params

  def fit(self, view) -> None:
    """Trains the three stages on `view`'s train split (once per distinct train split)."""
    key = supervised.train_key(view)
    if key == self._key:
      return
    sta, fin = self._networks(view)
    data = self._train_arrays(view)
    hist = int(view.history)
    w = hist + 1
    (i, j), c, f = view.coarse_shape, view.channels, data["external"].shape[-1]
    k_sta, k_fin = jax.random.split(jax.random.PRNGKey(self.seed))
    # Jitted: eager initialisation runs op by op, several times slower on CPU.
    params = {"sta": jax.jit(sta.init)(k_sta, jnp.zeros((1, w, i, j, c)),
                                       jnp.ones((1, w, i, j)), jnp.zeros((1, w, f))),
              "fin": jax.jit(fin.init)(k_fin, jnp.zeros((1, i, j, c)), jnp.zeros((1, f)))}
    logging.info("urbansta: training %s steps (sta, fin, joint) on %d train maps",
                 tuple(self.steps.values()), data["coarse"].shape[0])

    def sta_loss(p, key):
      batch = self._masked_batch(data, key, hist)
      return self._completion_loss(sta.apply(p, batch["obs"], batch["mask"], batch["external"]),
                                   batch)

    def fin_loss(p, key):
      # Complete coarse maps -> fine maps (cells NaN in the data enter as the train mean).
      t = jax.random.randint(key, (self.batch_size,), 0, data["coarse"].shape[0])
      out = fin.apply(p, data["coarse"][t], data["external"][t])
      return _weighted_mse(out, data["fine"][t], data["fine_w"][t])

    def joint_loss(p, key):
      batch = self._masked_batch(data, key, hist)
      pred = sta.apply(p["sta"], batch["obs"], batch["mask"], batch["external"])
      completed = merge_observed(pred, batch["obs"][:, -1], batch["mask"][:, -1])
      fine = fin.apply(p["fin"], completed, batch["ext_now"])
      return (_weighted_mse(fine, batch["fine"], batch["fine_w"])
              + self.completion_weight * self._completion_loss(pred, batch))

    params["sta"] = self._adam("sta", params["sta"], sta_loss, self.lr, self.seed + 1)
    params["fin"] = self._adam("fin", params["fin"], fin_loss, self.lr, self.seed + 2)
    self.params = self._adam("joint", params, joint_loss, self.lr_joint, self.seed + 3)

    def apply(p, obs, mask, external, ext_now):
      pred = sta.apply(p["sta"], obs, mask, external)
      completed = merge_observed(pred, obs[:, -1], mask[:, -1])
      return completed, fin.apply(p["fin"], completed, ext_now)

    self._apply = jax.jit(apply)
    self._key = key

  # ---- reconstruction ----

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """slices (n,) -> dict(coarse (n, I, J, C): the completed maps, observed cells as observed,
    fine (n, N*I, N*J, C) float32, both physical; samples None). Trains first if needed."""
    self.fit(view)
    slices = np.asarray(slices, np.int64)
    win = window_indices(slices, int(view.history))
    obs = np.asarray(view.coarse_obs_norm)  # 0 where hidden or NaN in the data
    mask = np.asarray(view.mask, np.float32)
    ext = np.asarray(view.external, np.float32)
    inputs = (obs[win], mask[win], ext[win], ext[slices])
    coarse, fine = batching.run_batched(lambda *part: self._apply(self.params, *part), inputs,
                                        min(self.eval_batch, len(slices)))
    coarse = view.coarse_norm.inverse(coarse).astype(np.float32)
    observed = view.mask[slices][..., None] > 0
    coarse = np.where(observed, view.coarse_obs[slices], coarse).astype(np.float32)
    fine = view.fine_norm.inverse(fine).astype(np.float32)
    return {"coarse": coarse, "fine": fine, "samples": None}


def build(config) -> UrbanSTAMethod:
  """UrbanSTA with its hyperparameters from `config.urbansta` (a step count or batch size of -1:
  DiffRecon's counterpart in `config.train`, for equal terms), its seed from `config.seed` and its
  training masks from `config.patterns.train`."""
  u, t = config.urbansta, config.train
  same = supervised.as_diffrecons
  return UrbanSTAMethod(
      features=int(u.features), num_heads=int(u.num_heads), num_layers=int(u.num_layers),
      ff_dim=int(u.ff_dim), fin_features=int(u.fin_features), fin_blocks=int(u.fin_blocks),
      steps_sta=same(u.steps_sta, t.steps_c), steps_fin=same(u.steps_fin, t.steps_f),
      steps_joint=same(u.steps_joint, t.steps_joint), batch_size=same(u.batch_size, t.batch_size),
      lr=float(u.lr), lr_joint=float(u.lr_joint),
      loss_on_hidden=bool(u.loss_on_hidden), completion_weight=float(u.completion_weight),
      train_patterns=tuple(config.patterns.train), seed=int(config.seed),
      eval_batch=int(u.eval_batch), log_every=int(u.log_every))
