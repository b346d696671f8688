"""DiffRecon as an evaluated method: stage 1 completes, stage 2 infers (paper Sec. IV-A).

Reconstruction of the slices `slices` from what the evaluation lets a method see
(`evaluate.ObservedTask`: the coarse series with its hidden cells NaN, the mask, the external
features; nothing else of the task is read at sampling time):
  1. Diffusion-C completes the coarse map of every slice the windows need (the slices themselves
     and the `history` slices before the first one), each from its own window of *incomplete*
     observations; observed cells are imposed at every reverse step and exactly at the end
     (`diffusion._impose`). The per-cell median of the samples is the completed coarse map.
  2. Diffusion-F draws fine samples for each slice conditioned on the window of completed coarse
     maps (through T-PatternNet) and the external features; the median is the point estimate.
     With `sampling.consistent` every sample pools exactly (sum or mean) to the completed
     coarse map, and so does the point estimate (`model.sample_fine`).
With `sampling.ensemble = "members"` (the default) stage 1 also draws `n_samples` member
completions of every slice (one noise draw per member for all slices: coherent histories) and
stage 2 draws member m's fine map from a window of member m's completions, so the spread holds
the completion's uncertainty and member m pools to its own completion; the point estimate is the
same one-pass estimate (`model.sample_coarse_members`, `sample_fine_members`). A
`calibration` (fitted on the validation split, `calibration.py`) then re-scales the members and
gives the intervals.
Both chains run as one compiled function per stage on fixed-size batches (the last batch is padded),
so nothing recompiles across batches, patterns or splits. On CPU several batches run at once from
a small thread pool (`eval.concurrent_batches`): XLA:CPU keeps about one core busy with one
sampler program of many small ops, so two programs side by side on a 2-core machine halve the
time per batch (measured; WORKSPACE.md, benchmarks/README.md).
The batches spread over every local device, and with `across_processes` over every process of a
multi-process run (`batching.run_batched`: batch k on process k mod P, there on local device
(k // P) mod D): every process then calls the same methods in the same order with the same
arguments, and each returns the whole reconstruction, identical to a one-process run's.
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffrecon_jax import parallel
from diffrecon_jax.batching import (BALANCE_BATCHES_FOR, balanced_batch_size, batches_here,
                                    concurrent_batches, run_batched)
from diffrecon_jax.diffrecon import calibration as calibration_lib
from diffrecon_jax.diffrecon import model
from diffrecon_jax.diffrecon import settings as settings_lib


class DiffReconMethod:
  """`reconstruct(view, slices)` with trained (EMA) parameters; see module docstring.
  `name` is "diffrecon", or "diffrecon-<ablation>" for an ablation's model (`ablations.py`)."""

  name = "diffrecon"

  def __init__(self, config, params: dict, models: model.Models,
               x0_clip: tuple = (None, None),
               sampling: Optional[settings_lib.SamplingSettings] = None,
               devices: Optional[Sequence] = None, across_processes: bool = False):
    """config: the run's config (its `sampling`, `eval.batch_size`, `seed` and
    `diffusion.num_steps` are read); params: {'c', 'f'} parameters; x0_clip: (coarse, fine)
    bounds on each reverse step's estimate of s_0 in normalised units
    (`model.x0_clip_bounds`: computed from the train split when the method is built), or None
    for no clip; sampling: the config's `settings.SamplingSettings` when the caller has read
    them already; devices: where the sampler batches run (default: every local device; batch k
    on device k mod their number, so the results do not depend on how many there are);
    across_processes: in a multi-process run, spread the batches over every process too
    (module docstring): then every process must make the same calls, in lockstep (each gathers
    the others' batches); otherwise this process samples alone."""
    self.settings = (settings_lib.SamplingSettings.from_config(config) if sampling is None
                     else sampling)
    self.x0_clip = tuple(x0_clip)
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.across_processes = bool(across_processes) and jax.process_count() > 1
    # Sampler batches run by this process and by all processes together (`_batched`).
    self.batches_run = {"here": 0, "total": 0}
    # Over several devices the parameters stay on the host and follow each batch to its device.
    self.params = params if len(self.devices) < 2 else parallel.to_host(params)
    self.models = models
    self.n_samples = self.settings.n_samples
    self.batch = int(config.eval.batch_size)
    self.workers = concurrent_batches(config)
    self._compiled = set()  # (stage, batch size) pairs already compiled
    self.sampler = self.settings.describe()
    # Sampler noise: `sampling.prng_impl` ("rbg" on the default configs: measured faster on CPU
    # than threefry) or JAX's default when "".
    self._rng = jax.random.key(int(config.seed) + 1, impl=self.settings.prng_impl or None)
    settings, clip = self.settings, self.x0_clip
    # (params, *arrays, rng): the argument order `_batched` calls with; slots are the
    # climatology slots of the windows (B, t), zeros when the model has no prior.
    self._stage_c = jax.jit(lambda p, obs, mask, ext, slots, rng: model.sample_coarse(
        models, p, obs, mask, ext, rng, settings, clip[0], slots))
    self._stage_f = jax.jit(lambda p, coarse, ext, slots, rng: model.sample_fine(
        models, p, coarse, ext, rng, settings, clip[1], slots[:, -1]))
    # Ensemble members with their own completions (settings.ensemble == "members").
    self._stage_c_members = jax.jit(
        lambda p, obs, mask, ext, slots, rng: model.sample_coarse_members(
            models, p, obs, mask, ext, rng, settings, clip[0], slots))
    self._stage_f_members = jax.jit(
        lambda p, point_win, member_win, ext, slots, rng: model.sample_fine_members(
            models, p, point_win, member_win, ext, rng, settings, clip[1], slots[:, -1]))
    # The point path alone (no members): Diffusion-C's one-pass completion, then Diffusion-F's
    # one-pass fine map and the prior's split it corrects (`point_and_base`).
    self._point_c = jax.jit(lambda p, obs, mask, ext, slots, rng: model.point_coarse(
        models, p, obs, mask, ext, slots))
    self._point_f = jax.jit(lambda p, win, ext, slots, rng: (
        model.point_fine(models, p, win, ext, slots[:, -1], settings.consistent),
        self._base_of(win, slots)))
    self._fine_base = jax.jit(self._base_of)
    self._guess = jax.jit(lambda obs, mask, ext, slots, rng: self._guess_of(obs, mask, ext, slots))
    # The weight of Diffusion-C's correction over the prior's first guess at hidden coarse
    # cells, as `fine_weight` for stage 2 (`calibration.choose_point_weights` sets both).
    self.coarse_weight = 1.0
    # The weight of Diffusion-F's correction over the prior's split in the point estimate:
    # fine = base + w (fine - base); 1 = the network's full correction. Chosen on the validation
    # split with the calibration (`calibration.choose_fine_weight`), which sets it.
    self.fine_weight = 1.0
    # Optional recalibration fitted on the validation split (calibration.Calibration), applied
    # to every reconstruction: `reconstruct` then also returns the calibrated members and
    # intervals beside the raw ones.
    self.calibration = None

  def _base_of(self, window, slots):
    """The prior's split of each window's current completed map: window (B,t,I,J,C), slots
    (B,t) -> (B,NI,NJ,C) normalised (zeros for a model without the climatology base)."""
    if self.models.fine_base is None:
      b, _, i, j, c = window.shape
      n = self.models.f.scale
      return jnp.zeros((b, n * i, n * j, c), jnp.float32)
    return self.models.fine_base(window[:, -1], slots[:, -1])

  def _guess_of(self, obs, mask, ext, slots):
    """The prior's first guess of each window's current map (B,I,J,C) normalised (zeros
    without the prior)."""
    _, guess = model.coarse_condition(self.models, obs, mask, ext, slots)
    return guess + jnp.zeros(obs[:, -1].shape, jnp.float32)

  def _weighted_c(self, point_c, view, span: np.ndarray, slot) -> np.ndarray:
    """Completions point_c (len(span),I,J,C) normalised of the slices `span` with Diffusion-C's
    correction over the first guess weighted by `coarse_weight` at hidden cells."""
    if self.coarse_weight == 1.0 or not self.models.coarse_residual:
      return point_c
    idx = span[:, None] + np.arange(-view.history, 1)[None, :]
    (guess,) = self._batched("guess", self._guess, [view.coarse_obs_norm[idx], view.mask[idx],
                                                    view.external[idx], slot[idx]], self._rng)
    hidden = (view.mask[span] < 0.5)[..., None]
    return np.where(hidden, guess + self.coarse_weight * (point_c - guess), point_c)

  def _weighted(self, fine, window, slots) -> np.ndarray:
    """`fine` (n,NI,NJ,C) normalised with Diffusion-F's correction over the prior's split
    weighted by `fine_weight` (pooling kept: the correction is block-mean-zero)."""
    if self.fine_weight == 1.0 or self.models.fine_base is None:
      return fine
    (base,) = self._batched("base", lambda w, s, rng: self._fine_base(w, s), [window, slots],
                            self._rng)
    return base + self.fine_weight * (fine - base)

  def completion_and_guess(self, view, slices: np.ndarray) -> tuple:
    """Diffusion-C's one-pass completion (`coarse_weight` 1) of `slices` (n,) and the prior's
    first guess it corrects: (point, guess) physical (n,I,J,C). `coarse_weight` w gives the
    hidden cells guess + w (point - guess)."""
    slices, slot = np.asarray(slices), self.slots(view)
    idx = slices[:, None] + np.arange(-view.history, 1)[None, :]
    arrays = [view.coarse_obs_norm[idx], view.mask[idx], view.external[idx], slot[idx]]
    (point_c,) = self._batched("pc", functools.partial(self._point_c, self.params["c"]), arrays,
                               self._rng)
    (guess,) = self._batched("guess", self._guess, arrays, self._rng)
    return view.coarse_norm.inverse(point_c), view.coarse_norm.inverse(guess)

  def point_and_base(self, view, slices: np.ndarray) -> tuple:
    """The point estimate with `fine_weight` 1 (and the current `coarse_weight`) and the
    prior's split it corrects, without members (two network passes per map): slices (n,)
    contiguous -> (fine, base) physical (n,NI,NJ,C). `fine_weight` w gives fine' = base +
    w (fine - base)."""
    h, slices = view.history, np.asarray(slices)
    if slices[0] < 2 * h:
      raise ValueError(f"slice {slices[0]} has too little history (needs {2 * h} slices before)")
    slot = self.slots(view)
    span = np.arange(slices[0] - h, slices[-1] + 1)
    idx = span[:, None] + np.arange(-h, 1)[None, :]
    (point_c,) = self._batched("pc", functools.partial(self._point_c, self.params["c"]),
                               [view.coarse_obs_norm[idx], view.mask[idx], view.external[idx],
                                slot[idx]], self._rng)
    point_c = self._weighted_c(point_c, view, span, slot)
    win = np.arange(len(slices))[:, None] + np.arange(0, h + 1)[None, :]
    idx_f = slices[:, None] + np.arange(-h, 1)[None, :]
    fine, base = self._batched("pf", functools.partial(self._point_f, self.params["f"]),
                               [point_c[win], view.external[idx_f], slot[idx_f]], self._rng)
    return view.fine_norm.inverse(fine), view.fine_norm.inverse(base)

  # -- host loop -------------------------------------------------------------------------------
  def _batched(self, stage: str, fn, arrays: list, rng) -> list:
    """Runs `fn(*batch, rng_k)` over fixed-size batches along axis 0 (padding the last batch so
    the compiled function sees one shape) and concatenates each output along axis 0.

    Batch k always gets `fold_in(rng, k)`, so results do not depend on how many batches run at
    once. The first batch of a stage at a new batch size runs alone (it compiles), then
    `self.workers` at a time (at least one per device of `self.devices`); with
    `across_processes`, this process runs its share and gathers the rest.
    """
    n = arrays[0].shape[0]
    size = balanced_batch_size(n, self.batch, BALANCE_BATCHES_FOR)
    first_alone = (stage, size) not in self._compiled
    outs = run_batched(fn, arrays, size, rng=rng, workers=self.workers, first_alone=first_alone,
                       devices=self.devices, across_processes=self.across_processes)
    self._compiled.add((stage, size))
    batches = -(-n // size)
    self.batches_run["here"] += len(batches_here(batches, self.across_processes))
    self.batches_run["total"] += batches
    return outs

  @property
  def _members(self) -> bool:
    return self.settings.ensemble == "members"

  def _compile_f_aside(self, view, n: int):
    """With several workers, when stage 2 has not run at this batch size yet: compiles it (one
    call on zeros of its batch shape) in a background thread while stage 1 compiles and runs,
    instead of afterwards on one core (saves its ~6 s compile on the 2-core CPU).
    Returns (future, batch size), or None."""
    size = balanced_batch_size(n, self.batch, BALANCE_BATCHES_FOR)
    if ("f", size) in self._compiled or self.workers < 2:
      return None
    window = (size, view.window)
    coarse = np.zeros(window + tuple(view.coarse_shape) + (view.channels,), np.float32)
    external = np.zeros(window + tuple(view.external.shape[1:]), view.external.dtype)
    slots = np.zeros(window, np.int32)
    if self._members:
      member_win = np.zeros((size, self.n_samples) + coarse.shape[1:], np.float32)
      call = lambda: self._stage_f_members(self.params["f"], coarse, member_win, external,
                                           slots, self._rng)
    else:
      call = lambda: self._stage_f(self.params["f"], coarse, external, slots, self._rng)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(lambda: jax.block_until_ready(call()))
    pool.shutdown(wait=False)
    return future, size

  def _keys(self, slices: np.ndarray) -> tuple:
    """(stage-1 key, stage-2 key) of a run of slices: fixed by its first slice and the seed."""
    return tuple(jax.random.split(jax.random.fold_in(self._rng, int(slices[0]))))

  def slots(self, view) -> np.ndarray:
    """(T,) climatology slot of every slice, zeros when the model has no prior."""
    return (self.models.prior.slots(view.timestamps) if self.models.needs_slots
            else np.zeros(len(view.timestamps), np.int32))

  def _complete_norm(self, view, slices: np.ndarray, slot: np.ndarray, rng) -> np.ndarray:
    """Diffusion-C's median completion of `slices` (n,), each from its own window of observed
    values: (n, I, J, C) normalised."""
    idx = slices[:, None] + np.arange(-view.history, 1)[None, :]
    (completed,) = self._batched("c", functools.partial(self._stage_c, self.params["c"]),
                                 [view.coarse_obs_norm[idx], view.mask[idx],
                                  view.external[idx], slot[idx]], rng)
    return completed

  def complete(self, view, slices: np.ndarray) -> np.ndarray:
    """Stage 1 alone (the noFG ablation feeds its output to another fine network):
    slices (n,) contiguous, each with `history` slices before it -> (n, I, J, C) physical
    completed coarse maps (observed cells exact). Same key rule as `reconstruct`."""
    slices = np.asarray(slices)
    if slices[0] < view.history:
      raise ValueError(f"slice {slices[0]} has too little history (needs {view.history} before)")
    completed = self._complete_norm(view, slices, self.slots(view), self._keys(slices)[0])
    return view.coarse_norm.inverse(completed)

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """view: evaluate.ObservedTask; slices (n,) contiguous current-slice indices.

    Returns physical-unit dict: coarse (n,I,J,C) completed maps, fine (n,NI,NJ,C) point
    estimates, samples (S,n,NI,NJ,C) the ensemble members; with `sampling.ensemble` "members"
    also coarse_samples (S,n,I,J,C), each member's completion (member s's fine map pools to
    it). With a `calibration`, `calibration.apply` adds the calibrated members (`samples`; the
    raw ones move to `samples_raw`) and intervals.
    """
    rec = self._reconstruct_members(view, slices) if self._members else self._reconstruct_shared(
        view, slices)
    if self.calibration is not None:
      slices = np.asarray(slices)
      rec = self.calibration.apply(
          rec, view.mask[slices], view.scale, view.aggregation,
          unseen=calibration_lib.unseen_cells(view.mask, slices, view.history),
          pattern=getattr(view, "pattern", ""))
    return rec

  def _start(self, view, slices) -> tuple:
    """What both reconstruct paths begin with: (history, slices as an array, (stage-1 key,
    stage-2 key), stage 2's background compile (future, size) or None, the slots (T,))."""
    h = view.history
    slices = np.asarray(slices)
    if slices[0] < 2 * h:
      raise ValueError(f"slice {slices[0]} has too little history (needs {2 * h} slices before)")
    return (h, slices, self._keys(slices), self._compile_f_aside(view, len(slices)),
            self.slots(view))

  def _reconstruct_members(self, view, slices: np.ndarray) -> dict:
    """`reconstruct` with members that carry the completion's uncertainty (module docstring)."""
    h, slices, (k_c, k_f), warm_f, slot = self._start(view, slices)
    span = np.arange(slices[0] - h, slices[-1] + 1)
    idx = span[:, None] + np.arange(-h, 1)[None, :]
    # One key for every batch of stage 1 (the per-batch key is ignored): member s draws the same
    # noise at every slice, so its completions form one trajectory (`sample_coarse_members`).
    stage_c = lambda *a: self._stage_c_members(self.params["c"], *a[:-1], k_c)
    point_c, members_c = self._batched(
        "cm", stage_c, [view.coarse_obs_norm[idx], view.mask[idx], view.external[idx],
                        slot[idx]], k_c)                     # (n+h, I,J,C), (n+h, S, I,J,C)
    point_c = self._weighted_c(point_c, view, span, slot)
    if warm_f is not None:
      warm_f[0].result()
      self._compiled.add(("f", warm_f[1]))
    win = np.arange(len(slices))[:, None] + np.arange(0, h + 1)[None, :]
    idx_f = slices[:, None] + np.arange(-h, 1)[None, :]
    member_win = np.swapaxes(members_c[win], 1, 2)           # (n, S, t, I, J, C)
    fine, members_f = self._batched(
        "f", functools.partial(self._stage_f_members, self.params["f"]),
        [point_c[win], member_win, view.external[idx_f], slot[idx_f]], k_f)
    fine = self._weighted(fine, point_c[win], slot[idx_f])
    return {"coarse": view.coarse_norm.inverse(point_c[h:]),
            "coarse_samples": view.coarse_norm.inverse(np.swapaxes(members_c[h:], 0, 1)),
            "fine": view.fine_norm.inverse(fine),
            "samples": view.fine_norm.inverse(np.swapaxes(members_f, 0, 1))}

  def _reconstruct_shared(self, view, slices: np.ndarray) -> dict:
    """`reconstruct` with one completion per slice shared by every sample."""
    h, slices, (k_c, k_f), warm_f, slot = self._start(view, slices)
    # Stage 1 on every slice the stage-2 windows touch, from observed values only (0 = hidden).
    span = np.arange(slices[0] - h, slices[-1] + 1)
    completed = self._weighted_c(self._complete_norm(view, span, slot, k_c), view, span, slot)
    if warm_f is not None:
      warm_f[0].result()
      self._compiled.add(("f", warm_f[1]))
    # Stage 2: windows of completed maps, current slice last.
    win = np.arange(len(slices))[:, None] + np.arange(0, h + 1)[None, :]
    idx_f = slices[:, None] + np.arange(-h, 1)[None, :]
    fine, samples = self._batched("f", functools.partial(self._stage_f, self.params["f"]),
                                  [completed[win], view.external[idx_f], slot[idx_f]], k_f)
    fine = self._weighted(fine, completed[win], slot[idx_f])
    return {"coarse": view.coarse_norm.inverse(completed[h:]),
            "fine": view.fine_norm.inverse(fine),
            "samples": view.fine_norm.inverse(np.swapaxes(samples, 0, 1))}
