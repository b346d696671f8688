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

Attention implementation (`attention_impl`). None picks by `jax.default_backend()` at trace time:
on CPU `manual_attention` (below) up to BLOCKWISE_FROM_POINTS points and `blockwise_attention`
above, elsewhere `jax.nn.dot_product_attention`, so XLA / cuDNN can
use fused kernels whose memory is linear in the number of points; 'manual' forces the CPU path,
'xla' / 'cudnn' force jax.nn.dot_product_attention, 'blockwise' takes `blockwise_attention`
(flash-style online softmax over key blocks, memory linear in the number of points: for the
large grids where the (L, L) scores do not fit). On XLA:CPU jax.nn.dot_product_attention with a
boolean mask materialises the (B, heads, L, L) scores several times (transposes, a separate
`where` pass, a copy); `manual_attention` feeds (sample, head) items to a loop, a few at a time,
with the mask as a multiply-add, so each step's scores stay in cache. Both give the same values
and gradients to float32 rounding (tests/test_st_pointformer.py). On CPU the (B, heads, L, L)
weights kept for the backward pass are fine at the configured sizes (15 MB at B = 16, L = 344).
Measured on a 2-core x86 CPU, jax 0.10.2, nytaxi CPU sizes (values (B, 7, 8, 6, 1), ~50%
observed, F = 4, d_model 16, 2 heads, 1 layer, ff_dim 32, L = 344), median ms of 30 calls after
warm-up, each candidate timed on its own: jitted apply, and jitted grad of mean(out ** 2) w.r.t.
the parameters (load average 1-1.6 from other work on the machine; repeat runs vary by ~20%):

                                        fwd B=16   fwd+bwd B=16   fwd B=256
  jax.nn.dot_product_attention (before)   44         73             562
  manual_attention (CPU default now)       7.3       22             117
  PyTorch 2.13 eager twin (SDPA)           9.5       31             145
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ATTENTION_IMPLS = (None, "manual", "blockwise", "xla", "cudnn")

# Score bytes per lax.map step of the manual path, about the L2 cache of a small CPU: at
# L = 344 that is 4 (sample, head) score matrices of 344 x 344 float32.
_CHUNK_BYTES = 2 * 2**20


def _attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, keep: jnp.ndarray) -> jnp.ndarray:
  """Softmax attention of one (sample, head): q, k, v (L, H), keep (1, L) 1/0 -> (L, H).

  Written so XLA:CPU fuses it into few passes over the (L, L) scores: the mask is applied as
  scores * keep + (keep - 1) * big (no `where`/select over the scores; the product keeps the
  gradient at masked keys exactly 0, as `where` does), the max is under stop_gradient (softmax
  does not depend on it), and the row sums divide the (L, H) output rather than the (L, L)
  probabilities.
  """
  big = jnp.asarray(0.5 * jnp.finfo(q.dtype).max, q.dtype)  # finite "infinity"
  s = (q @ k.T) * keep + (keep - 1) * big
  e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
  return (e @ v) / jnp.sum(e, axis=-1, keepdims=True)


def _items(q, k, v, key_mask, name: str) -> tuple:
  """(B, L, heads, H) q (scaled by H^-1/2), k, v -> (B * heads, L, H) items, and the key mask
  (B, 1, 1, L) -> (B * heads, 1, L) 1/0 in q's dtype; a ValueError for a mask of another shape."""
  b, l, n, h = q.shape
  if key_mask.shape != (b, 1, 1, l):
    raise ValueError(f"{name}: key_mask must have shape {(b, 1, 1, l)} (B, 1, 1, L), got "
                     f"{key_mask.shape}")
  items = lambda a: jnp.swapaxes(a, 1, 2).reshape(b * n, l, h)
  keep = jnp.broadcast_to(key_mask.astype(q.dtype), (b, n, 1, l)).reshape(b * n, 1, l)
  return items(q * jnp.asarray(h ** -0.5, q.dtype)), items(k), items(v), keep


