"""Recalibrated ensembles and intervals, fitted on the validation split only (docs/evaluation.md).

A sampling method's raw ensemble can be over-confident (its members spread less than its point
estimate errs). This module fits two things on the VALIDATION split, per group of cells, and
applies them to every later reconstruction (evaluation on test, a user's file):

- a *spread scale* k_g: the calibrated members are x'_s = point + k_g (x_s - mean_s x), centred
  on the point estimate; k_g makes the spread-skill (root mean member variance x sqrt(1 + 1/S)
  over the RMSE of the ensemble mean, `metrics.PooledMetrics.spread_skill`) 1 on the validation
  cells of group g, or (`calibration.spread_rule = "crps"`) gives them the lowest fair CRPS
  (minimum-CRPS estimation, as EMOS; `fit_from_scores`);
- *interval scales* q_{g,a} per nominal level a (`LEVELS`): the central a-interval of a cell is
  point -/+ q_{g,a} * max(std_s x_s, floor_g), with q_{g,a} the conformal a-quantile of the
  scores |y - point| / max(std, floor_g) over the validation cells of group g (split conformal
  prediction: Vovk et al. 2005; Angelopoulos & Bates 2023, "A gentle introduction to conformal
  prediction", the "scalar uncertainty estimates" recipe). Lower bounds are kept at or above
  the train split's smallest value (flows cannot go below 0).

Groups: "fine_observed" (fine cells under observed coarse cells: only the split within a block
is uncertain), "fine_hidden" (under coarse cells hidden now but observed earlier in the window),
"fine_unseen" (under coarse cells hidden in every slice of the window, as fixed sensors' gaps:
on nytaxi val their members need a spread scale of 2.47 against 2.16 and 2.03 for the other two
kinds) and "coarse_hidden" (hidden coarse cells; observed ones are exact). The mask is an input
of the task, so choosing the group of a cell uses nothing hidden.

Per layout: besides the pooled fit (all evaluation patterns together: what a user's own file
gets), the same is fitted for each evaluation pattern alone (`by_pattern`), on validation masks
drawn with the evaluation's own mask seed, so a `fixed` pattern is calibrated for the very
sensor layout it is scored on (a fixed network's gaps are known before any value is: on nytaxi
the test seed's fixed:0.8 layout hides the busiest Midtown cells, where the pooled scales,
fitted on other layouts, leave the spread-skill at 0.60 on the validation split against 0.86-1.03
for six other layouts). A reconstruction whose view names its pattern (`ObservedTask.pattern`)
gets that pattern's scales; any other (a user's file) the pooled ones. Only validation values
are read either way.

The scale is constant over each N x N block (the mask is coarse), so the calibrated fine members
still pool exactly: member s pools to point_c + k_g (c_s - mean_c), the calibrated member
completion returned as `coarse_samples` (observed coarse cells stay exact in every member).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Optional

import numpy as np
from absl import logging

from diffrecon_jax import evaluate as evaluate_lib
from diffrecon_jax import metrics as metrics_lib
from diffrecon_jax import parallel
from diffrecon_jax import paths
from diffrecon_jax.data import coarsen as coarsen_lib
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.diffrecon import settings as settings_lib

# Nominal levels of the central intervals fitted and reported (the reliability diagram's x axis).
LEVELS = metrics_lib.LEVELS
# Fine groups in label order (`fine_groups`), then the coarse one.
FINE_GROUPS = ("fine_observed", "fine_hidden", "fine_unseen")
GROUPS = FINE_GROUPS + ("coarse_hidden",)
FILE_NAME = "calibration.json"
VERSION = 5  # of the fit (groups, rules, per-pattern scales, fine weight, at least
             # MIN_STRIDE_BLOCKS validation blocks): another version is refitted


def unseen_cells(mask: np.ndarray, slices: np.ndarray, history: int) -> np.ndarray:
  """mask (T, I, J) 1 = observed; slices (n,) -> (n, I, J) bool: coarse cells hidden in every
  slice of the window s - history .. s (fixed sensors' gaps: nothing of the cell's own past
  reaches the model, and its errors are the largest)."""
  idx = np.asarray(slices)[:, None] + np.arange(-history, 1)[None, :]
  return (np.asarray(mask)[idx] < 0.5).all(axis=1)


def fine_groups(mask: np.ndarray, unseen: Optional[np.ndarray], scale: int,
                shape: tuple) -> np.ndarray:
  """(n, NI, NJ, C) int labels of the fine cells, indices into FINE_GROUPS: 0 under an observed
  coarse cell, 1 under a hidden one, 2 under one hidden through its whole window."""
  labels = metrics_lib.hidden_fine_cells(mask, scale).astype(np.int64)
  if unseen is not None:
    labels = labels + metrics_lib.hidden_fine_cells(~np.asarray(unseen, bool), scale)
  return np.broadcast_to(labels, shape)


def ensemble_std(samples: np.ndarray) -> np.ndarray:
  """(S, ...) -> (...) per-cell standard deviation of the members (ddof 1, S >= 2)."""
  return np.std(np.asarray(samples, np.float64), axis=0, ddof=1)


def conformal_quantile(scores: np.ndarray, level: float) -> float:
  """The split-conformal `level` quantile of `scores` (n,): the ceil((n + 1) level)-th smallest,
  which covers a new exchangeable score with probability >= level."""
  n = scores.size
  if n == 0:
    raise ValueError("conformal_quantile: no validation cells in this group")
  rank = min(n, int(math.ceil((n + 1) * level)))
  return float(np.partition(scores, rank - 1)[rank - 1])


@dataclasses.dataclass
class Calibration:
  """What `fit` measured on the validation split; `apply` uses it. All values physical units.

  spread_scale: {group: k_g}.
  interval_scale: {group: [q_{g,a} for a in levels]}.
  std_floor: {group: floor_g}, 1% of the group's median member std (cells where all members
    agree still get an interval that can be scaled).
  lower_bound: the train split's smallest fine value (intervals never go below it); None = none.
  coarse_lower_bound: the same for the coarse maps.
  levels: the nominal levels.
  sampler: the sampler description it was fitted for (`SamplingSettings.describe`); applying it
    to another sampler is refused by `load`.
  fitted_on: what it was fitted on (split, patterns, slices, cells per group, seconds).
  by_pattern: {pattern spec: {"spread_scale", "interval_scale", "std_floor"}} fitted on that
    evaluation pattern alone (its groups; a group it has no cells of takes the pooled values).
  point_weights: {"coarse": {"weight", "val_mae", ...}, "fine": {...}}: the weights of
    Diffusion-C's correction over the prior's first guess and of Diffusion-F's over the prior's
    split in the point estimate, chosen first (`choose_point_weights`); the scales above are
    fitted around the point they give.
  """
  spread_scale: dict
  interval_scale: dict
  std_floor: dict
  lower_bound: Optional[float]
  coarse_lower_bound: Optional[float]
  levels: tuple = LEVELS
  sampler: dict = dataclasses.field(default_factory=dict)
  fitted_on: dict = dataclasses.field(default_factory=dict)
  by_pattern: dict = dataclasses.field(default_factory=dict)
  point_weights: dict = dataclasses.field(
      default_factory=lambda: {"coarse": {"weight": 1.0}, "fine": {"weight": 1.0}})

  # -- applying -------------------------------------------------------------------------------
  def group(self, name: str) -> str:
    """The fitted group that serves `name`: the two hidden kinds stand in for each other when
    the validation patterns gave one of them no cells ("fine_unseen" under random patterns
    alone, "fine_hidden" under fixed ones alone)."""
    if name not in self.spread_scale:
      return {"fine_unseen": "fine_hidden", "fine_hidden": "fine_unseen"}.get(name, name)
    return name

  def for_pattern(self, pattern: Optional[str]) -> "Calibration":
    """The calibration a reconstruction under `pattern` (a spec such as "fixed:0.8") gets: the
    pattern's own scales where they were fitted (`by_pattern`), the pooled ones otherwise."""
    own = self.by_pattern.get(pattern) if pattern else None
    if not own:
      return self
    merged = {k: {**getattr(self, k), **own[k]} for k in ("spread_scale", "interval_scale",
                                                          "std_floor")}
    return dataclasses.replace(self, by_pattern={}, **merged)

  def apply(self, rec: dict, mask: np.ndarray, scale: int, aggregation: str = "sum",
            unseen: Optional[np.ndarray] = None, pattern: Optional[str] = None) -> dict:
    """rec: a reconstruction (`DiffReconMethod.reconstruct`: fine (n,NI,NJ,C), samples
    (S,n,NI,NJ,C), coarse (n,I,J,C), optional coarse_samples (S,n,I,J,C)); mask (n,I,J) 1 =
    observed; unseen (n,I,J) bool, coarse cells hidden in every slice of their window
    (`unseen_cells`; None = none). Returns a copy with `samples` calibrated (the raw members in
    `samples_raw`), `intervals` {level: (lo, hi)} of the fine maps, and, when the raw
    completions were given, `coarse_samples` the calibrated members' pooled completions (raw in
    `coarse_samples_raw`) and `coarse_intervals`. pattern: the evaluation pattern the mask
    was drawn from, when known (`for_pattern`)."""
    if pattern and pattern in self.by_pattern:
      return self.for_pattern(pattern).apply(rec, mask, scale, aggregation, unseen)
    out = dict(rec)
    point, raw = np.asarray(rec["fine"], np.float64), np.asarray(rec["samples"], np.float64)
    labels = fine_groups(mask, unseen, scale, point.shape)
    names = [self.group(g) for g in FINE_GROUPS]
    k = np.choose(labels, [self.spread_scale[g] for g in names])
    members = point[None] + k[None] * (raw - raw.mean(axis=0, keepdims=True))
    out["samples_raw"] = rec["samples"]
    out["samples"] = members.astype(np.float32)
    out["intervals"] = self._intervals(point, ensemble_std(raw), labels, names, self.lower_bound)
    if rec.get("coarse_samples") is None or "coarse_hidden" not in self.interval_scale:
      return out
    c_point = np.asarray(rec["coarse"], np.float64)
    c_hidden = np.broadcast_to((np.asarray(mask) < 0.5)[..., None], c_point.shape)
    out["coarse_samples_raw"] = rec["coarse_samples"]
    pooled = coarsen_lib.coarsen(members, scale, aggregation)
    # Observed coarse cells exact (pooling reproduces them up to float rounding).
    out["coarse_samples"] = np.where(c_hidden[None], pooled, c_point[None]).astype(np.float32)
    out["coarse_intervals"] = self._intervals(c_point, ensemble_std(rec["coarse_samples"]),
                                              c_hidden.astype(np.int64),
                                              [None, "coarse_hidden"], self.coarse_lower_bound)
    return out

  def _intervals(self, point, std, labels, names: list, lower) -> dict:
    """{level: (lo, hi)} float32: point -/+ q x max(std, floor) with the q and floor of the group
    names[labels] of each cell (a None group: exact cells, no width)."""
    floors = [self.std_floor[g] if g else 0.0 for g in names]
    std = np.where(np.choose(labels, [g is None for g in names]), 0.0,
                   np.maximum(std, np.choose(labels, floors)))
    out = {}
    for i, level in enumerate(self.levels):
      q = np.choose(labels, [self.interval_scale[g][i] if g else 0.0 for g in names])
      half = q * std
      lo, hi = point - half, point + half
      if lower is not None:  # a point below the bound (rare) would leave hi < lo: clip both
        lo, hi = np.maximum(lo, lower), np.maximum(hi, lower)
      out[float(level)] = (lo.astype(np.float32), hi.astype(np.float32))
    return out

  # -- files ----------------------------------------------------------------------------------
  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["levels"] = list(self.levels)
    return d

  @classmethod
  def from_json(cls, d: dict) -> "Calibration":
    """The inverse of `to_json` (TypeError / KeyError for a document of another layout)."""
    return cls(**{**d, "levels": tuple(d["levels"])})

  def save(self, workdir) -> pathlib.Path:
    path = paths.as_path(workdir) / FILE_NAME
    paths.write_text_atomic(path, json.dumps(self.to_json(), indent=1))
    return path


