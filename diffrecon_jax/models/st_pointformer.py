"""ST-PointFormer: self-attention over all spatiotemporal points of the history (paper Sec. IV-C).

The inter-map encoder of Diffusion-C. Every ST-point (slice s, cell i, j) of the incomplete coarse
history becomes one token (eq. 14: value + position + external embedding); K Transformer encoder
layers (eqs. 15-23) relate all t * I * J tokens; the per-point encodings are then placed on the
U-Net bottleneck grid by `grid_stack.stack_to_grid` (eqs. 24-25, done by the caller).

Missing points. Observations are sparse, and nothing sitting in `values` at a missing point may
influence the output:
  * the value embedding at a missing point is replaced by a learned `missing_token` (values there
    are also zeroed before the Dense so junk/NaN cannot leak through gradients either);
  * missing points are masked out as attention keys, so no token reads them; they are still
    queries, carrying position + external + missing-token, and read the observed points.
A learned, always-visible "register" token is appended to the sequence (and dropped on output), so
every query has at least one key even when a whole sample is unobserved: no softmax over an empty
set, no NaN. The key mask has shape (B, 1, 1, L) (a padding-style mask, O(L) memory).

The sequence is padded with masked dummy tokens to a multiple of `seq_multiple` (default 8): the
cuDNN fused kernel needs even lengths when training with a mask/bias, and multiples of 8 tile well.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class EncoderLayer(nn.Module):
  """One attention layer: eq. 21 X_attn = LN(MA(X) + X), eq. 22 FFN ReLU(ReLU(X W1) W2).

  The paper's eq. 22 feeds the FFN output straight into the next layer; here the FFN gets its own
  residual + LayerNorm, LN(X_attn + ReLU(ReLU(X_attn W1) W2)) (post-LN Transformer), which keeps the
  stacked layers trainable. `ffn_residual=False` gives the paper's form.
  """
  d_model: int
  num_heads: int
  ff_dim: int
  dropout: float = 0.0
  attention_impl: str | None = None
  ffn_residual: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray, *,
               deterministic: bool = True) -> jnp.ndarray:
    """x: (B, L, d_model); key_mask: (B, 1, 1, L) bool, True = may be attended to."""
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
    head_dim = self.d_model // self.num_heads
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
    # eq. 15: Q, K, V projections, layout (B, L, heads, head_dim) for jax.nn.dot_product_attention.
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    attn_dtype = q.dtype
    if self.attention_impl == "cudnn" and attn_dtype not in (jnp.bfloat16, jnp.float16):
      attn_dtype = jnp.bfloat16  # the cuDNN fused kernel only runs in half precision
    # eqs. 16-19: scaled dot-product attention per head, masked keys excluded.
    h = jax.nn.dot_product_attention(
        q.astype(attn_dtype), k.astype(attn_dtype), v.astype(attn_dtype), mask=key_mask,
        implementation=self.attention_impl).astype(q.dtype)
    h = nn.DenseGeneral(self.d_model, axis=(-2, -1), dtype=self.dtype, name="out")(h)  # eq. 18
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x + h)  # eq. 21
    f = nn.relu(nn.Dense(self.ff_dim, dtype=self.dtype, name="ff1")(x))  # eq. 22
    f = nn.relu(nn.Dense(self.d_model, dtype=self.dtype, name="ff2")(f))
    f = nn.Dropout(self.dropout)(f, deterministic=deterministic)
    if not self.ffn_residual:
      return f
    return nn.LayerNorm(dtype=self.dtype, name="ln_ff")(x + f)


class STPointFormer(nn.Module):
  """Transformer encoder over the t * I * J ST-points of an incomplete coarse history.

  The learnable position tables (temporal (t, d_model), spatial (I, J, d_model), summed) take their
  shapes from the input at `init`, so a set of parameters fixes t, I and J; applying it to another
  shape raises a ValueError.

  Attributes:
    d_model: token width.
    num_heads: attention heads (d_model % num_heads == 0).
    num_layers: K encoder layers.
    ff_dim: hidden width of the feed-forward network.
    dropout: dropout rate after attention and FFN (active when deterministic=False; needs a
      'dropout' rng).
    attention_impl: passed to jax.nn.dot_product_attention: None / 'xla' / 'cudnn' (GPU fused
      kernel; q, k, v are cast to bfloat16 for it when dtype is float32).
    ffn_residual: residual + LayerNorm around the FFN (see EncoderLayer).
    seq_multiple: pad the token sequence (with masked dummies) to a multiple of this.
    dtype: computation dtype (parameters stay float32).
  """
  d_model: int = 64
  num_heads: int = 8
  num_layers: int = 2
  ff_dim: int = 128
  dropout: float = 0.0
  attention_impl: str | None = None
  ffn_residual: bool = True
  seq_multiple: int = 8
  dtype: Dtype = jnp.float32

  def _table(self, name: str, shape: tuple[int, ...]) -> jnp.ndarray:
    if self.has_variable("params", name):
      found = self.get_variable("params", name).shape
      if found != shape:
        raise ValueError(
            f"STPointFormer: parameter {name!r} has shape {found} but the input needs {shape}; "
            "the position tables fix (t, I, J) at init: re-initialise for this history/grid shape")
    return self.param(name, nn.initializers.normal(0.02), shape)

  @nn.compact
  def __call__(self, values: jnp.ndarray, mask: jnp.ndarray, external: jnp.ndarray | None, *,
               deterministic: bool = True) -> jnp.ndarray:
    """Encodes every ST-point.

    Args:
      values: (B, t, I, J, C) normalised observations; entries at missing points are ignored.
      mask: (B, t, I, J) float or bool, 1 = observed (same for all channels).
      external: (B, t, F) per-slice external features, or None.
      deterministic: disables dropout when True.

    Returns:
      (B, t, I, J, d_model) per-point encodings (eq. 23 output).
    """
    if values.ndim != 5:
      raise ValueError(f"STPointFormer: values must be (B, t, I, J, C), got shape {values.shape}")
    b, t, i, j, _ = values.shape
    if mask.shape != (b, t, i, j):
      raise ValueError(f"STPointFormer: mask must have shape {(b, t, i, j)} (values without the "
                       f"channel axis), got {mask.shape}")
    if external is not None and (external.ndim != 3 or external.shape[:2] != (b, t)):
      raise ValueError(f"STPointFormer: external must be (B={b}, t={t}, F), got {external.shape}")
    observed = (mask > 0.5) if mask.dtype != jnp.bool_ else mask
    obs5 = observed[..., None]

    # eq. 14: value + position + external embeddings.
    clean = jnp.where(obs5, values, 0.0).astype(self.dtype)  # no NaN/junk reaches the Dense
    x_value = nn.Dense(self.d_model, dtype=self.dtype, name="value_embed")(clean)
    missing_token = self.param("missing_token", nn.initializers.normal(0.02), (self.d_model,))
    x = jnp.where(obs5, x_value, missing_token.astype(x_value.dtype))
    x = x + self._table("pos_time", (t, self.d_model))[None, :, None, None, :]
    x = x + self._table("pos_space", (i, j, self.d_model))[None, None]
    if external is not None:
      x_ext = nn.Dense(self.d_model, dtype=self.dtype, name="external_embed")(
          external.astype(self.dtype))
      x = x + x_ext[:, :, None, None, :]

    # Token sequence: ST-points, one register token, masked padding to a multiple.
    n_points = t * i * j
    x = x.reshape(b, n_points, self.d_model)
    register = self.param("register_token", nn.initializers.normal(0.02), (self.d_model,))
    n_pad = (-(n_points + 1)) % max(1, self.seq_multiple)
    x = jnp.concatenate([
        x, jnp.broadcast_to(register.astype(x.dtype), (b, 1, self.d_model)),
        jnp.zeros((b, n_pad, self.d_model), x.dtype)], axis=1)
    key_mask = jnp.concatenate([
        observed.reshape(b, n_points), jnp.ones((b, 1), bool), jnp.zeros((b, n_pad), bool)],
                               axis=1)[:, None, None, :]  # (B, 1, 1, L)

    for layer in range(self.num_layers):  # eqs. 20-23
      x = EncoderLayer(self.d_model, self.num_heads, self.ff_dim, self.dropout,
                       self.attention_impl, self.ffn_residual, self.dtype,
                       name=f"layer_{layer}")(x, key_mask, deterministic=deterministic)
    return x[:, :n_points].reshape(b, t, i, j, self.d_model)