def manual_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, key_mask: jnp.ndarray, *,
                     chunk_bytes: int = _CHUNK_BYTES) -> jnp.ndarray:
  """Masked scaled dot-product attention (eqs. 16-19) in cache-sized chunks, for CPUs.

  Equals `jax.nn.dot_product_attention(q, k, v, mask=key_mask)` to float32 rounding, values and
  gradients, also for rows whose keys are all masked (uniform weights there, as in the
  reference). Keys and values at masked positions must be finite (scores there are multiplied
  by 0; the reference also needs finite values). The B * heads (sample, head) items run
  `chunk_bytes` of scores per `lax.map` step, so each step's scores stay in cache: one
  (B, heads, L, L) pass is 3-5x slower on XLA:CPU at B = 256. The forward pass holds at most
  max(chunk_bytes, one item's L * L) bytes of scores; reverse-mode autodiff keeps the
  (B, heads, L, L) weights for the backward pass. That is fine on CPU at the configured sizes (a
  FlashAttention-style custom VJP recomputing them per chunk measured no faster); on GPU use the
  fused kernels of jax.nn.dot_product_attention, whose memory is linear in L.

  Args:
    q, k, v: (B, L, heads, head_dim), the jax.nn.dot_product_attention layout.
    key_mask: (B, 1, 1, L) bool, True = may be attended to.
    chunk_bytes: score bytes per lax.map step (at least one item per step).

  Returns:
    (B, L, heads, head_dim).
  """
  b, l, n, h = q.shape
  dtype = q.dtype
  # (B, L, heads, H) -> (B * heads, L, H) items, each attended with plain 2-D matmuls.
  q, k, v, keep = _items(q, k, v, key_mask, "manual_attention")
  per_step = max(1, chunk_bytes // (l * l * jnp.dtype(dtype).itemsize))
  if per_step >= b * n:
    out = jax.vmap(_attend)(q, k, v, keep)
  else:
    out = jax.lax.map(lambda a: _attend(*a), (q, k, v, keep), batch_size=int(per_step))
  return jnp.swapaxes(out.reshape(b, n, l, h), 1, 2)


# Keys per scan step of `blockwise_attention`, and score bytes per lax.map step (about the L2
# cache of a small CPU). Measured forward + backward, 2-core x86, 2 heads of 8 (benchmarks/
# README.md, "Scaling"): keys 128 / 4 MiB beat 32 and 64 keys and 1, 2 and 8 MiB at L = 1200
# (B = 16), 1792 (B = 16) and 7176 (B = 4).
BLOCK = 128
_BLOCKWISE_CHUNK_BYTES = 4 * 2**20
# On CPU, `attention_impl=None` takes `blockwise_attention` above this many ST-points (padded
# sequence length). Measured forward + backward, median of 9 alternated calls, B = 16: manual /
# blockwise 25 / 54 ms at L = 344 (nytaxi), 43 / 47 at 624, 143 / 96 at 1024, 139 / 149 at
# 1200, 340 / 277 at 1792; memory linear in the points above it (UrbanFM's 32x32 grid, 7,168
# points: the (L, L) scores alone would be 1.6 GiB at batch 4 with 2 heads).
BLOCKWISE_FROM_POINTS = 768


def _block_scores(q, kblk, keep_blk, off_blk):
  """Scores of every query against one key block: q (X, L, H), kblk (X, k, H), keep_blk /
  off_blk (X, 1, k) -> (X, L, k); masked keys get a finite "minus infinity" (see below)."""
  return jnp.einsum("xqh,xkh->xqk", q, kblk) * keep_blk + off_blk


def _flash_forward(q, kb, vb, keep_b, off_b, big):
  """Online softmax over the key blocks (lax.scan): q (X, L, H); kb, vb (nb, X, k, H); keep_b,
  off_b (nb, X, 1, k) -> (out (X, L, H), row max m (X, L, 1), 1 / row sum inv (X, L, 1))."""
  def step(carry, blk):
    m, total, acc = carry
    kblk, vblk, keep_blk, off_blk = blk
    s = _block_scores(q, kblk, keep_blk, off_blk)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - m_new)
    rescale = jnp.exp(m - m_new)
    return (m_new, total * rescale + jnp.sum(e, axis=-1, keepdims=True),
            acc * rescale + jnp.einsum("xqk,xkh->xqh", e, vblk)), None
  rows = q.shape[:2] + (1,)
  init = (jnp.full(rows, -big, q.dtype), jnp.zeros(rows, q.dtype), jnp.zeros(q.shape, q.dtype))
  (m, total, acc), _ = jax.lax.scan(step, init, (kb, vb, keep_b, off_b))
  inv = 1.0 / total
  return acc * inv, m, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, kb, vb, keep_b, off_b, big):
  return _flash_forward(q, kb, vb, keep_b, off_b, big)[0]


