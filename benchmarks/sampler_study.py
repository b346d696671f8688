"""Sampler study: ensemble quality against network evaluations and seconds, on the VALIDATION split.

For a trained workdir and each sampler setting: fits the recalibration (`calibration.fit`) on
the first `--slices` validation slices (masks from seed 1: other layouts than those scored),
then scores the next `--slices` validation slices under each pattern of `--patterns` (masks
from seed 0),
raw ensemble and recalibrated, and writes `<out>/sampler_study.json` and `.md`: per setting the
fair CRPS, coverage at 50% / 90%, coverage under hidden coarse cells, spread-skill, MAE of the
point estimate, the network evaluations per map (NFE) and the wall time of the scoring (the
fit's apart). The default settings are chosen from this table (benchmarks/README.md "Sampler");
the test split is not read.

  python -m benchmarks.sampler_study --workdir=runs/nytaxi --out=benchmarks/results

Settings are "ensemble:S:steps" (ensemble "members" or "shared"); the first is the reference
the time ratio is taken against.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

DEFAULT_SETTINGS = ("shared:2:10", "shared:8:4", "members:4:4", "members:8:4", "members:8:6",
                    "members:6:8", "members:12:3")
KEYS = ("mae", "crps", "coverage_50", "coverage_90", "coverage_90_hidden", "spread_skill")


def parse_setting(text: str) -> tuple:
  """"members:8:4" -> ("members", 8, 4)."""
  ensemble, s, steps = text.split(":")
  ensemble = {"shared": "shared_completion"}.get(ensemble, ensemble)
  return ensemble, int(s), int(steps)


def nfe_per_map(ensemble: str, n_samples: int, steps: int) -> dict:
  """Network evaluations per reconstructed map, by stage (the one-pass points included)."""
  if ensemble == "members":
    return {"c": n_samples * steps + 1, "f": n_samples * steps + 1}
  return {"c": 1, "f": n_samples * steps + 1}


def study(workdir: str, settings: tuple, patterns: tuple, slices: int) -> list:
  from diffrecon_jax import evaluate, run
  from diffrecon_jax.diffrecon import calibration
  from diffrecon_jax.configs import default
  rows = []
  for text in settings:
    ensemble, n_samples, steps = parse_setting(text)
    config = default.get_config()
    config.sampling.ensemble, config.sampling.n_samples = ensemble, n_samples
    config.sampling.steps = steps
    config.calibration.enabled = False  # fitted here, on other slices than those scored
    config.eval.split = "val"
    _, task, method = run.load_method(config, workdir)
    start = time.perf_counter()
    method.calibration = calibration.fit(method, task, patterns, seed=1, max_slices=slices)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    res = evaluate.evaluate_method(task, method, patterns, seed=0, split="val",
                                   max_slices=slices, skip_slices=slices)
    seconds = time.perf_counter() - start
    row = {"setting": text, "ensemble": ensemble, "n_samples": n_samples, "steps": steps,
           "nfe": nfe_per_map(ensemble, n_samples, steps), "seconds": round(seconds, 1),
           "fit_seconds": round(fit_seconds, 1), "patterns": list(patterns), "slices": slices,
           "spread_scale": method.calibration.spread_scale}
    for key in KEYS:
      for suffix in ("", "_raw"):
        vals = [r.get(key + suffix, r.get(key)) for r in res]
        vals = [v for v in vals if v is not None]
        row[key + suffix] = float(np.mean(vals)) if vals else None
    rows.append(row)
    print(json.dumps(row), flush=True)
  ref = rows[0]["seconds"]
  for row in rows:
    row["time_vs_first"] = round(row["seconds"] / ref, 2)
  return rows


def markdown(rows: list) -> str:
  """Two tables: the recalibrated ensembles, then the raw ones (the MAE is the same point)."""
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  lines = []
  for title, suffix in (("recalibrated", ""), ("raw ensemble", "_raw")):
    lines += [f"{title}:", "",
              "| setting (ensemble:S:steps) | NFE C / F per map | MAE | CRPS | cov. 50% | "
              "cov. 90% | cov. 90% hidden | spread-skill | seconds | time vs first |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['setting']} | {r['nfe']['c']} / {r['nfe']['f']} | "
                   + " | ".join(fmt(r[k + ("" if k == "mae" else suffix)]) for k in KEYS)
                   + f" | {r['seconds']:.1f} | {r['time_vs_first']:.2f} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained DiffRecon workdir")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
  parser.add_argument("--patterns", default="fixed:0.4,random:0.4,large_scale:0.25")
  parser.add_argument("--slices", type=int, default=336, help="first validation slices scored")
  args = parser.parse_args(argv)
  rows = study(args.workdir, tuple(args.settings.split(",")), tuple(args.patterns.split(",")),
               args.slices)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "sampler_study.json").write_text(json.dumps(
      {"workdir": args.workdir, "split": "val", "rows": rows}, indent=1))
  (out / "sampler_study.md").write_text(markdown(rows))
  print(markdown(rows))


if __name__ == "__main__":
  main()