def load(workdir, sampler: dict, val_slices: Optional[int] = None,
         rule: Optional[str] = None, stride: Optional[int] = None) -> Optional[Calibration]:
  """The workdir's calibration if it was fitted for `sampler` (`SamplingSettings.describe`)
  and, when given, on `val_slices` slices; else None (another sampler, or none fitted yet)."""
  path = paths.as_path(workdir) / FILE_NAME
  if not path.exists():
    return None
  try:
    cal = Calibration.from_json(json.loads(path.read_text()))
  except (ValueError, TypeError, KeyError) as err:
    logging.warning("ignoring unreadable %s (%s); it will be refitted", path, err)
    return None
  if cal.sampler != sampler:
    logging.info("%s was fitted for sampler %s, not %s: refitting", path, cal.sampler, sampler)
    return None
  if val_slices is not None and cal.fitted_on.get("max_slices") != int(val_slices):
    logging.info("%s was fitted on other validation slices: refitting", path)
    return None
  if stride is not None and int(cal.fitted_on.get("val_stride", 1)) != int(stride):
    logging.info("%s was fitted on another share of the validation split: refitting", path)
    return None
  if cal.fitted_on.get("version") != VERSION:
    logging.info("%s was fitted by an earlier version of the calibration: refitting", path)
    return None
  if rule is not None and cal.fitted_on.get("spread_rule") != rule:
    logging.info("%s was fitted with another spread rule: refitting", path)
    return None
  return cal