def _flash_fwd(q, kb, vb, keep_b, off_b, big):
  out, m, inv = _flash_forward(q, kb, vb, keep_b, off_b, big)
  return out, (q, kb, vb, keep_b, off_b, out, m, inv)


def _flash_bwd(big, residuals, d_out):
  """FlashAttention-2's backward: each key block's probabilities recomputed from the saved row
  max and sum, p = exp(s - m) / sum; dV = p^T dO, dS = p (dO V^T - rowsum(dO O)), dQ = dS K,
  dK = dS^T Q (times the key mask: the score is s * keep + offset)."""
  del big
  q, kb, vb, keep_b, off_b, out, m, inv = residuals
  delta = jnp.sum(d_out * out, axis=-1, keepdims=True)                     # (X, L, 1)

  def step(dq, blk):
    kblk, vblk, keep_blk, off_blk = blk
    p = jnp.exp(_block_scores(q, kblk, keep_blk, off_blk) - m) * inv        # (X, L, k)
    dv = jnp.einsum("xqk,xqh->xkh", p, d_out)
    ds = p * (jnp.einsum("xqh,xkh->xqk", d_out, vblk) - delta) * keep_blk
    dk = jnp.einsum("xqk,xqh->xkh", ds, q)
    return dq + jnp.einsum("xqk,xkh->xqh", ds, kblk), (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(q), (kb, vb, keep_b, off_b))
  return dq, dk, dv, jnp.zeros_like(keep_b), jnp.zeros_like(off_b)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, key_mask: jnp.ndarray,
                        *, block: int = BLOCK, chunk_bytes: int = _BLOCKWISE_CHUNK_BYTES
                        ) -> jnp.ndarray:
  """Masked scaled dot-product attention (eqs. 16-19) with memory linear in L (flash-style).

  The (sample, head) items go `lax.map` a few at a time (as many as keep one step's
  (items, L, block) scores within `chunk_bytes`, so they stay in cache); within a step every
  query meets the keys `block` at a time (`lax.scan`) with an online softmax (running max,
  running sum and running output, each rescaled when the max grows), so no (L, L) score matrix
  exists. The gradient is a custom VJP (FlashAttention-2's backward, `_flash_bwd`): a second
  scan over the key blocks recomputes each block's probabilities from the saved row max and
  sum, instead of reverse-mode through the forward scan, which kept and re-read every step's
  rescalings (measured in benchmarks/README.md, "Scaling"). Forward and backward hold
  O(L * block) per item. Equals `manual_attention` (and `jax.nn.dot_product_attention`) to
  float32 rounding, values and gradients, also for rows whose keys are all masked (uniform over
  the L real keys). The keys are padded to a multiple of `block` with keys that weigh nothing
  even then (scores below the masked ones' finite "minus infinity").

  Args:
    q, k, v: (B, L, heads, head_dim); key_mask: (B, 1, 1, L) bool, True = may be attended to.
    block: keys per scan step; chunk_bytes: score bytes per `lax.map` step (at least one item).
  Returns:
    (B, L, heads, head_dim).
  """
  b, l, n, h = q.shape
  dtype = q.dtype
  block = max(1, min(int(block), l))
  nb = -(-l // block)
  pad = nb * block - l
  qi, ki, vi, keep = _items(q, k, v, key_mask, "blockwise_attention")
  ki, vi = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (ki, vi))
  big = float(0.5 * jnp.finfo(dtype).max)
  keep = jnp.pad(keep, ((0, 0), (0, 0), (0, pad)))
  # Score offsets: 0 for a key that may be read, -big for a masked one, -1.5 big for padding.
  real = jnp.pad(jnp.ones((1, 1, l), dtype), ((0, 0), (0, 0), (0, pad)))
  offset = (keep - 1) * big + (real - 1) * (0.5 * big)
  blocks = lambda a: a.reshape(a.shape[0], nb, block, a.shape[-1]).swapaxes(0, 1)
  keep_b = keep.reshape(b * n, 1, nb, block).transpose(2, 0, 1, 3)  # (nb, B*n, 1, block)
  off_b = offset.reshape(b * n, 1, nb, block).transpose(2, 0, 1, 3)
  items = b * n
  per_step = int(min(items, max(1, chunk_bytes // (l * block * jnp.dtype(dtype).itemsize))))
  steps = -(-items // per_step)
  # Items padded to whole steps (zeros with every key masked: finite, dropped below).
  extra = steps * per_step - items
  grow = lambda a, axis: jnp.pad(a, [(0, extra if i == axis else 0) for i in range(a.ndim)])
  group = lambda a, axis: jnp.moveaxis(
      grow(a, axis).reshape(a.shape[:axis] + (steps, per_step) + a.shape[axis + 1:]), axis, 0)
  args = (group(qi, 0), group(blocks(ki), 1), group(blocks(vi), 1), group(keep_b, 1),
          group(off_b, 1))
  out = jax.lax.map(lambda a: _flash(*a, big), args)                 # (steps, per_step, L, H)
  out = out.reshape((steps * per_step,) + out.shape[2:])[:items]
  return jnp.swapaxes(out.reshape(b, n, l, h), 1, 2)


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
    # eqs. 16-19: scaled dot-product attention per head, masked keys excluded.
    impl = self.attention_impl
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl is None and jax.default_backend() == "cpu":
      # CPU: cache-sized chunks while the (L, L) scores kept for the backward pass stay small;
      # beyond BLOCKWISE_FROM_POINTS, memory linear in the ST-points.
      impl = "manual" if x.shape[1] <= BLOCKWISE_FROM_POINTS else "blockwise"
    if impl == "manual":
      h = manual_attention(q, k, v, key_mask)
    elif impl == "blockwise":  # memory linear in the ST-points (large grids)
      h = blockwise_attention(q, k, v, key_mask)
    else:
      attn_dtype = q.dtype
      if impl == "cudnn" and attn_dtype not in (jnp.bfloat16, jnp.float16):
        attn_dtype = jnp.bfloat16  # the cuDNN fused kernel only runs in half precision
      h = jax.nn.dot_product_attention(
          q.astype(attn_dtype), k.astype(attn_dtype), v.astype(attn_dtype), mask=key_mask,
          implementation=impl).astype(q.dtype)
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
    attention_impl: None (fastest for the backend: 'manual' when jax.default_backend() is
      'cpu' at trace time, else jax.nn.dot_product_attention's own choice), 'manual'
      (`manual_attention`, any backend), or 'xla' / 'cudnn' passed to
      jax.nn.dot_product_attention ('cudnn': GPU fused kernel; q, k, v are cast to bfloat16 for it
      when dtype is float32).
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
