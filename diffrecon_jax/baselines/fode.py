"""FODE (Zhou, Li, Zhong, Trajcevski, Zhang et al.: "Enhancing Urban Flow Maps via Neural ODEs",
IJCAI 2020) as a deterministic baseline network.

FODE keeps UrbanFM's frame (external-factor subnet, distributional upsampling, the
N^2-Normalization: `urbanfm.UrbanFM`) and replaces its stack of residual blocks by a neural-ODE
feature block: the features h(0) from the first convolution evolve by dh/dtau = f(h, tau) over
tau in [0, 1], and h(1) goes on to the upsampling. The vector field f is an affine coupling:
the channels split into halves (a, b), and

    da/dtau = tanh(s_a(b, tau)) * a + t_a(b, tau),    db/dtau = tanh(s_b(a, tau)) * b + t_b(a, tau),

where s and t are small convolutional networks of the *other* half and of tau (one extra
channel). The coupling is the paper's remedy for the numerical instability of a plain
convolutional field: each half's rate is affine in itself, with a bounded gain.
One field, one set of parameters, for every solver step (an ODE, not a deeper network).

Changed or guessed: a fixed-step classical Runge-Kutta (RK4) solver with `ode_steps` steps
(FODE: an adaptive solver with the adjoint method; a fixed grid compiles to one static graph and
gradients flow through the solver directly, affordable at these widths, so diffrax would bring a
dependency without earning it); s and t share one 3x3 convolution per half after a 3x3 hidden
convolution; widths scaled down for CPU as `urbanfm.py` (configs/default.py: `fode_features`,
`fode_ode_steps`); batch normalisation left out.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffrecon_jax.baselines import urbanfm


class AffineCouplingField(nn.Module):
  """The ODE's vector field f(h, tau): (B, I, J, F) features (F even) and a scalar tau ->
  dh/dtau of the same shape, each half affine in itself and conditioned on the other half."""
  features: int

  def _scale_shift(self, other: jax.Array, tau: jax.Array, name: str) -> tuple:
    """(B, I, J, F/2) conditioning half and tau -> (tanh gain, shift), each (B, I, J, F/2)."""
    half = self.features // 2
    t = jnp.broadcast_to(tau, other.shape[:-1] + (1,)).astype(other.dtype)
    g = nn.relu(nn.Conv(half, (3, 3), name=f"{name}_hidden")(jnp.concatenate([other, t], -1)))
    # Zero-initialised output: the field starts at zero, the block starts as the identity map.
    st = nn.Conv(2 * half, (3, 3), kernel_init=nn.initializers.zeros, name=f"{name}_st")(g)
    return jnp.tanh(st[..., :half]), st[..., half:]

  @nn.compact
  def __call__(self, h: jax.Array, tau: jax.Array) -> jax.Array:
    if self.features % 2 or h.shape[-1] != self.features:
      raise ValueError(f"AffineCouplingField: features must be even and equal the input's "
                       f"channels, got features={self.features}, input {h.shape}")
    half = self.features // 2
    a, b = h[..., :half], h[..., half:]
    s_a, t_a = self._scale_shift(b, tau, "a")
    s_b, t_b = self._scale_shift(a, tau, "b")
    return jnp.concatenate([s_a * a + t_a, s_b * b + t_b], -1)


def rk4_solve(field, h0: jax.Array, steps: int) -> jax.Array:
  """h(1) of dh/dtau = field(h, tau), h(0) = h0, by `steps` classical Runge-Kutta steps."""
  if steps < 1:
    raise ValueError(f"ode_steps must be >= 1, got {steps}")
  dt = 1.0 / steps
  h = h0
  for k in range(steps):
    tau = jnp.asarray(k * dt, h0.dtype)
    k1 = field(h, tau)
    k2 = field(h + 0.5 * dt * k1, tau + 0.5 * dt)
    k3 = field(h + 0.5 * dt * k2, tau + 0.5 * dt)
    k4 = field(h + dt * k3, tau + dt)
    h = h + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
  return h


class FODE(urbanfm.UrbanFM):
  """UrbanFM with a neural-ODE feature block (see the module docstring): (B, I, J, C) normalised
  coarse maps and (B, F) external features -> (B, N*I, N*J, C) normalised fine maps that pool
  exactly to the coarse input. `num_blocks` is unused; `ode_steps` sets the solver's grid."""
  ode_steps: int = 2  # ours (CPU budget; see configs/default.py)

  def _trunk(self, x: jax.Array, first: jax.Array) -> jax.Array:
    del x
    field = AffineCouplingField(self.features, name="ode_field")  # one field for every step
    return rk4_solve(field, first, self.ode_steps)
