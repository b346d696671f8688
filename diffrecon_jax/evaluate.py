"""Scores methods by the evaluation contract (docs/evaluation.md); writes results.json / .md.

A *method* is any object of the `methods.Method` protocol: `name`, `sampler` (dict or None) and
`reconstruct(view: ObservedTask, slices (n,)) -> {"coarse": (n,I,J,C), "fine": (n,NI,NJ,C),
"samples": (S,n,NI,NJ,C) or None}` in physical units; one that learns may have `fit(view)`
(`methods.Trainable`). Every method is built by name from `methods.REGISTRY`. The evaluation draws every pattern's mask
over the whole series (history windows included) from a recorded seed, saves it under
`workdir/masks/`, and hands the method an `ObservedTask` built by `observe`: the coarse series with
the hidden cells already NaN, the mask, the always-observed external features, and the truth of
the train split only. The method never holds the task itself, so it cannot read a hidden value;
the metrics are pooled over the split against the truth the evaluation keeps to itself.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
import zlib
from typing import Optional

import numpy as np
from absl import logging

from diffrecon_jax import cf_output
from diffrecon_jax import figures as figures_lib
from diffrecon_jax import metrics as metrics_lib
from diffrecon_jax import paths
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.data import pipeline
from diffrecon_jax.data import time_axis

# Splits a method may be scored on: the view holds the train split's truth.
EVAL_SPLITS = ("val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class ObservedTask:
  """Everything a method may see of a task under one evaluation mask (the contract's input).

  Built by `observe`; every array is a read-only copy, so nothing here leads back to the task's
  hidden values.

  Attributes:
    name: dataset name.
    coarse_obs: (T, I, J, C) float32 physical coarse values, NaN where mask == 0.
    mask: (T, I, J) float32, 1 = observed (the pattern's mask times `TaskData.coarse_valid`).
    external: (T, F) float32 external features (always observed).
    timestamps: (T,) datetime64[m] slice start times.
    interval_minutes: time between consecutive slices.
    scale: N, the magnification.
    aggregation: "sum" or "mean" (how N x N fine cells pool to a coarse cell).
    history: t - 1 past slices in a window.
    split: chronological split boundaries.
    coarse_norm, fine_norm: normalisers fitted on the train split.
    train_fine: (split.val_start, N*I, N*J, C) float32 physical fine truth of the train split
      only (NaN = unobserved).
    train_coarse: (split.val_start, I, J, C) float32 physical pooled truth of the train split only.
    pattern: the evaluation pattern `mask` was drawn from ("fixed:0.8"; "" when unknown, as for
      a user's file): a method may keep settings per pattern (`calibration.by_pattern`).
  """
  name: str
  coarse_obs: np.ndarray
  mask: np.ndarray
  external: np.ndarray
  timestamps: np.ndarray
  interval_minutes: int
  scale: int
  aggregation: str
  history: int
  split: pipeline.Split
  coarse_norm: pipeline.Normalizer
  fine_norm: pipeline.Normalizer
  train_fine: np.ndarray
  train_coarse: np.ndarray
  pattern: str = ""

  @property
  def coarse_shape(self) -> tuple:
    """(I, J)."""
    return tuple(self.coarse_obs.shape[1:3])

  @property
  def fine_shape(self) -> tuple:
    """(N*I, N*J)."""
    return tuple(self.scale * n for n in self.coarse_shape)

  @property
  def channels(self) -> int:
    return int(self.coarse_obs.shape[-1])

  @property
  def window(self) -> int:
    return self.history + 1

  @functools.cached_property
  def coarse_obs_norm(self) -> np.ndarray:
    """(T, I, J, C) float32 normalised observed coarse values, 0 (the train mean) where hidden."""
    with np.errstate(invalid="ignore"):
      norm = self.coarse_norm.apply(self.coarse_obs)
    return _readonly(np.where(self.mask[..., None] > 0, norm, 0.0).astype(np.float32))


def _readonly(a: np.ndarray) -> np.ndarray:
  """A copy of `a` that cannot be written to and owns its memory (no `.base` to the source)."""
  a = np.array(a, copy=True)
  a.flags.writeable = False
  return a


def hide(task, mask: np.ndarray) -> np.ndarray:
  """The coarse series a method may see: physical values where observed, NaN elsewhere."""
  return np.where(mask[..., None] > 0, task.coarse_phys, np.nan).astype(np.float32)


def observe(task, mask: np.ndarray, pattern: str = "") -> ObservedTask:
  """The `ObservedTask` of `task` (pipeline.TaskData) under `mask` (T, I, J), 1 = observed,
  drawn from evaluation pattern `pattern` (a spec; "" = unknown).

  Cells that are NaN in the data (`task.coarse_valid` == 0) are hidden whatever the mask says.
  """
  mask = np.asarray(mask, np.float32)
  if mask.shape != task.coarse_valid.shape:
    raise ValueError(f"mask shape {mask.shape} != the task's (T, I, J) {task.coarse_valid.shape}")
  mask = mask * task.coarse_valid
  lo, hi = task.split.range("train")
  series = task.series
  return ObservedTask(
      name=series.name, coarse_obs=_readonly(hide(task, mask)), mask=_readonly(mask),
      external=_readonly(task.external), timestamps=_readonly(series.timestamps),
      interval_minutes=int(series.interval_minutes), scale=int(task.scale),
      aggregation=series.aggregation, history=int(task.history), split=task.split,
      coarse_norm=task.coarse_norm, fine_norm=task.fine_norm,
      train_fine=_readonly(task.fine_phys[lo:hi]), train_coarse=_readonly(task.coarse_phys[lo:hi]),
      pattern=str(pattern))


def evaluation_slices(task, split: str, max_slices: int = 0, skip_slices: int = 0) -> tuple:
  """The current-slice indices scored on `split` ("val" or "test") and what was left out.

  Only slices whose whole reconstruction span lies on the time grid without a break are scored
  (`pipeline.eval_slices`: under `data.gap_rule` "skip" a span across a hole in the series is
  left out and counted; under "fill" the holes are unobserved slices); `skip_slices` > 0 drops
  the first ones, then `max_slices` > 0 keeps the first of the rest (smoke runs, studies). The
  train split is refused: every method's view holds its truth
  (`ObservedTask`).

  Returns:
    slices: (n,) int64 sorted indices, not necessarily contiguous (`time_axis.contiguous_runs`).
    report: `pipeline.eval_slices`'s report, with "n_scored" after `max_slices`.
  """
  if split not in EVAL_SPLITS:
    why = (" (a method's view holds the train split's truth as train_fine / train_coarse)"
           if split == "train" else "")
    raise ValueError(f"cannot evaluate on split {split!r}{why}; use one of {EVAL_SPLITS}")
  slices, report = pipeline.eval_slices(task, split)
  if skip_slices:  # e.g. score the validation slices after those a calibration was fitted on
    slices = slices[int(skip_slices):]
    report = dict(report, n_scored=int(len(slices)), skip_slices=int(skip_slices))
  if max_slices:
    slices = slices[:int(max_slices)]
    report = dict(report, n_scored=int(len(slices)), max_slices=int(max_slices))
  if not len(slices):
    raise ValueError(f"no slice of split {split!r} can be scored: {report}")
  return slices, report


def contiguous_pieces(slices: np.ndarray, chunk: int = 0) -> list:
  """Sorted slice indices (n,) -> list of contiguous index arrays, each at most `chunk` long
  (0 = runs whole); what `method.reconstruct` is called with."""
  pieces = []
  for start, stop in time_axis.contiguous_runs(slices):
    step = chunk if chunk > 0 else stop - start
    pieces += [np.arange(a, min(a + step, stop)) for a in range(start, stop, step)]
  return pieces


def pattern_seed(base_seed: int, kind: str) -> int:
  """The mask seed of a pattern kind, stable across runs, machines and methods.

  One seed per *kind* (not per ratio) makes the masks of one kind nested: the cells hidden at
  ratio 0.2 are also hidden at 0.4, and so on, so errors across ratios compare like with like.
  """
  return (int(base_seed) * 1_000_003 + zlib.crc32(kind.encode())) % (2 ** 31)


def eval_mask(task, pattern: patterns_lib.Pattern, base_seed: int) -> tuple:
  """(mask (T,I,J) with NaN coarse cells marked missing, seed used)."""
  seed = pattern_seed(base_seed, pattern.kind)
  mask = patterns_lib.make_eval_mask(pattern, task.fine.shape[0], task.coarse_shape, seed)
  return mask * task.coarse_valid, seed


@dataclasses.dataclass(frozen=True)
class PredictionsSpec:
  """Where `evaluate_method` saves what it scored (`eval.save_predictions`): folder, whether
  the members go too (`eval.save_members`), and the run's provenance (JSON) for every file."""
  folder: object
  members: bool = False
  provenance: str = ""

  @classmethod
  def from_config(cls, config, workdir, origin: Optional[dict] = None
                  ) -> Optional["PredictionsSpec"]:
    """None unless `eval.save_predictions`; `origin`: the run's `provenance.collect` (collected
    here when not given)."""
    if not bool(config.eval.save_predictions):
      return None
    text = (json.dumps(origin, sort_keys=True, default=str) if origin
            else cf_output.provenance_text("evaluate"))
    return cls(paths.as_path(workdir) / "predictions", bool(config.eval.save_members), text)


def save_predictions(spec: PredictionsSpec, task, method, pattern, parts: list,
                     slices: np.ndarray, mask: np.ndarray, split: str) -> object:
  """One pattern's scored slices as CF NetCDF (`cf_output`: the truth, the point, the 90%
  interval, the members with `spec.members`, observed coarse cells) in
  spec.folder/<method>_<pattern>.nc, for rescoring offline (xskillscore, scoringrules)."""
  out = cf_output.interval_outputs(parts, members=spec.members)
  out.update(truth=np.asarray(task.fine_phys[slices], np.float32),
             observed=(mask[slices] > 0).astype(np.uint8), time=task.series.timestamps[slices])
  spec.folder.mkdir(parents=True, exist_ok=True)
  path = spec.folder / f"{file_label(method.name)}_{file_label(pattern.label)}.nc"
  # Named after the data's variable: its one channel's name (a user's grid: the file's
  # variable), else the dataset's.
  names = task.series.channel_names
  variable = names[0] if len(names) == 1 else task.series.name
  return cf_output.write(path, out, variable=variable, units=task.series.units,
                         scale=int(task.scale), attrs={
                             "source": f"evaluation of {method.name} on {task.series.name}",
                             "pattern": pattern.label, "split": split,
                             "sampler": cf_output.sampler_text(getattr(method, "sampler", None)),
                             "provenance": spec.provenance})


def evaluate_method(task, method, pattern_specs, *, seed: int, split: str = "test",
                    max_slices: int = 0, chunk: int = 0, workdir=None, skip_slices: int = 0,
                    figures_dir=None, predictions: Optional[PredictionsSpec] = None) -> list:
  """Scores `method` on every pattern; returns the contract's `results` entries.

  The method gets the scored slices in contiguous runs (a hole in the time axis starts a new
  run); `chunk` > 0 cuts the runs into pieces of at most that many slices (bounded memory for
  large grids); 0 hands each run over whole (fewest padded batches). The method sees only
  `observe(task, mask)`; the completion metrics are scored on the hidden coarse cells alone, the
  fine metrics on every finite fine cell. The train split is refused (`evaluation_slices`).
  With `figures_dir`, the first scored slice of each pattern is drawn there, and the 90%
  interval's coverage per pattern (`figures.py`; a figure that fails only logs a warning).
  With `predictions`, what was scored is saved per pattern (`save_predictions`).
  """
  slices_all, gaps = evaluation_slices(task, split, max_slices, skip_slices)
  pieces = contiguous_pieces(slices_all, chunk)
  if gaps["n_skipped_gap"] or gaps["n_skipped_start"]:
    logging.warning("%s: %d of %d %s slices not scored (reconstruction span of %d slices "
                    "crosses a gap: %d, starts before the series: %d; first %s)",
                    task.series.name, gaps["n_slices_in_split"] - gaps["n_scored"],
                    gaps["n_slices_in_split"], split, gaps["span"], gaps["n_skipped_gap"],
                    gaps["n_skipped_start"], gaps["first_skipped"])
  out = []
  for spec in pattern_specs:
    pattern = patterns_lib.parse_pattern(spec)
    mask, mseed = eval_mask(task, pattern, seed)
    if workdir is not None:
      mdir = paths.as_path(workdir) / "masks"
      mdir.mkdir(parents=True, exist_ok=True)
      paths.save_npz(mdir / f"{file_label(pattern.label)}.npz", mask=mask.astype(np.uint8),
                     seed=mseed)
    view = observe(task, mask, spec)
    fine_m, comp_m = metrics_lib.PooledMetrics(), metrics_lib.PooledMetrics()
    fine_raw = metrics_lib.PooledMetrics()  # the raw ensemble, when the method recalibrates
    start = time.perf_counter()
    shown = None  # (slice index, its reconstruction): the slice the figures draw
    kept = []  # the reconstructions, when they are saved
    for sl in pieces:
      rec = method.reconstruct(view, sl)
      if predictions is not None:
        kept.append(rec)
      if shown is None:
        shown = (int(sl[0]), rec)
      truth = task.fine_phys[sl]
      hidden = np.broadcast_to(metrics_lib.hidden_fine_cells(mask[sl], task.scale),
                               truth.shape)
      fine_m.update(rec["fine"], truth, samples=rec.get("samples"),
                    intervals=rec.get("intervals"), hidden=hidden)
      if rec.get("samples_raw") is not None:
        fine_raw.update(rec["fine"], truth, samples=rec["samples_raw"], hidden=hidden)
      comp_m.update(rec["coarse"], task.coarse_phys[sl], where=(mask[sl] == 0)[..., None],
                    samples=rec.get("coarse_samples"), intervals=rec.get("coarse_intervals"))
    seconds = time.perf_counter() - start
    missing = 1.0 - mask[slices_all].mean()
    entry = {
        "pattern": pattern.kind,
        "missing_ratio": pattern.ratio if pattern.kind != "file" else round(float(missing), 4),
        "mae": fine_m.mae, "rmse": fine_m.rmse,
        "completion_mae": comp_m.mae, "completion_rmse": comp_m.rmse,
        **fine_m.calibration_entry(),
        "completion_crps": comp_m.crps if comp_m.crps_count else None,
        "completion_coverage_90": comp_m.coverage_90,
        "split": split,
        "n_test_slices": int(len(slices_all)),  # the contract's name; slices of `split`
        "seconds": seconds,
        "maps_per_second": len(slices_all) / seconds if seconds > 0 else None,
        "mask_seed": mseed,
        "observed_missing_ratio": round(float(missing), 4),
        "slices": gaps,
    }
    if fine_raw.count:
      entry.update({f"{k}_raw": v for k, v in fine_raw.calibration_entry().items()})
    if pattern.kind == "file":
      entry["mask_file"] = pattern.path
    if predictions is not None:
      entry["predictions_file"] = str(save_predictions(
          predictions, task, method, pattern, kept, np.concatenate(pieces), mask, split))
    logging.info("%s %s: MAE %.4f RMSE %.4f completion MAE %s (%.1f s)", method.name,
                 pattern.label, entry["mae"], entry["rmse"],
                 f"{entry['completion_mae']:.4f}" if entry["completion_mae"] is not None else "-",
                 seconds)
    out.append(entry)
    if figures_dir is not None:
      first, rec = shown
      samples = rec.get("samples")
      figures_lib.evaluation_figures(
          figures_dir, method.name, pattern.label, task.fine_phys[first], rec["fine"][0],
          None if samples is None else samples[:, 0], mask[first],
          str(task.series.timestamps[first]), channel=task.series.channel_names[0],
          units=task.series.units, channels=tuple(task.series.channel_names),
          axes=task.series.axes)
  if figures_dir is not None and any(e["coverage_90"] is not None for e in out):
    calibration_figures(figures_dir, method, task.series.name, split, out)
  return out


def calibration_figures(figures_dir, method, dataset: str, split: str, results: list) -> None:
  """Coverage bars, the reliability diagram (nominal vs observed coverage at 10..90%, raw and
  recalibrated) and the rank histograms of every pattern (`figures.py`; failures only warn)."""
  n = (getattr(method, "sampler", None) or {}).get("n_samples")
  labels = [f"{e['pattern']}:{e['missing_ratio']:g}" for e in results]
  about = f"{method.name} on {dataset} ({split})" + (f", {n} members per map" if n else "")
  folder = paths.as_path(figures_dir)
  figures_lib.write_safely(figures_lib.coverage_bars, labels, [e["coverage_90"] for e in results],
                           path=folder / f"{method.name}_coverage_90.png",
                           title=f"{about}: 90% interval coverage")
  curves = []
  for label, e in zip(labels, results):
    for key, tag in (("reliability", ""), ("reliability_raw", " raw")):
      if e.get(key):
        curves.append((label + tag, e[key]["nominal"], e[key]["observed"]))
  if curves:
    figures_lib.write_safely(figures_lib.reliability_diagram, curves,
                             path=folder / f"{method.name}_reliability.png",
                             title=f"{about}: reliability")
  hists = [(label, e["rank_histogram"]) for label, e in zip(labels, results)
           if e.get("rank_histogram")]
  if hists:
    figures_lib.write_safely(figures_lib.rank_histograms, hists,
                             path=folder / f"{method.name}_rank_histograms.png",
                             title=f"{about}: rank of the truth among the members")


def file_label(label: str) -> str:
  """A pattern label usable as a file name: "random:0.4" -> "random_0.4"."""
  return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)


def results_document(task, method, results: list, seed: int, extra: dict = None) -> dict:
  """The results.json document of docs/evaluation.md."""
  doc = {
      "dataset": task.series.name,
      "method": method.name,
      "scale_factor": task.scale,
      "coarse_shape": list(task.coarse_shape),
      "fine_shape": list(task.fine_shape),
      "channels": task.channels,
      "aggregation": task.series.aggregation,
      "units": task.series.units,  # of every error (MAE, RMSE, CRPS): the data's
      "channel_names": list(task.series.channel_names),
      "sampler": method.sampler,
      "seed": seed,
      "results": results,
  }
  table = getattr(method, "calendar_table", None)
  if table:  # the climatology's calendar table and how it was chosen (calendar_choice.py)
    doc["calendar_table"] = dict(table)
  cal = getattr(method, "calibration", None)
  if cal is not None:  # recalibration fitted on the validation split (calibration.py)
    doc["calibration"] = cal.to_json()
  if extra:
    doc.update(extra)
  return doc


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def results_markdown(docs: list) -> str:
  """A table laid out like the paper's Tables II/III: one row per pattern, ratio and metric,
  one column per method (the first document is the main method)."""
  d0 = docs[0]
  lines = [f"# {d0['dataset']}: {d0['coarse_shape'][0]}x{d0['coarse_shape'][1]} -> "
           f"{d0['fine_shape'][0]}x{d0['fine_shape'][1]} (N={d0['scale_factor']}, "
           f"{d0['aggregation']}), {d0['results'][0]['n_test_slices']} "
           f"{d0['results'][0].get('split', 'test')} slices"
           + (f"; errors in {d0['units']}" if d0.get("units") else ""), ""]
  for d in docs:
    s = d.get("sampler")
    desc = "deterministic" if not s else ", ".join(f"{k}={v}" for k, v in s.items())
    table = d.get("calendar_table")
    lines.append(f"- `{d['method']}`: {desc}; mask seed base {d['seed']}"
                 + (f"; trained on {d['trained_on']}" if d.get("trained_on") else "")
                 + (f"; calendar table `{table['table']}` ({table.get('chosen_by', '')})"
                    if table else ""))
  lines += ["", "| pattern | missing | metric | " + " | ".join(d["method"] for d in docs) + " |",
            "|---|---|---|" + "---|" * len(docs)]
  metrics = [("MAE", "mae"), ("RMSE", "rmse"), ("completion MAE", "completion_mae"),
             ("completion RMSE", "completion_rmse"), ("CRPS", "crps")]
  for k, r0 in enumerate(d0["results"]):
    for title, key in metrics:
      vals = [d["results"][k].get(key) if k < len(d["results"]) else None for d in docs]
      if key == "crps" and all(v is None for v in vals):
        continue
      lines.append(f"| {r0['pattern']} | {r0['missing_ratio']:g} | {title} | "
                   + " | ".join(_fmt(v) for v in vals) + " |")
  lines += calibration_markdown(docs)
  lines += ["", "| method | pattern | missing | seconds | maps/s |", "|---|---|---|---|---|"]
  for d in docs:
    for r in d["results"]:
      lines.append(f"| {d['method']} | {r['pattern']} | {r['missing_ratio']:g} | "
                   f"{r['seconds']:.2f} | {_fmt(r['maps_per_second'])} |")
  return "\n".join(lines) + "\n"


CALIBRATION_COLUMNS = (("CRPS", "crps"), ("cov. 50%", "coverage_50"), ("cov. 90%", "coverage_90"),
                       ("cov. 90% hidden", "coverage_90_hidden"),
                       ("cov. 90% observed", "coverage_90_observed"),
                       ("spread-skill", "spread_skill"))


def calibration_markdown(docs: list) -> list:
  """Lines of the calibration table (docs/evaluation.md): one row per sampling method and
  pattern, recalibrated numbers first, the raw ensemble's beside them where a recalibration
  was applied."""
  rows = [(d, r) for d in docs for r in d["results"] if r.get("coverage_90") is not None]
  if not rows:
    return []
  raw = any("coverage_90_raw" in r for _, r in rows)
  cols = list(CALIBRATION_COLUMNS) + ([(f"{t} raw", f"{k}_raw") for t, k in CALIBRATION_COLUMNS]
                                      if raw else [])
  lines = ["", "Calibration of the sampling methods (a calibrated ensemble: coverage = nominal, "
           "spread-skill 1" + ("; raw = the ensemble before the recalibration fitted on the "
                               "validation split" if raw else "") + "):", "",
           "| method | pattern | missing | " + " | ".join(t for t, _ in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
  for d, r in rows:
    lines.append(f"| {d['method']} | {r['pattern']} | {r['missing_ratio']:g} | "
                 + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |")
  return lines


def write_results(workdir, docs: list) -> None:
  """results.json (main method), results_<method>.json (every method), results.md (all)."""
  wd = paths.as_path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  for i, d in enumerate(docs):
    names = [f"results_{d['method']}.json"] + (["results.json"] if i == 0 else [])
    for n in names:
      paths.write_text_atomic(wd / n, json.dumps(d, indent=1))
  (wd / "results.md").write_text(results_markdown(docs))
