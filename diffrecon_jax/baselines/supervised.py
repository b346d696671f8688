"""The one training loop of the deterministic super-resolution baselines (SRCNN, SRResNet,
UrbanFM, FODE, STCF): they differ only in their network and loss (and STCF in a contrastive
pre-training of its encoders before this loop, `stcf.Pretrainer`).

Training (`fit`) reads the train split's truth alone (`ObservedTask.train_coarse` ->
`train_fine`, both z-scored by the view's train-split normalisers): the complete coarse maps, and
with `train_masked` also one copy of them per training pattern (`config.patterns.train`) whose
hidden cells were filled by the `interp` completion, so the network trains on inputs like those it
is scored on. Adam (`adam.minimise`), a jitted step on random batches, a fixed number of steps
and a seed.

Reconstruction (`reconstruct`): the observed coarse maps are completed by `interp` (the paper's
preprocessing of its non-sparse baselines, Sec. V-A.4), z-scored and mapped by the network; the
fine maps come back in physical units beside the completed coarse maps. Deterministic; the
network is trained on the first call and reused while the train split is the same.

With a `base` (the noFG ablation on DiffRecon's prior, `nofg.py`) the network corrects a fine map
that the base computes from the coarse input, as Diffusion-F corrects the prior's split: its
output loses each N x N block's mean (`OnBase`) and is added to the base, so the correction
moves fine values within a block and the fine map pools to the base's coarse map; it trains on
the truth minus the base.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffrecon_jax import batching
from diffrecon_jax.baselines import adam, interp
from diffrecon_jax.data import coarsen
from diffrecon_jax.data import patterns as patterns_lib

LOSSES = ("l2", "l1")


def finite_or_zero(x: np.ndarray) -> tuple:
  """(x with NaN -> 0, 1.0 where x was finite) as float32."""
  ok = np.isfinite(x)
  return np.where(ok, x, 0.0).astype(np.float32), ok.astype(np.float32)


def as_diffrecons(value, theirs) -> int:
  """A baseline's step count or batch size: `value`, or DiffRecon's counterpart `theirs` when
  `value` is -1 (the configs' way to keep a baseline on equal terms in every variant)."""
  return int(theirs) if int(value) == -1 else int(value)


def training_inputs(view, patterns: tuple, seed: int, time_weight: float,
                    with_masks: bool = False):
  """Coarse inputs of the train split: the complete maps, then one interp completion per pattern.

  Args:
    view: evaluate.ObservedTask (only train_coarse, history and the shapes are read).
    patterns: training pattern specs ("random:0.4", ...); () = the complete maps only.
    seed: draws each pattern's masks over the train split (`patterns.make_eval_mask`).
    time_weight: interp's time weight.
    with_masks: also return the observation mask of each copy.
  Returns:
    (P + 1, T_train, I, J, C) float32 physical coarse maps (NaN where the data has none), and
    with `with_masks` their (P + 1, T_train, I, J) float32 masks (1 = observed; the complete
    copy's: 1 where the data has a value).
  """
  coarse = np.asarray(view.train_coarse, np.float32)
  t = coarse.shape[0]
  out = [coarse]
  valid = np.isfinite(coarse).all(axis=-1).astype(np.float32)
  masks = [valid]
  for k, spec in enumerate(patterns):
    mask = patterns_lib.make_eval_mask(patterns_lib.parse_pattern(spec), t, coarse.shape[1:3],
                                       seed + k) * valid
    masks.append(mask)
    out.append(interp.nearest_fill(coarse, mask, np.arange(t), view.history, time_weight,
                                   fallback=view.coarse_norm.mean))
  return (np.stack(out), np.stack(masks)) if with_masks else np.stack(out)


def train_network(module: nn.Module, inputs: np.ndarray, external: np.ndarray,
                  targets: np.ndarray, weights: np.ndarray, *, steps: int, batch_size: int,
                  lr: float, seed: int, loss: str = "l2", log_every: int = 0,
                  name: str = "", prepare: Optional[Callable] = None) -> tuple:
  """Adam on random batches of (inputs, external) -> targets.

  Args:
    module: maps (B, I, J, C) inputs and (B, F) external features to (B, H, W, C).
    inputs: (n, I, J, C) normalised inputs; external (n, F); targets (n, H, W, C) normalised;
      weights (n, H, W, C): 1 where the target exists (the loss is their weighted mean).
    steps, batch_size, lr, seed: the budget, Adam's rate, the initialisation and batch seed.
    loss: "l2" (squared error) or "l1" (absolute error).
    log_every: > 0 logs the mean loss of every that many steps.
    prepare: optional params -> params applied to the initial parameters before the first step
      (STCF's pre-trained encoders).
  Returns:
    (params, losses (steps,) float32: each step's batch loss before its update).
  """
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be positive")
  data = tuple(jnp.asarray(a, jnp.float32) for a in (inputs, external, targets, weights))
  n = data[0].shape[0]
  key_init, key_batch = jax.random.split(jax.random.PRNGKey(seed))
  params = module.init(key_init, data[0][:1], data[1][:1])
  if prepare is not None:
    params = prepare(params)

  def loss_fn(p, data, key):
    x, e, y, w = (a[jax.random.randint(key, (batch_size,), 0, n)] for a in data)
    err = module.apply(p, x, e) - y
    per_cell = err * err if loss == "l2" else jnp.abs(err)
    return jnp.sum(w * per_cell) / jnp.maximum(jnp.sum(w), 1.0)

  return adam.minimise(params, loss_fn, data, steps=steps, lr=lr, key=key_batch,
                       log_every=log_every, name=name)


class OnBase(nn.Module):
  """A fine network's output as a correction of a base fine map: `inner`'s output (normalised
  fine units) with each N x N block's mean removed (`coarsen.block_mean_zero`). For UrbanFM-type
  networks (UrbanFM, FODE, STCF), whose output pools to their input, the correction is their
  split's deviation from the even split of the block; as their shares are >= 0 it cannot go
  below minus the even share, so it cannot take a cell below (base - even share), where a
  network without that constraint (SRCNN, SRResNet) can."""
  inner: nn.Module
  scale: int

  def __call__(self, x: jax.Array, external: jax.Array = None) -> jax.Array:
    return coarsen.block_mean_zero(self.inner(x, external), int(self.scale))


def train_key(view) -> str:
  """What training reads from a view, hashed: views of one task under different masks share it."""
  h = hashlib.sha1()
  v0 = int(view.split.val_start)
  for a in (view.train_coarse, view.train_fine, np.asarray(view.external)[:v0]):
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(f"{view.scale} {view.aggregation} {view.history}".encode())
  return h.hexdigest()


class SupervisedBaseline:
  """A deterministic super-resolution network as an evaluated method.

  Args:
    name: the method's name in the results.
    network: view -> flax module mapping (B, I, J, C) normalised coarse maps and (B, F) external
      features to (B, N*I, N*J, C) normalised fine maps (the view gives shapes, normalisers and
      aggregation, never hidden values).
    loss: "l2" or "l1".
    steps, batch_size, lr, seed: training budget, Adam's rate and the seed.
    train_patterns: patterns whose interp-completed copies of the train split are added to the
      training inputs; () trains on the complete coarse maps only.
    time_weight: interp's time weight (completion of the inputs, train and test).
    eval_batch: maps per network call at reconstruction.
    log_every: training log cadence (0 = silent).
    pretrain: optional (initial params, (copies * T, I, J, C) normalised training inputs,
      copies) -> params, run before supervised training (STCF's `stcf.Pretrainer`).
    base: optional (view, coarse (n, I, J, C) physical, slices (n,)) -> (n, N*I, N*J, C)
      physical fine maps that pool to `coarse`; when set the network learns and outputs a
      correction of it (`OnBase`; module docstring). Set before the first `fit`.
  """

  sampler = None

  def __init__(self, name: str, network: Callable, *, loss: str = "l2", steps: int = 1000,
               batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
               train_patterns: tuple = (), time_weight: float = 0.1, eval_batch: int = 256,
               log_every: int = 0, pretrain: Optional[Callable] = None,
               base: Optional[Callable] = None):
    if loss not in LOSSES:
      raise ValueError(f"{name}: loss must be one of {LOSSES}, got {loss!r}")
    self.name, self.network, self.loss = name, network, loss
    self.steps, self.batch_size, self.lr, self.seed = int(steps), int(batch_size), float(lr), int(seed)
    self.train_patterns = tuple(train_patterns)
    self.time_weight, self.eval_batch, self.log_every = float(time_weight), int(eval_batch), int(log_every)
    self.pretrain = pretrain
    self.base = base
    self._key = None
    self.module = self.params = self.losses = None

  def fit(self, view) -> None:
    """Trains on `view`'s train split (once per distinct train split)."""
    key = train_key(view)
    if key == self._key:
      return
    v0 = int(view.split.val_start)
    if view.train_fine.shape[0] != v0 or view.train_coarse.shape[0] != v0:
      raise ValueError(f"{self.name}: train_fine / train_coarse have {view.train_fine.shape[0]} / "
                       f"{view.train_coarse.shape[0]} slices, the training split {v0}")
    coarse = training_inputs(view, self.train_patterns, self.seed, self.time_weight)
    copies = coarse.shape[0]
    x, _ = finite_or_zero(view.coarse_norm.apply(coarse.reshape((-1,) + coarse.shape[2:])))
    fine = view.fine_norm.apply(np.asarray(view.train_fine, np.float32))
    ext = np.asarray(view.external[:v0], np.float32)
    tile = lambda a: np.concatenate([a] * copies)
    if self.base is None:
      y, w = finite_or_zero(fine)
      y, w = tile(y), tile(w)
      self.module = self.network(view)
    else:
      # Each copy's target is the truth minus the base of that copy's own coarse input.
      base = np.concatenate([view.fine_norm.apply(self.base(view, part, np.arange(v0)))
                             for part in coarse])
      y, w = finite_or_zero(tile(fine) - base)
      self.module = OnBase(self.network(view), int(view.scale))
    logging.info("%s: training %d steps on %d train maps (%d input copies)%s", self.name,
                 self.steps, v0, copies, " as a correction of its base" if self.base else "")
    prepare = None
    if self.pretrain is not None and self.base is None:
      prepare = lambda params: self.pretrain(params, x, copies)
    elif self.pretrain is not None:  # the network's parameters sit under OnBase's "inner"
      prepare = lambda params: {"params": {"inner": self.pretrain(
          {"params": params["params"]["inner"]}, x, copies)["params"]}}
    self.params, self.losses = train_network(
        self.module, x, tile(ext), y, w, steps=self.steps,
        batch_size=self.batch_size, lr=self.lr, seed=self.seed, loss=self.loss,
        log_every=self.log_every, name=self.name, prepare=prepare)
    self._apply = jax.jit(self.module.apply)
    self._key = key

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """slices (n,) -> dict(coarse (n, I, J, C): the interp-completed observed maps, fine
    (n, N*I, N*J, C) float32 physical, samples None)."""
    slices = np.asarray(slices, np.int64)
    coarse = interp.nearest_fill(view.coarse_obs, view.mask, slices, view.history,
                                 self.time_weight, fallback=view.coarse_norm.mean)
    return {"coarse": coarse.astype(np.float32),
            "fine": self.fine_from_coarse(view, coarse, slices), "samples": None}

  def fine_from_coarse(self, view, coarse: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """The network on complete coarse maps from any completion (interp here; Diffusion-C in the
    noFG ablation): coarse (n, I, J, C) physical, slices (n,) their indices (external features)
    -> (n, N*I, N*J, C) float32 physical fine maps. Trains first if needed (`fit`)."""
    self.fit(view)
    slices = np.asarray(slices, np.int64)
    x, _ = finite_or_zero(view.coarse_norm.apply(np.asarray(coarse, np.float32)))
    ext = np.asarray(view.external, np.float32)[slices]
    if not len(slices):
      return np.zeros((0,) + view.fine_shape + (x.shape[-1],), np.float32)
    (fine,) = batching.run_batched(lambda *part: self._apply(self.params, *part), [x, ext],
                                   min(self.eval_batch, len(slices)))
    if self.base is not None:  # the correction (normalised units) on the base
      fine = fine + view.fine_norm.apply(self.base(view, np.asarray(coarse, np.float32), slices))
    return view.fine_norm.inverse(fine).astype(np.float32)


NETWORKS = ("srcnn", "srresnet", "urbanfm", "fode", "stcf")


def build(name: str, config) -> SupervisedBaseline:
  """The baseline `name` (one of NETWORKS) with its hyperparameters from `config.baselines`,
  its seed from `config.seed` and its training patterns from `config.patterns.train`."""
  # The networks of this loop only.
  from diffrecon_jax.baselines import fode, srcnn, srresnet, stcf, urbanfm
  b = config.baselines
  # UrbanFM's frame (FODE and STCF keep it): normalisers and aggregation from the view.
  frame = lambda v: dict(scale=v.scale, channels=v.channels,
                         coarse_mean=tuple(map(float, v.coarse_norm.mean)),
                         coarse_std=tuple(map(float, v.coarse_norm.std)),
                         fine_mean=tuple(map(float, v.fine_norm.mean)),
                         fine_std=tuple(map(float, v.fine_norm.std)), aggregation=v.aggregation)
  pretrain = None
  if name == "srcnn":
    network = lambda v: srcnn.SRCNN(v.scale, v.channels, tuple(b.srcnn_features),
                                    tuple(b.srcnn_kernels))
  elif name == "srresnet":
    network = lambda v: srresnet.SRResNet(v.scale, v.channels, int(b.srresnet_features),
                                          int(b.srresnet_blocks))
  elif name == "urbanfm":
    network = lambda v: urbanfm.UrbanFM(**frame(v), features=int(b.urbanfm_features),
                                        num_blocks=int(b.urbanfm_blocks))
  elif name == "fode":
    network = lambda v: fode.FODE(**frame(v), features=int(b.fode_features),
                                  ode_steps=int(b.fode_ode_steps))
  elif name == "stcf":
    network = lambda v: stcf.STCF(**frame(v), features=int(b.stcf_features),
                                  num_blocks=int(b.stcf_blocks),
                                  encoder_features=int(b.stcf_encoder_features))
    pretrain = stcf.Pretrainer(
        features=int(b.stcf_encoder_features), steps=int(b.stcf_pretrain_steps),
        batch_size=int(b.batch_size), lr=float(b.lr), temperature=float(b.stcf_temperature),
        seed=int(config.seed), log_every=int(b.log_every))
  else:
    raise ValueError(f"unknown supervised baseline {name!r}; expected one of {NETWORKS}")
  return SupervisedBaseline(
      name, network, loss=b.loss, steps=int(b.steps), batch_size=int(b.batch_size),
      lr=float(b.lr), seed=int(config.seed),
      train_patterns=tuple(config.patterns.train) if b.train_masked else (),
      time_weight=float(b.interp_time_weight), log_every=int(b.log_every), pretrain=pretrain)