# Validation masks are drawn from the evaluation's own mask seed (offset 0): a `fixed` pattern
# hides the same cells there as in the scored evaluation, its deployment's layout (`by_pattern`;
# module docstring). Only the validation split's values are read.
CALIBRATION_SEED_OFFSET = 0


def attach(method, config, workdir, task) -> None:
  """Gives `method` (a sampling method with a `calibration` attribute and >= 2 samples) the
  workdir's calibration for its sampler, fitting and saving it first when there is none
  (`config.calibration`: on the first `val_slices` validation slices under every evaluation
  pattern). Does nothing when `calibration.enabled` is off or the method has no ensemble.
  task: `pipeline.TaskData`, or a function returning it (called only when fitting).

  A method that samples across processes (`across_processes`) is attached on every process
  in lockstep: process 0 reads the file and hands its calibration (or its absence) to the
  others, so all of them fit, or none does; process 0 alone writes the file."""
  settings = settings_lib.CalibrationSettings.from_config(config)
  if not settings.enabled:
    return
  if not hasattr(method, "calibration") or int(getattr(method, "n_samples", 0)) < 2:
    return
  val_slices = settings.fit_slices  # a smoke run fits on as few slices as it scores
  rule = settings.spread_rule
  if getattr(method, "across_processes", False):
    # One decision for all: a process that fitted alone would wait in the sampler's
    # collectives for the others.
    cal = (load(workdir, method.sampler, val_slices, rule, settings.val_stride)
           if parallel.is_main_process() else None)
    text = parallel.broadcast_text(None if cal is None else json.dumps(cal.to_json()))
    cal = None if text is None else Calibration.from_json(json.loads(text))
  else:
    cal = load(workdir, method.sampler, val_slices, rule, settings.val_stride)
  if cal is None:
    logging.info("fitting the calibration on the validation split (%s slices, %d patterns)",
                 val_slices or "all", len(config.patterns.eval))
    task = task() if callable(task) else task
    specs, seed = tuple(config.patterns.eval), (int(config.patterns.eval_mask_seed)
                                                + CALIBRATION_SEED_OFFSET)
    weights = (choose_point_weights(method, task, specs, seed=seed, max_slices=val_slices,
                                    stride=settings.val_stride)
               if has_point_weights(method) else None)
    cal = fit(method, task, specs, seed=seed, max_slices=val_slices, rule=rule,
              stride=settings.val_stride)
    if weights:
      cal.point_weights = weights
    if parallel.is_main_process():
      logging.info("wrote %s", cal.save(workdir))
  if has_point_weights(method) and cal.point_weights:
    method.coarse_weight = float(cal.point_weights["coarse"]["weight"])
    method.fine_weight = float(cal.point_weights["fine"]["weight"])
  method.calibration = cal


