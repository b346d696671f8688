"""The comparison table of several methods' results (the paper's Tables II/III layout).

Input: {method: [results document per mask seed]} (the results.json documents of
docs/evaluation.md, every method scored on the same patterns and masks). Output:

  table_rows     one row per pattern x missing ratio x metric: each method's mean over the seeds
                 and its spread (population std; 0 with one seed)
  markdown       methods as columns, the best value of a row in bold and the second underlined,
                 and the main method's change against the best *other* method in the last column
                 ("Improve" in the paper: positive = the main method's error is lower)
  csv_text       the same rows as CSV (means, stds and the change as numbers)
  wins_summary   in words: on how many rows the main method is best, and which method beats it
                 where it is not

Lower is better for every metric here (MAE, RMSE, CRPS, completion errors).
"""
from __future__ import annotations

import csv
import io
from typing import Optional, Sequence

import numpy as np

# (title, key in a results entry): the paper's tables show MAE and RMSE.
METRICS = (("MAE", "mae"), ("RMSE", "rmse"))
EXTRA_METRICS = (("CRPS", "crps"), ("completion MAE", "completion_mae"))


def _entry_key(entry: dict) -> tuple:
  return (entry["pattern"], round(float(entry["missing_ratio"]), 6))


def table_rows(docs: dict, metrics: Sequence[tuple] = METRICS) -> list:
  """Rows of the table.

  Args:
    docs: {method: [results document, one per mask seed]} (methods in column order).
    metrics: (title, key) pairs.
  Returns:
    [{"pattern", "missing_ratio", "metric" (title), "key", "mean": {method: float or None},
      "std": {method: float or None}, "n": {method: seeds scored}}], patterns in the order of the
    first method's first document.
  """
  methods = list(docs)
  if not methods:
    raise ValueError("no results to tabulate")
  order = [_entry_key(e) for e in docs[methods[0]][0]["results"]]
  values = {m: {} for m in methods}  # method -> (pattern, ratio, key) -> [values over seeds]
  for m in methods:
    for doc in docs[m]:
      for e in doc["results"]:
        for _, key in metrics:
          if e.get(key) is not None:
            values[m].setdefault(_entry_key(e) + (key,), []).append(float(e[key]))
  rows = []
  for pattern, ratio in order:
    for title, key in metrics:
      got = {m: values[m].get((pattern, ratio, key), []) for m in methods}
      if not any(got.values()):
        continue
      rows.append({"pattern": pattern, "missing_ratio": ratio, "metric": title, "key": key,
                   "mean": {m: float(np.mean(v)) if v else None for m, v in got.items()},
                   "std": {m: float(np.std(v)) if v else None for m, v in got.items()},
                   "n": {m: len(v) for m, v in got.items()}})
  return rows


def ranking(row: dict, methods: Sequence[str]) -> list:
  """The methods with a value in `row`, best (lowest mean) first."""
  have = [m for m in methods if row["mean"].get(m) is not None]
  return sorted(have, key=lambda m: row["mean"][m])


def improvement(row: dict, main: str, others: Sequence[str]) -> Optional[float]:
  """(best other - main) / best other in percent: positive when `main` is better; None when
  either side has no value."""
  best = ranking(row, [m for m in others if m != main])
  if not best or row["mean"].get(main) is None or row["mean"][best[0]] == 0:
    return None
  ref = row["mean"][best[0]]
  return 100.0 * (ref - row["mean"][main]) / ref


def _cell(row: dict, m: str, places: int) -> str:
  mean = row["mean"].get(m)
  if mean is None:
    return "-"
  text = f"{mean:.{places}f}"
  if row["n"][m] > 1:
    text += f" ± {row['std'][m]:.{places}f}"
  return text


def markdown(rows: list, methods: Sequence[str], main: Optional[str] = None,
             others: Optional[Sequence[str]] = None, places: int = 3) -> str:
  """The table in markdown: bold = best of the row, underlined = second; with `main`, a last
  column of its change against the best of `others` (default: every other column)."""
  methods = list(methods)
  others = [m for m in (others if others is not None else methods) if m != main]
  head = ["pattern", "missing", "metric"] + methods
  if main:
    head.append(f"{main} vs best other")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    rank = ranking(row, methods)
    cells = []
    for m in methods:
      text = _cell(row, m, places)
      if rank and m == rank[0]:
        text = f"**{text}**"
      elif len(rank) > 1 and m == rank[1]:
        text = f"<u>{text}</u>"
      cells.append(text)
    if main:
      imp = improvement(row, main, others)
      cells.append("-" if imp is None else f"{imp:+.1f}%")
    lines.append(f"| {row['pattern']} | {row['missing_ratio']:g} | {row['metric']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def csv_text(rows: list, methods: Sequence[str], main: Optional[str] = None,
             others: Optional[Sequence[str]] = None) -> str:
  """The rows as CSV: pattern, missing_ratio, metric, then per method its mean and std, then
  the main method's improvement in percent (empty when undefined)."""
  methods = list(methods)
  others = [m for m in (others if others is not None else methods) if m != main]
  out = io.StringIO()
  w = csv.writer(out)
  head = ["pattern", "missing_ratio", "metric"]
  for m in methods:
    head += [m, f"{m}_std"]
  if main:
    head.append(f"{main}_improve_percent")
  w.writerow(head)
  for row in rows:
    line = [row["pattern"], f"{row['missing_ratio']:g}", row["key"]]
    for m in methods:
      mean, std = row["mean"].get(m), row["std"].get(m)
      line += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}"]
    if main:
      imp = improvement(row, main, others)
      line.append("" if imp is None else f"{imp:.3f}")
    w.writerow(line)
  return out.getvalue()


def wins_summary(rows: list, main: str, others: Sequence[str]) -> str:
  """Where `main` is best among itself and `others`, and where it is not (who wins), in words."""
  contenders = [main] + [m for m in others if m != main]
  lost = []
  won = 0
  total = 0
  for row in rows:
    rank = ranking(row, contenders)
    if main not in rank:
      continue
    total += 1
    if rank[0] == main:
      won += 1
    else:
      lost.append(f"{row['pattern']}:{row['missing_ratio']:g} {row['metric']} "
                  f"({rank[0]} {row['mean'][rank[0]]:.3f} vs {row['mean'][main]:.3f})")
  text = f"{main} is best on {won} of {total} rows."
  if lost:
    text += " Not best on: " + "; ".join(lost) + "."
  return text
