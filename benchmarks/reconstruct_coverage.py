"""Does the interval `--mode=reconstruct` writes hold the truth as often as it says?

For a workdir trained on the example user grid (README "Your own grid": the embedded NYC bike
flows written by `diffrecon_jax.data.example_grid`), this writes the last `--last` slices of
that grid pooled by N with a fraction `--nan-fraction` of the coarse cells NaN (the README's
`observed.nc`), reconstructs them exactly as a user does (`--mode=reconstruct`), and scores the
written `fine_q05` .. `fine_q95` band (and `coarse_q05` .. `coarse_q95` on the hidden coarse
cells) against the true fine maps the file was made from, which the model never saw (the last
days lie in the test split). Writes `<out>/reconstruct_coverage.json`.

  python -m benchmarks.reconstruct_coverage --workdir=runs/mygrid --out=benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np


def coverage_of_band(lo: np.ndarray, hi: np.ndarray, truth: np.ndarray,
                     where: np.ndarray = None) -> float:
  """Share of finite truth cells (optionally only `where`) inside [lo, hi]."""
  keep = np.isfinite(truth)
  if where is not None:
    keep &= np.broadcast_to(where, truth.shape)
  inside = (truth >= lo) & (truth <= hi)
  return float(inside[keep].mean())


def score(npz_path, last: int, scale: int) -> dict:
  """Coverage of the written bands against the truth of the last `last` slices."""
  from diffrecon_jax.data import example_grid
  from diffrecon_jax import metrics
  rec = np.load(npz_path)
  fine_truth_all = example_grid.example_series().values[-last:]
  # The file's reconstructed slices are its last n (each needs 2 x history slices before it).
  n = rec["fine"].shape[0]
  fine_truth = fine_truth_all[-n:]
  coarse_truth = example_grid.example_series(coarsen=scale).values[-n:]
  hidden_f = metrics.hidden_fine_cells(rec["observed"], scale)
  hidden_c = (rec["observed"] == 0)[..., None]
  return {
      "slices": int(n),
      "fine_coverage_90": coverage_of_band(rec["fine_q05"], rec["fine_q95"], fine_truth),
      "fine_coverage_90_hidden": coverage_of_band(rec["fine_q05"], rec["fine_q95"], fine_truth,
                                                  hidden_f),
      "fine_coverage_90_observed": coverage_of_band(rec["fine_q05"], rec["fine_q95"],
                                                    fine_truth, ~hidden_f),
      "coarse_coverage_90_hidden": coverage_of_band(rec["coarse_q05"], rec["coarse_q95"],
                                                    coarse_truth, hidden_c),
      "fine_mae": float(np.nanmean(np.abs(rec["fine"] - fine_truth))),
      "mean_band_width": float(np.mean(rec["fine_q95"] - rec["fine_q05"])),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--last", type=int, default=336, help="slices in the observed file")
  parser.add_argument("--nan-fraction", type=float, default=0.3)
  parser.add_argument("--scale", type=int, default=2)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  observed = out / "reconstruct_coverage_observed.nc"
  run = lambda *cmd: subprocess.run([sys.executable, "-m", *cmd], check=True)
  run("diffrecon_jax.data.example_grid", str(observed), "--coarsen", str(args.scale), "--last",
      str(args.last), "--nan-fraction", str(args.nan_fraction))
  stem = out / "reconstruct_coverage"
  run("diffrecon_jax.main", "--config=configs/custom.py", f"--workdir={args.workdir}",
      "--mode=reconstruct", f"--config.reconstruct.input={observed}",
      f"--config.reconstruct.output={stem}")
  result = {"workdir": args.workdir, "nan_fraction": args.nan_fraction, "last": args.last,
            **score(stem.with_suffix(".npz"), args.last, args.scale)}
  observed.unlink()
  (out / "reconstruct_coverage.json").write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