def has_point_weights(method) -> bool:
  """Whether `method`'s point estimate is the one-pass posterior mean whose network corrections
  `choose_point_weights` weighs (a median of samples, as in the `:paper` variant, has none)."""
  return (hasattr(method, "point_and_base")
          and getattr(getattr(method, "settings", None), "point", "") == "posterior_mean")


# Candidate weights of a network's correction over the prior (0 = the prior's first guess or
# split, 1 = the network's full correction).
WEIGHT_GRID = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 11))


def _best_weight(what: str, sums: np.ndarray, count: int, grid, start: float) -> dict:
  """{"weight", "val_mae": {w: MAE}, "seconds"} of the lowest summed error, logged."""
  mae = sums / max(count, 1)
  best = int(np.argmin(mae))
  out = {"weight": float(grid[best]), "val_mae": {str(w): round(float(m), 6)
                                                  for w, m in zip(grid, mae)},
         "seconds": round(time.perf_counter() - start, 1)}
  logging.info("%s: weight %s (validation MAE %.4f there, %.4f at 1, %.4f at 0; %.0f s)", what,
               out["weight"], mae[best], mae[-1], mae[0], out["seconds"])
  return out


# `val_stride` keeps blocks of this many consecutive validation slices (a day of 30-min data):
# long enough that a block's own history (`history` slices before it) adds little work.
STRIDE_BLOCK = 48
# ... and never fewer blocks than this (a working week of day-long blocks; the stride is cut
# down until it keeps them): on a 20-day grid the validation split is five days, and a stride
# of 3 fitted the point weights and the calibration on two of them, where all five cost
# seconds. The nytaxi / nybike validation splits (23 blocks) keep their stride of 3.
MIN_STRIDE_BLOCKS = 5


