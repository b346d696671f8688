"""The one Adam loop of the trained baselines: a jitted step on a seeded key per step, the losses
kept, the mean loss logged at a cadence (supervised.train_network, stcf.pretrain_encoder, the
three stages of urbansta.UrbanSTAMethod, diffuflow.DiffUFlowMethod.fit)."""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging


def minimise(params, loss_fn: Callable, data, *, steps: int, lr: float, key: jax.Array,
             log_every: int = 0, name: str = "") -> tuple:
  """`steps` Adam steps on loss_fn(params, data, key_s) -> scalar, key_s = fold_in(key, s).

  `data` (a pytree of arrays) is an argument of the jitted step, not a constant baked into it,
  so the training arrays are not copied into the compiled program.
  log_every: > 0 logs "<name>: step s/steps loss L (t s)", the mean loss of the last that many
  steps. Returns (params, losses (steps,) float32: each step's loss before its update).
  """
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, key, data):
    value, grads = jax.value_and_grad(loss_fn)(params, data, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state, losses, start = tx.init(params), [], time.time()
  for s in range(steps):
    params, opt_state, value = step(params, opt_state, jax.random.fold_in(key, s), data)
    losses.append(value)
    if log_every > 0 and ((s + 1) % log_every == 0 or s + 1 == steps):
      logging.info("%s: step %d/%d loss %.4f (%.1f s)", name, s + 1, steps,
                   float(jnp.mean(jnp.stack(losses[-log_every:]))), time.time() - start)
  return params, np.asarray(jnp.stack(losses) if losses else jnp.zeros(0), np.float32)
