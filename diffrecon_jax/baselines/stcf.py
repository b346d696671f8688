"""STCF (X. Xu, Z. Wang, Q. Gao, T. Zhong, B. Hui, F. Zhou, G. Trajcevski: "Spatial-temporal
contrasting for fine-grained urban flow inference", IEEE Transactions on Big Data 2023; the
DiffRecon paper's reference [23]) as a deterministic baseline.

STCF pre-trains two encoders of the coarse maps without labels, by contrast, then fine-tunes a
network that integrates their features into fine-grained inference:
  - the spatial encoder learns which regions of a map are which: two augmented views of one map
    (cells hidden at random, noise added) are encoded cell by cell, and each cell's embedding
    must pick the same cell of the other view among all cells of that map (InfoNCE);
  - the temporal encoder learns how maps follow one another: the pooled embedding of the map at
    slice t must pick the map at slice t+1 among the other maps of the batch (InfoNCE).
Fine-tuning (`urbanfm.UrbanFM`'s frame: external subnet, distributional upsampling, the
N^2-Normalization) starts from the pre-trained encoders and trains everything on the supervised
loss; their features join UrbanFM's residual trunk through a 1x1 convolution.

Changed or guessed: the paper's spatial pretext task contrasts regions and its temporal one
contrasts time-shifted sequences; here both are one-map InfoNCE tasks as above (a view of the
task that fits the shared single-map training loop of `supervised.py`); the encoders are a 3x3
convolution and two residual blocks each (`stcf_encoder_features` wide); the temperature, the
augmentations and the pre-training budget are ours (configs/default.py); pre-training reads the
train split's inputs only, as the supervised training does.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffrecon_jax.baselines import adam, urbanfm


class Encoder(nn.Module):
  """(B, I, J, C) normalised coarse maps -> (B, I, J, features) per-cell features."""
  features: int
  num_blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(nn.Conv(self.features, (3, 3))(x))
    for _ in range(self.num_blocks):
      h = urbanfm._ResBlock(self.features)(h)
    return h


class STCF(urbanfm.UrbanFM):
  """UrbanFM whose trunk also reads the pre-trained spatial and temporal encoders:
  (B, I, J, C) normalised coarse maps and (B, F) external features -> (B, N*I, N*J, C)
  normalised fine maps that pool exactly to the coarse input."""
  encoder_features: int = 16  # ours (CPU budget; see configs/default.py)

  def _trunk(self, x: jax.Array, first: jax.Array) -> jax.Array:
    h = super()._trunk(x, first)
    learned = jnp.concatenate([Encoder(self.encoder_features, name="spatial_encoder")(x),
                               Encoder(self.encoder_features, name="temporal_encoder")(x)], -1)
    return h + nn.Conv(self.features, (1, 1), name="fuse")(learned)


class _ContrastiveNet(nn.Module):
  """An encoder and its projection head (the head is dropped after pre-training)."""
  features: int

  def setup(self):
    self.encoder = Encoder(self.features)
    self.head_hidden = nn.Dense(self.features)
    self.head_out = nn.Dense(self.features)

  def __call__(self, x: jax.Array, pool: bool) -> jax.Array:
    """(B, I, J, C) -> unit-norm embeddings: (B, features) pooled, else (B, I*J, features)."""
    h = self.encoder(x)
    h = h.mean(axis=(1, 2)) if pool else h.reshape(h.shape[0], -1, h.shape[-1])
    z = self.head_out(nn.relu(self.head_hidden(h)))
    # rsqrt(|z|^2 + eps), not z / max(|z|, eps): the norm's gradient at z = 0 is NaN.
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)


def info_nce(anchor: jax.Array, positive: jax.Array, temperature: float) -> jax.Array:
  """(..., K, D) unit embeddings whose k-th rows are positives of each other (every other row a
  negative) -> the mean symmetric InfoNCE loss (cross-entropy of picking the right row)."""
  logits = jnp.einsum("...kd,...ld->...kl", anchor, positive) / temperature
  labels = jnp.arange(logits.shape[-1])
  ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(
      lg, jnp.broadcast_to(labels, lg.shape[:-1])).mean()
  return 0.5 * (ce(logits) + ce(jnp.swapaxes(logits, -1, -2)))


def _augment(key: jax.Array, x: jax.Array, hide: float, noise: float) -> jax.Array:
  """Hides a `hide` share of the cells (set to 0, the train mean after z-scoring) and adds
  Gaussian noise of std `noise`: (B, I, J, C) -> the same shape."""
  k1, k2 = jax.random.split(key)
  keep = jax.random.bernoulli(k1, 1.0 - hide, x.shape[:-1] + (1,))
  return jnp.where(keep, x, 0.0) + noise * jax.random.normal(k2, x.shape)


def pretrain_encoder(task: str, x: np.ndarray, copies: int, *, features: int, steps: int,
                     batch_size: int, lr: float, temperature: float, seed: int,
                     hide: float = 0.3, noise: float = 0.1, log_every: int = 0) -> tuple:
  """Contrastive pre-training of one encoder.

  Args:
    task: "spatial" (cell vs cell across two augmented views of a map) or "temporal" (the map at
      slice t vs the map at t+1 across a batch).
    x: (copies * T, I, J, C) normalised training inputs, `copies` stacks of T consecutive slices.
    features, steps, batch_size, lr, temperature, seed: the encoder's width and the budget.
    hide, noise: the augmentation (spatial task; the temporal one uses it at half strength).
  Returns:
    (the encoder's params (an `Encoder(features)` variable dict), losses (steps,) float32).
  """
  if task not in ("spatial", "temporal"):
    raise ValueError(f"task must be 'spatial' or 'temporal', got {task!r}")
  n = x.shape[0]
  if copies < 1 or n % copies or n // copies < 2:
    raise ValueError(f"x has {n} maps, not {copies} stacks of at least 2 consecutive slices")
  per_copy = n // copies
  data = jnp.asarray(x, jnp.float32)
  net = _ContrastiveNet(features)
  key_init, key_run = jax.random.split(jax.random.PRNGKey(seed))
  params = net.init(key_init, data[:1], task == "temporal")

  def loss_fn(p, data, key):
    k_idx, k_copy, k1, k2 = jax.random.split(key, 4)
    if task == "spatial":
      batch = data[jax.random.randint(k_idx, (batch_size,), 0, n)]
      views = (_augment(k1, batch, hide, noise), _augment(k2, batch, hide, noise))
    else:
      # Anchors t and positives t+1 from the same stack (never across a stack's end).
      t = jax.random.randint(k_idx, (batch_size,), 0, per_copy - 1)
      idx = jax.random.randint(k_copy, (batch_size,), 0, copies) * per_copy + t
      views = (_augment(k1, data[idx], hide / 2, noise / 2),
               _augment(k2, data[idx + 1], hide / 2, noise / 2))
    za, zb = (net.apply(p, v, task == "temporal") for v in views)
    return info_nce(za, zb, temperature)

  params, losses = adam.minimise(params, loss_fn, data, steps=steps, lr=lr, key=key_run,
                                 log_every=log_every, name=f"stcf {task} pre-training")
  return {"params": params["params"]["encoder"]}, losses


class Pretrainer:
  """The `prepare` hook of `supervised.train_network` for STCF: pre-trains the spatial and
  temporal encoders on the training inputs and writes them into the freshly initialised STCF
  parameters. Keeps each task's loss curve (`losses`: task -> (steps,) float32)."""

  def __init__(self, *, features: int, steps: int, batch_size: int, lr: float,
               temperature: float, seed: int, log_every: int = 0):
    self.kw = dict(features=int(features), steps=int(steps), batch_size=int(batch_size),
                   lr=float(lr), temperature=float(temperature), log_every=int(log_every))
    self.seed = int(seed)
    self.losses = {}

  def __call__(self, params: dict, inputs: np.ndarray, copies: int) -> dict:
    """params: STCF's initial variables; inputs (copies * T, I, J, C) normalised -> params with
    `spatial_encoder` and `temporal_encoder` replaced by the pre-trained ones."""
    out = {"params": dict(params["params"])}
    for k, task in enumerate(("spatial", "temporal")):
      enc, self.losses[task] = pretrain_encoder(task, inputs, copies, seed=self.seed + 1 + k,
                                                **self.kw)
      name = f"{task}_encoder"
      shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
      if shapes(enc["params"]) != shapes(out["params"][name]):
        raise ValueError(f"pre-trained {name} does not match STCF's (encoder_features differ?)")
      out["params"][name] = enc["params"]
    return out
