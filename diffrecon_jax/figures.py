"""Figures of reconstructions, written by `evaluate` and by `--mode=reconstruct` into
`workdir/figures/`:

  surfaces_3d       3-D bar heatmaps of one slice (the paper's Fig. 10 style): truth,
                    reconstruction and absolute error (or any list of fine maps)
  uncertainty_maps  2-D maps of one slice: the reconstruction, the width of its 90% interval
                    (the samples' Weibull interval, as scored: metrics.ensemble_interval) and the
                    observed coarse cells
  coverage_bars     the 90% interval's coverage per pattern against the nominal 0.9
  reliability_diagram  observed against nominal coverage of the central intervals at 10..90%,
                    one curve per pattern (raw and recalibrated side by side)
  rank_histograms   the truth's rank among the samples, one small panel per pattern
  error_vs_ratio    a comparison's MAE and RMSE against the missing ratio, one line per method,
                    for the `fixed` and `random` patterns (the paper's Figs. 6-8 style)
  ablation_bars     a comparison's MAE per pattern, one bar per method (the paper's Fig. 9 style)
  write_safely      calls one of the above and logs a warning instead of raising: a figure that
                    fails must not cost an evaluation or a reconstruction its results

Inputs are physical units of one slice and one channel: fine maps (NI, NJ), coarse masks (I, J).
Only matplotlib's object API is used (`Figure` + Agg canvas, no pyplot): nothing global changes
in the caller's process, and matplotlib is imported when a figure is drawn, not before.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Optional, Sequence

import numpy as np
from absl import logging

from diffrecon_jax import metrics as metrics_lib
from diffrecon_jax import paths

# Small figures: a few tenths of a second each, so an evaluation's figures take a few seconds.
_DPI = 90


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=_DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path) -> pathlib.Path:
  path = paths.as_path(path)  # a workdir may be a bucket
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.save_figure(fig, path, dpi=_DPI)
  return path


def surfaces_3d(panels: Sequence[tuple], path, title: str, units: str = "") -> pathlib.Path:
  """One 3-D bar heatmap per panel, side by side; returns the path written.

  panels: (title, (NI, NJ) array, shared) triples; the panels with `shared` True get one z range
    and colour scale (truth and reconstruction compare bar for bar), the others their own
    (the error). NaN cells are drawn as zero-height bars.
  """
  from matplotlib import cm, colors
  units = units or "value (no units given)"
  fig = _figure(4.6 * len(panels), 4.4)
  shared = [np.nan_to_num(np.asarray(a, np.float64)) for _, a, s in panels if s]
  shared_max = max([float(a.max()) for a in shared] + [1e-9])
  for k, (name, arr, is_shared) in enumerate(panels):
    z = np.nan_to_num(np.asarray(arr, np.float64))
    top = shared_max if is_shared else max(float(z.max()), 1e-9)
    ax = fig.add_subplot(1, len(panels), k + 1, projection="3d")
    ni, nj = z.shape
    # Rows run along the y axis from the top of the map, as in the 2-D maps (row 0 at the back).
    xx, yy = np.meshgrid(np.arange(nj), np.arange(ni))
    cmap = cm.viridis if is_shared else cm.magma
    norm = colors.Normalize(0.0, top)
    ax.bar3d(xx.ravel(), yy.ravel(), np.zeros(z.size), 0.9, 0.9, z.ravel(),
             color=cmap(norm(z.ravel())), shade=True)
    ax.set_zlim(0.0, top)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("column (x)", fontsize=8)
    ax.set_ylabel("row (y)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.view_init(elev=35, azim=-60)
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.6, pad=0.08)
    bar.set_label(units, fontsize=8)  # the z axis shares the colour scale and its units
    bar.ax.tick_params(labelsize=7)
  fig.suptitle(title, fontsize=11)
  fig.subplots_adjust(left=0.0, right=0.96, bottom=0.02, top=0.9, wspace=0.12)
  return _save(fig, path)


def uncertainty_maps(point: np.ndarray, lower: Optional[np.ndarray], upper: Optional[np.ndarray],
                     observed: np.ndarray, path, title: str, units: str = "") -> pathlib.Path:
  """2-D maps of one slice: point (NI, NJ), the width upper - lower of its 90% interval
  (NI, NJ; omitted when None: a method without samples) and `observed` (I, J), 1 where the
  coarse cell was observed. Returns the path written."""
  from matplotlib import colors
  units = units or "value (no units given)"
  point = np.asarray(point, np.float64)
  panels = [("reconstruction", point, "viridis", units)]
  if lower is not None and upper is not None:
    panels.append(("90% interval width", np.asarray(upper, np.float64)
                   - np.asarray(lower, np.float64), "magma", units))
  panels.append((f"observed coarse cells ({int(np.sum(observed > 0))} of {observed.size})",
                 np.asarray(observed, np.float64), colors.ListedColormap(["#d9d9d9", "#238b45"]),
                 None))
  aspect = point.shape[0] / max(point.shape[1], 1)
  fig = _figure(3.7 * len(panels), 1.2 + 3.0 * aspect)
  for k, (name, arr, cmap, unit) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    if unit is None:  # the mask: two colours, a labelled two-tick colorbar
      im = ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
      bar = fig.colorbar(im, ax=ax, ticks=[0.25, 0.75], shrink=0.8)
      bar.ax.set_yticklabels(["hidden", "observed"], fontsize=8)
    else:
      im = ax.imshow(arr, cmap=cmap)
      bar = fig.colorbar(im, ax=ax, shrink=0.8)
      bar.set_label(unit, fontsize=8)
      bar.ax.tick_params(labelsize=7)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("column (x)", fontsize=8)
    ax.set_ylabel("row (y)", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.suptitle(title, fontsize=11)
  fig.subplots_adjust(left=0.04, right=0.95, bottom=0.1, top=0.85, wspace=0.3)
  return _save(fig, path)


def coverage_bars(labels: Sequence[str], coverage: Sequence[Optional[float]], path, title: str,
                  nominal: float = 0.9) -> pathlib.Path:
  """Bar chart of the share of fine cells inside their 90% interval, one bar per pattern, with
  the nominal level as a dashed line; None (no samples) is drawn as a missing bar."""
  fig = _figure(max(5.0, 0.8 * len(labels) + 2.0), 3.8)
  ax = fig.add_subplot(1, 1, 1)
  values = [np.nan if c is None else float(c) for c in coverage]
  pos = np.arange(len(labels))
  ax.bar(pos, np.nan_to_num(values), color="#4c72b0", width=0.6)
  for x, v in zip(pos, values):
    ax.text(x, (0 if np.isnan(v) else v) + 0.02, "-" if np.isnan(v) else f"{v:.2f}",
            ha="center", fontsize=8)
  ax.axhline(nominal, color="#c44e52", linestyle="--", label=f"nominal {nominal:g}")
  ax.set_xticks(pos)
  ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("share of fine cells inside", fontsize=9)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8, loc="upper right")
  fig.subplots_adjust(left=0.13, right=0.97, bottom=0.28, top=0.88)
  return _save(fig, path)


def reliability_diagram(curves: Sequence[tuple], path, title: str) -> pathlib.Path:
  """Observed against nominal coverage of the central intervals, the diagonal for reference.

  curves: (label, nominal, observed) triples, nominal / observed equal-length sequences of
    levels in [0, 1] (`metrics.PooledMetrics.reliability()`); several patterns, or a method's
    raw ensemble beside its recalibrated intervals, share one figure. None in observed (a level
    not scored) is left out of its curve. Below the diagonal: over-confident.
  """
  fig = _figure(4.8, 4.6)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot([0, 1], [0, 1], color="#7f7f7f", linestyle="--", linewidth=1, label="calibrated")
  markers = "osD^v<>px*h+"
  for i, (label, nominal, observed) in enumerate(curves):
    pts = [(float(n), float(o)) for n, o in zip(nominal, observed) if o is not None]
    if pts:
      x, y = zip(*pts)
      ax.plot(x, y, marker=markers[i % 12], markersize=4, linewidth=1.3, label=label)
  ax.set_xlim(-0.02, 1.02)  # a margin, so points at 0 or 1 (full coverage) are not cut
  ax.set_ylim(-0.02, 1.02)
  ax.set_aspect("equal")
  ax.set_xlabel("nominal level of the central interval", fontsize=9)
  ax.set_ylabel("share of fine truth values inside", fontsize=9)
  ax.tick_params(labelsize=8)
  ax.grid(alpha=0.3)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, loc="upper left")
  fig.subplots_adjust(left=0.14, right=0.97, bottom=0.11, top=0.92)
  return _save(fig, path)


def rank_histograms(hists: Sequence[tuple], path, title: str) -> pathlib.Path:
  """One small panel per pattern: the frequency of each rank of the truth among the S samples,
  with the flat 1 / (S + 1) of a calibrated ensemble as a dashed line (U-shaped: over-confident,
  dome: under-confident, sloped: biased).

  hists: (label, counts) pairs, counts S + 1 ints (`metrics.PooledMetrics.rank_histogram`);
    pairs whose counts are None (no samples) are left out.
  """
  hists = [(label, np.asarray(c, np.float64)) for label, c in hists
           if c is not None and np.sum(c) > 0]
  if not hists:
    raise ValueError("no rank histogram to draw (no method gave samples)")
  cols = min(4, len(hists))
  rows = -(-len(hists) // cols)
  height = 2.5 * rows + 0.7
  fig = _figure(3.0 * cols + 0.4, height)
  for k, (label, counts) in enumerate(hists):
    ax = fig.add_subplot(rows, cols, k + 1)
    freq = counts / counts.sum()
    ax.bar(np.arange(freq.size), freq, width=0.85, color="#4c72b0")
    ax.axhline(1.0 / freq.size, color="#c44e52", linestyle="--", linewidth=1,
               label="calibrated: 1 / (S + 1)")
    if k == 0:
      ax.legend(fontsize=7, loc="upper center")
    ax.set_title(label, fontsize=9)
    ax.set_xlabel(f"rank of the truth among {freq.size - 1} samples", fontsize=8)
    ax.set_ylabel("frequency", fontsize=8)
    ax.set_ylim(0, max(float(freq.max()), 1.0 / freq.size) * 1.15)
    ax.tick_params(labelsize=7)
  fig.suptitle(title, fontsize=11)
  # margins in inches, so one row and many rows both leave room for the titles and labels
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.5 / height, top=1 - 0.65 / height,
                      wspace=0.35, hspace=0.7)
  return _save(fig, path)


def _axis_extent(axes: tuple, shape: tuple) -> tuple:
  """(imshow extent or None, x label, y label) of a grid of `shape` (rows, cols) from
  `SpatioTemporalSeries.axes` (cropped to the shape; cell edges halfway between centres)."""
  if not axes:
    return None, "column (x)", "row (y)"
  (rname, rows, runits), (cname, cols, cunits) = axes
  rows, cols = np.asarray(rows, np.float64)[:shape[0]], np.asarray(cols, np.float64)[:shape[1]]
  # Half a (signed) step: rows stored north to south decrease, and row 0 is drawn on top.
  half = lambda c: (c[1] - c[0]) / 2 if c.size > 1 else 0.5
  extent = (cols[0] - half(cols), cols[-1] + half(cols), rows[-1] + half(rows),
            rows[0] - half(rows))
  label = lambda name, units: f"{name} ({units})" if units else name
  return extent, label(cname, cunits), label(rname, runits)


def fields_2d(truth: np.ndarray, fine: np.ndarray, lower: Optional[np.ndarray],
              upper: Optional[np.ndarray], path, title: str, units: str = "",
              axes: tuple = ()) -> pathlib.Path:
  """One slice of one channel as 2-D maps on the grid's own axes (lat / lon when the data have
  them): truth, reconstruction (one colour scale), absolute error and, with an interval, its
  width. truth, fine, lower, upper: (NI, NJ). Returns the path written."""
  units = units or "value (no units given)"
  t, f = np.asarray(truth, np.float64), np.asarray(fine, np.float64)
  panels = [("truth", t, "viridis"), ("reconstruction", f, "viridis"),
            ("absolute error", np.abs(f - t), "magma")]
  if lower is not None and upper is not None:
    panels.append(("90% interval width", np.asarray(upper, np.float64)
                   - np.asarray(lower, np.float64), "magma"))
  extent, xlabel, ylabel = _axis_extent(axes, t.shape)
  shared = (np.nanmin([np.nanmin(t), np.nanmin(f)]), np.nanmax([np.nanmax(t), np.nanmax(f)]))
  aspect = t.shape[0] / max(t.shape[1], 1)
  fig = _figure(3.6 * len(panels), 1.6 + 3.0 * aspect)
  for k, (name, arr, cmap) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    scale = dict(vmin=shared[0], vmax=shared[1]) if k < 2 else {}
    im = ax.imshow(arr, cmap=cmap, extent=extent, aspect="auto" if extent else None, **scale)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label(units, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
  fig.suptitle(title, fontsize=11)
  fig.subplots_adjust(left=0.05, right=0.96, bottom=0.18, top=0.84, wspace=0.35)
  return _save(fig, path)


# Keys of a metrics.jsonl record that are not curves.
_NOT_CURVES = ("phase", "step", "total", "steps_per_sec", "eta_sec", "time")


def training_curves(records: Sequence[dict], path, title: str) -> pathlib.Path:
  """The losses (and gradient norm) of metrics.jsonl records against the step, one panel per
  training phase in the order trained, log scale; a resumed phase's records join its curve."""
  phases = list(dict.fromkeys(r["phase"] for r in records))
  fig = _figure(4.2 * max(1, len(phases)), 3.6)
  for k, phase in enumerate(phases):
    ax = fig.add_subplot(1, len(phases), k + 1)
    rows = sorted((r for r in records if r["phase"] == phase), key=lambda r: r["step"])
    keys = sorted({key for r in rows for key in r if key not in _NOT_CURVES})
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key]) and r[key] > 0]
      if pts:
        ax.plot(*zip(*pts), label=key, linewidth=1.2,
                linestyle="--" if key == "grad_norm" else "-")
    ax.set_yscale("log")
    ax.set_title(phase, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=11)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.82, wspace=0.3)
  return _save(fig, path)