def validation_slices(task, max_slices: int = 0, stride: int = 1) -> np.ndarray:
  """The validation slices a calibration and the point weights are fitted on: the scored ones
  (`evaluate.evaluation_slices`; the first `max_slices` when > 0), of which, with `stride` > 1,
  every `stride`-th block of STRIDE_BLOCK consecutive slices (the first, the (stride + 1)-th,
  ...), the stride lowered where needed to keep at least MIN_STRIDE_BLOCKS blocks (all of a
  split shorter than that). Spread over the split rather than its first part: one week's
  errors are not the split's (module docstring of configs/default.py, `calibration.val_slices`)."""
  slices, _ = evaluate_lib.evaluation_slices(task, "val", max_slices)
  if stride > 1 and slices.size:
    blocks = int(slices[-1] - slices[0]) // STRIDE_BLOCK + 1
    stride = min(int(stride), max(1, blocks // MIN_STRIDE_BLOCKS))
    slices = slices[((slices - slices[0]) // STRIDE_BLOCK) % stride == 0]
  return slices


def _weight_sums(method, task, pattern_specs, seed: int, max_slices: int, grid, pairs,
                 stride: int = 1) -> tuple:
  """Summed |base + w (estimate - base) - truth| for every w of `grid` over the validation
  split under `pattern_specs`; pairs(view, slices) -> (estimate, base, truth, cells) arrays."""
  slices = validation_slices(task, max_slices, stride)
  sums, count = np.zeros(len(grid)), 0
  for spec in pattern_specs:
    mask, _ = evaluate_lib.eval_mask(task, patterns_lib.parse_pattern(spec), seed)
    view = evaluate_lib.observe(task, mask, spec)
    for sl in evaluate_lib.contiguous_pieces(slices):
      estimate, base, truth, cells = pairs(task, view, mask, sl)
      keep = np.isfinite(truth) & cells
      b, d, y = (np.asarray(a, np.float64)[keep] for a in (base, estimate - base, truth))
      sums += [np.abs(b + w * d - y).sum() for w in grid]
      count += int(keep.sum())
  return sums, count


def choose_point_weights(method, task, pattern_specs, *, seed: int, max_slices: int = 0,
                         grid=WEIGHT_GRID, stride: int = 1) -> dict:
  """Sets and returns the weights of the networks' corrections in the point estimate, each the
  one of `grid` with the lowest validation MAE under `pattern_specs`: first Diffusion-C's over
  the prior's first guess (completion MAE on the hidden coarse cells,
  `method.completion_and_guess`), then, on completions so weighted, Diffusion-F's over the
  prior's split (fine MAE, `method.point_and_base`). No members: two network passes per map.
  On a long series the corrections help (weights 1); on a short one the networks can overfit
  their few training weeks and do worse than the prior they correct, and smaller weights keep
  what of their correction still helps. Returns {"coarse": {...}, "fine": {...}} (each
  `_best_weight`). Only validation values are read."""
  method.coarse_weight = method.fine_weight = 1.0
  start = time.perf_counter()

  def completions(task, view, mask, sl):
    point, guess = method.completion_and_guess(view, sl)
    return point, guess, task.coarse_phys[sl], (mask[sl] < 0.5)[..., None]

  coarse = _best_weight("Diffusion-C's correction over the first guess", *_weight_sums(
      method, task, pattern_specs, seed, max_slices, grid, completions, stride), grid, start)
  method.coarse_weight = coarse["weight"]
  start = time.perf_counter()

  def fine_maps(task, view, mask, sl):
    fine, base = method.point_and_base(view, sl)
    return fine, base, task.fine_phys[sl], True

  fine = _best_weight("Diffusion-F's correction over the prior's split", *_weight_sums(
      method, task, pattern_specs, seed, max_slices, grid, fine_maps, stride), grid, start)
  method.fine_weight = fine["weight"]
  return {"coarse": coarse, "fine": fine}


# ---- fitting ------------------------------------------------------------------------------------
# Candidate spread scales k (geometric, 0.25x to 8x the raw spread): the one with the lowest
# fair CRPS of the re-centred members on the validation cells is kept (`fit_from_scores`).
SPREAD_GRID = tuple(float(k) for k in np.geomspace(0.25, 8.0, 31))


def recentred_crps_sums(err: np.ndarray, dev: np.ndarray, grid=SPREAD_GRID) -> np.ndarray:
  """Summed fair CRPS of the members point + k dev_s against the truth, for every k of `grid`.

  err (n,) = point - truth; dev (S, n) = members minus their mean -> (len(grid),). The fair
  CRPS (docs/evaluation.md) is mean_s |err + k dev_s| - k sum_{s != t} |dev_s - dev_t| /
  (2 S (S - 1)): the second term is linear in k, so it is computed once."""
  s = dev.shape[0]
  spread = float(metrics_lib.pair_abs_sum(np.sort(dev, axis=0)).sum()) / (2 * s * (s - 1))
  return np.array([float(np.abs(err[None] + k * dev).mean(axis=0).sum()) - k * spread
                   for k in grid])


def member_stats(members: np.ndarray) -> tuple:
  """(S, ...) members -> (their deviations from the member mean (S, ...), `ensemble_std` (...)),
  float64."""
  members = np.asarray(members, np.float64)
  return members - members.mean(axis=0, keepdims=True), ensemble_std(members)


class _GroupScores:
  """Per-group validation scores, grown batch by batch: |y - point| and member std per cell
  (for the conformal interval scales) and the summed fair CRPS of the re-centred members at
  every candidate spread scale (`recentred_crps_sums`)."""

  def __init__(self):
    self.abs_err, self.std = [], []
    self.crps = np.zeros(len(SPREAD_GRID))

  def add(self, err: np.ndarray, dev: np.ndarray, std: np.ndarray, keep: np.ndarray) -> None:
    """err (...) point - truth; dev (S, ...) members minus their mean and std (...) their
    std (`member_stats`, computed once for every group of a batch); keep (...) bool: the
    group's scored cells."""
    self.abs_err.append(np.abs(err[keep]).astype(np.float32))
    self.std.append(std[keep].astype(np.float32))
    if keep.any():
      self.crps += recentred_crps_sums(np.asarray(err, np.float64)[keep], dev[:, keep])

  def arrays(self) -> tuple:
    return (np.concatenate(self.abs_err) if self.abs_err else np.zeros(0, np.float32),
            np.concatenate(self.std) if self.std else np.zeros(0, np.float32), self.crps)


SPREAD_RULES = settings_lib.SPREAD_RULES


def fit_from_scores(scores: dict, n_samples: int, levels: tuple = LEVELS,
                    rule: str = "spread_skill") -> tuple:
  """scores: {group: (abs_err (n,), member std (n,)[, summed CRPS per `SPREAD_GRID` k])} ->
  (spread_scale, interval_scale, std_floor) dicts (see `Calibration`); groups without cells
  are left out (`Calibration.group` serves them).

  `rule` picks the spread scale: "spread_skill" (the k that makes the spread-skill 1 on the
  group's cells: the contract's definition of a calibrated spread) or "crps" (the k of
  `SPREAD_GRID` with the lowest fair CRPS there: minimum-CRPS estimation, as ensemble
  post-processing does, Gneiting et al. 2005, "Calibrated probabilistic forecasting using
  ensemble model output statistics"; needs the CRPS sums). Validation cells under observed
  coarse cells and under hidden ones (either kind) are required: fit on patterns that hide some
  cells and observe others."""
  spread, interval, floor = _fit_groups(scores, n_samples, rule, levels)
  if "fine_observed" not in spread or not {"fine_hidden", "fine_unseen"} & set(spread):
    raise ValueError("calibration: no validation cells under observed or under hidden coarse "
                     "cells (fit on patterns that hide some coarse cells and observe others)")
  return spread, interval, floor


def _pooled(parts: list) -> tuple:
  """The (abs_err, std, CRPS sums) of several patterns' `_GroupScores.arrays` as one."""
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
          sum(p[2] for p in parts))


def _fit_groups(scores: dict, n_samples: int, rule: str, levels: tuple = LEVELS) -> tuple:
  """`fit_from_scores` for whichever groups `scores` has cells of (no group is required)."""
  if rule not in SPREAD_RULES:
    raise ValueError(f"calibration.spread_rule must be one of {SPREAD_RULES}, got {rule!r}")
  spread, interval, floor = {}, {}, {}
  inflate = math.sqrt(1.0 + 1.0 / n_samples)
  for group, (abs_err, std, *crps) in scores.items():
    if abs_err.size == 0:
      continue  # served by another group (`Calibration.group`), or not used
    abs_err, std = abs_err.astype(np.float64), std.astype(np.float64)
    floor[group] = 0.01 * float(np.median(std)) if np.median(std) > 0 else 1e-6
    # The spread of `metrics.PooledMetrics.spread_skill`: root mean member variance.
    mean_spread = float(np.sqrt(np.mean(std ** 2))) * inflate
    rmse = float(np.sqrt(np.mean(abs_err ** 2)))
    spread[group] = rmse / mean_spread if mean_spread > 0 else 1.0
    if rule == "crps":
      if not crps or not np.any(crps[0] > 0):
        raise ValueError(f"calibration: the 'crps' rule needs the CRPS sums of {group!r}")
      best = int(np.argmin(crps[0]))
      if best in (0, len(SPREAD_GRID) - 1):
        logging.warning("calibration: the best spread scale of %s is at the end of the grid "
                        "(%.2f)", group, SPREAD_GRID[best])
      spread[group] = SPREAD_GRID[best]
    ratio = abs_err / np.maximum(std, floor[group])
    interval[group] = [conformal_quantile(ratio, a) for a in levels]
  return spread, interval, floor


def fit(method, task, pattern_specs, *, seed: int, split: str = "val",
        max_slices: int = 0, rule: str = "spread_skill", stride: int = 1) -> Calibration:
  """Fits a `Calibration` for `method` (uncalibrated: its `calibration` is ignored here) on
  `split` (the validation split; the test split is refused) under every pattern of
  `pattern_specs`, on the first `max_slices` scored slices (0 = all), every `stride`-th block of
  them (`validation_slices`). Only the truth of `split` is read (tested: changing the test
  split's values changes nothing)."""
  if split != "val":
    raise ValueError(f"a calibration is fitted on the validation split only, not {split!r}")
  start = time.perf_counter()
  slices = validation_slices(task, max_slices, stride)
  pieces = evaluate_lib.contiguous_pieces(slices)
  per_pattern = {}
  saved, method.calibration = getattr(method, "calibration", None), None
  try:
    for spec in pattern_specs:
      groups = per_pattern.setdefault(spec, {g: _GroupScores() for g in GROUPS})
      pattern = patterns_lib.parse_pattern(spec)
      mask, _ = evaluate_lib.eval_mask(task, pattern, seed)
      view = evaluate_lib.observe(task, mask)
      for sl in pieces:
        rec = method.reconstruct(view, sl)
        if rec.get("samples") is None or len(rec["samples"]) < 2:
          raise ValueError(f"{method.name}: a calibration needs >= 2 samples per map")
        truth = task.fine_phys[sl]
        err = np.asarray(rec["fine"], np.float64) - truth
        labels = fine_groups(mask[sl], unseen_cells(mask, sl, task.history), task.scale,
                             truth.shape)
        finite = np.isfinite(truth)
        dev, std = member_stats(rec["samples"])
        for i, name in enumerate(FINE_GROUPS):
          groups[name].add(err, dev, std, finite & (labels == i))
        if rec.get("coarse_samples") is not None:
          c_truth = task.coarse_phys[sl]
          c_hidden = np.broadcast_to((mask[sl] < 0.5)[..., None], c_truth.shape)
          groups["coarse_hidden"].add(np.asarray(rec["coarse"], np.float64) - c_truth,
                                      *member_stats(rec["coarse_samples"]),
                                      np.isfinite(c_truth) & c_hidden)
  finally:
    method.calibration = saved
  n_samples = int(len(rec["samples"]))
  own = {spec: {g: sc.arrays() for g, sc in groups.items()} for spec, groups in
         per_pattern.items()}
  scores = {g: _pooled([own[spec][g] for spec in own]) for g in GROUPS}
  spread, interval, floor = fit_from_scores(scores, n_samples, rule=rule)
  by_pattern = {}
  for spec, sc in own.items():
    kept = {g: v for g, v in sc.items() if v[0].size}
    if not kept:
      continue
    p_spread, p_interval, p_floor = _fit_groups(kept, n_samples, rule)
    by_pattern[spec] = {"spread_scale": p_spread, "interval_scale": p_interval,
                        "std_floor": p_floor}
  # The other rule's scales, for the record (calibration.json): how far they differ.
  other = fit_from_scores(scores, n_samples, rule=[r for r in SPREAD_RULES if r != rule][0])[0]
  lo, hi = task.split.range("train")
  cal = Calibration(
      spread_scale=spread, interval_scale=interval, std_floor=floor,
      lower_bound=float(np.nanmin(task.fine_phys[lo:hi])),
      coarse_lower_bound=float(np.nanmin(task.coarse_phys[lo:hi])),
      sampler=dict(getattr(method, "sampler", None) or {}),
      fitted_on={"split": split, "patterns": list(pattern_specs), "n_slices": int(len(slices)),
                 "max_slices": int(max_slices), "val_stride": int(stride),
                 "mask_seed_base": int(seed), "version": VERSION,
                 "spread_rule": rule, "spread_scale_other_rule": other,
                 "cells": {g: int(scores[g][0].size) for g in GROUPS},
                 "seconds": round(time.perf_counter() - start, 1)},
      by_pattern=by_pattern)
  logging.info("calibration fitted on %s (%d slices x %d patterns, %.0f s): spread scales %s, "
               "90%% interval scales %s", split, len(slices), len(pattern_specs),
               cal.fitted_on["seconds"], {g: round(v, 3) for g, v in spread.items()},
               {g: round(v[-1], 3) for g, v in interval.items()})
  return cal