def write_safely(fn: Callable, *args, **kwargs) -> Optional[pathlib.Path]:
  """`fn(*args, **kwargs)`, or None with a warning naming the figure and the error when drawing
  fails (matplotlib missing, a broken font cache, a full disk): figures never stop a run."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    where = kwargs.get("path", "?")  # callers pass `path` by keyword
    logging.warning("figure %s not written (%s: %s)", where, type(e).__name__, e)
    return None


def evaluation_figures(folder, method: str, label: str, truth: np.ndarray, fine: np.ndarray,
                       samples: Optional[np.ndarray], observed: np.ndarray, when: str,
                       channel: str = "", units: str = "", channels: tuple = (),
                       axes: tuple = ()) -> list:
  """The figures of one evaluated slice of one pattern, safely written:
  `<method>_<label>_3d.png` (truth / reconstruction / |error|, channel 0, the paper's Fig. 10),
  `<method>_<label>_maps.png` (channel 0) and for every channel c
  `<method>_<label>_fields_<c>.png` (`fields_2d`: on the grid's own axes, e.g. lat / lon).

  truth, fine: (NI, NJ, C); samples: (S, NI, NJ, C) or None; observed: (I, J), 1 = observed;
  when: the slice's timestamp, for the titles; channels: the C channel names; axes:
  `SpatioTemporalSeries.axes`. Returns the paths written.
  """
  folder = paths.as_path(folder)
  name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in f"{method}_{label}")
  what = f"{method}, {label}, {when}" + (f", {channel}" if channel else "")
  t, f = np.asarray(truth)[..., 0], np.asarray(fine)[..., 0]
  lower = upper = None  # (NI, NJ, C)
  if samples is not None:
    # the interval the coverage is scored on (Weibull positions), not numpy's default quantiles
    lower, upper = metrics_lib.ensemble_interval(np.asarray(samples), 0.9)
  band = lambda c: (None, None) if lower is None else (lower[..., c], upper[..., c])
  out = [write_safely(surfaces_3d, [("truth", t, True), ("reconstruction", f, True),
                                    ("absolute error", np.abs(f - t), False)],
                      path=folder / f"{name}_3d.png", title=what, units=units),
         write_safely(uncertainty_maps, f, *band(0), observed,
                      path=folder / f"{name}_maps.png", title=what, units=units)]
  for c in range(np.asarray(truth).shape[-1]):
    cname = channels[c] if c < len(channels) else str(c)
    lo, hi = band(c)
    tag = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in cname)
    out.append(write_safely(fields_2d, np.asarray(truth)[..., c], np.asarray(fine)[..., c], lo,
                            hi, path=folder / f"{name}_fields_{tag}.png",
                            title=f"{method}, {label}, {when}, {cname}", units=units,
                            axes=axes))
  return [p for p in out if p is not None]


def _series(rows: Sequence[dict], method: str, pattern: str, key: str) -> tuple:
  """(ratios, means, stds) of one method, pattern kind and metric key from comparison rows."""
  pts = sorted((r["missing_ratio"], r["mean"].get(method), r["std"].get(method) or 0.0)
               for r in rows if r["pattern"] == pattern and r["key"] == key
               and r["mean"].get(method) is not None)
  return tuple(np.asarray(v, np.float64) for v in zip(*pts)) if pts else ((), (), ())


def error_vs_ratio(rows: Sequence[dict], methods: Sequence[str], path, title: str,
                   units: str = "") -> pathlib.Path:
  """2 x 2 panels (fixed, random) x (MAE, RMSE) against the missing ratio, one line per method;
  error bars are the spread over mask seeds. `rows`: `comparison.table_rows` (mae and rmse)."""
  fig = _figure(11.0, 7.6)
  markers = "osD^v<>px*h+"
  for k, (pattern, (metric, key)) in enumerate(
      [(p, m) for p in ("fixed", "random") for m in (("MAE", "mae"), ("RMSE", "rmse"))]):
    ax = fig.add_subplot(2, 2, k + 1)
    for i, m in enumerate(methods):
      x, y, e = _series(rows, m, pattern, key)
      if len(x):
        ax.errorbar(x, y, yerr=e if np.any(e > 0) else None, label=m, marker=markers[i % 12],
                    markersize=4, linewidth=1.2, capsize=2)
    ax.set_title(f"{pattern} sensors: {metric}", fontsize=10)
    ax.set_xlabel("missing ratio", fontsize=9)
    ax.set_ylabel(f"{metric}" + (f" ({units})" if units else ""), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  handles, labels = fig.axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8)
  fig.suptitle(title, fontsize=11)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.91, wspace=0.25, hspace=0.35)
  return _save(fig, path)


def ablation_bars(rows: Sequence[dict], methods: Sequence[str], path, title: str,
                  key: str = "mae", units: str = "") -> pathlib.Path:
  """Grouped bars: one group per pattern and ratio, one bar per method, of metric `key`."""
  groups = [r for r in rows if r["key"] == key]
  fig = _figure(max(7.0, 0.9 * len(groups) + 2.5), 4.4)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(1, len(methods))
  pos = np.arange(len(groups))
  for i, m in enumerate(methods):
    vals = [np.nan if r["mean"].get(m) is None else r["mean"][m] for r in groups]
    errs = [0.0 if r["std"].get(m) is None else r["std"][m] for r in groups]
    ax.bar(pos + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(vals), width,
           yerr=errs if any(e > 0 for e in errs) else None, label=m, capsize=2)
  ax.set_xticks(pos)
  ax.set_xticklabels([f"{r['pattern']}:{r['missing_ratio']:g}" for r in groups], rotation=30,
                     ha="right", fontsize=8)
  metric = {"mae": "MAE", "rmse": "RMSE"}.get(key, key)
  ax.set_ylabel(metric + (f" ({units})" if units else ""), fontsize=9)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8, ncol=min(4, max(1, len(methods))))
  ax.grid(axis="y", alpha=0.3)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.24, top=0.9)
  return _save(fig, path)
