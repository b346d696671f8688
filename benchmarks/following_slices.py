"""What the slices after t would tell the stage-1 first guess: a lever for offline reconstruction.

The first guess of a hidden coarse cell (`prior.hidden_guess`: the cell's climatology at
the level of the window's recency-weighted observations, the map's and, with `prior.local`,
the cell's own) reads the window's earlier slices only, as the paper's ST-PointFormer does
(ST-points of slices 0..t, Sec. IV-C). A user reconstructing a past period also has the
observations after t. This scores, on the VALIDATION split of a trained workdir, the completion
MAE at hidden coarse cells (physical units) of the same guess, and the fine MAE of that guess
split by the prior's shares (the `prior` method's fine map), when its window also holds the k
following slices, each weighted by its distance from t as the earlier ones are
(level_decay^|s - t|), for every evaluation pattern of the workdir's config and each k in
`--following`. k = 0 is the guess the model uses today (`test_benchmarks` checks that it equals
`prior.coarse_guess`). It measures the prior alone, no network; the networks would see the same
extra slices. Writes `<out>/following_slices_<dataset>.json` and prints a table.

  python -m benchmarks.following_slices --workdir=runs/nytaxi --out=benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np


def guess_with_following(prior, coarse_phys: np.ndarray, observed: np.ndarray,
                         slots: np.ndarray, current: np.ndarray, history: int,
                         following: int) -> np.ndarray:
  """First guess of the coarse maps at `current` from the window t-history .. t+following.

  The model's own guess (`prior.hidden_guess`) on a window ordered t-history .. t-1,
  t+1 .. t+following, t: it reads the window's LAST slice as the one to guess and sums over
  the others whatever their order, so the following slices enter with the weights
  level_decay^|s - t| and nothing else changes.

  Args:
    prior: a `prior.Prior`.
    coarse_phys: (T, I, J, C) physical coarse series (read only where observed).
    observed: (T, I, J) bool, the evaluation mask.
    slots: (T,) int climatology slot of each slice.
    current: (n,) indices t with t - history >= 0 and t + following < T.
    history, following: slices before and after t in the window.
  Returns:
    (n, I, J, C) physical: observed cells of t as observed, hidden ones the prior's guess.
  """
  import jax.numpy as jnp
  from diffrecon_jax.diffrecon import prior as prior_lib
  offsets = np.concatenate([np.arange(-history, 0), np.arange(1, following + 1), [0]])
  idx = current[:, None] + offsets[None, :]                                # (n, t), t last
  m = observed[idx][..., None]                                              # (n, t, I, J, 1)
  phys = np.where(m, coarse_phys[idx], 0.0).astype(np.float32)
  clim = np.asarray(prior.coarse, np.float32)[slots[idx]]                  # (n, t, I, J, C)
  w = (float(prior.level_decay) ** np.abs(offsets)).astype(np.float32)
  hidden, _ = prior_lib.hidden_guess(prior, jnp.asarray(phys), jnp.asarray(m),
                                     jnp.asarray(clim), jnp.asarray(w))
  return np.where(m[:, -1], coarse_phys[current], np.asarray(hidden, np.float64))


def prior_fine_mae(prior, guess: np.ndarray, slots_now: np.ndarray, truth: np.ndarray,
                   batch: int = 256) -> float:
  """Fine MAE (physical, every cell) of the coarse maps `guess` (n, I, J, C) split by the
  prior's shares (`prior.fine_base`): the `prior` method's fine map from that guess."""
  from diffrecon_jax.diffrecon import prior as prior_lib
  c_mean, c_std = (np.asarray(prior.stats["coarse"][k], np.float64) for k in ("mean", "std"))
  f_mean, f_std = (np.asarray(prior.stats["fine"][k], np.float64) for k in ("mean", "std"))
  total, count = 0.0, 0
  for i in range(0, len(guess), batch):
    g = ((guess[i:i + batch] - c_mean) / c_std).astype(np.float32)
    f = np.asarray(prior_lib.fine_base(prior, g, slots_now[i:i + batch]), np.float64)
    err = np.abs(f * f_std + f_mean - truth[i:i + batch])
    ok = np.isfinite(err)
    total, count = total + float(err[ok].sum()), count + int(ok.sum())
  return total / count


def study(workdir: str, following: tuple, seed: int) -> dict:
  """{pattern: {"k=<k>": completion MAE at hidden cells, ...}, "_slices": n} on the validation
  slices whose window t-history .. t+max(following) is whole (no gap, inside the series)."""
  from diffrecon_jax import evaluate
  from diffrecon_jax.data import patterns as patterns_lib
  from diffrecon_jax.data import pipeline
  from diffrecon_jax.diffrecon import checkpoints
  from diffrecon_jax.diffrecon import prior as prior_lib
  wd = pathlib.Path(workdir)
  config = checkpoints.config_from_json((wd / "config.json").read_text())
  task = pipeline.prepare_task(config)
  prior = prior_lib.Prior.load(prior_lib.prior_path(wd), task.stats)
  h, f_max = int(task.history), max(following)
  lo, hi = task.split.range("val")
  coarse = np.asarray(task.coarse_phys, np.float64)
  fine = np.asarray(task.fine_phys, np.float64)
  n_slices = coarse.shape[0]
  whole = task.time_axis.whole_windows(h + f_max + 1)
  current = np.array([t for t in range(max(lo, h), min(hi, n_slices - f_max))
                      if whole[t + f_max] and not task.inserted[t]], np.int64)
  slots = prior.slots(task.series.timestamps)
  out = {"_dataset": str(config.data.name), "_slices": int(len(current)), "_history": h,
         "_table": prior.table, "_local": bool(prior.local)}
  for spec in config.patterns.eval:
    pattern = patterns_lib.parse_pattern(spec)
    observed = evaluate.eval_mask(task, pattern, seed)[0] > 0.5  # the evaluation's masks
    hidden = ~observed[current]
    row = {}
    for k in following:
      guess = guess_with_following(prior, coarse, observed, slots, current, h, k)
      err = np.abs(guess - coarse[current])[np.broadcast_to(hidden[..., None], guess.shape)]
      row[f"k={k}"] = float(err.mean())
      row[f"fine k={k}"] = prior_fine_mae(prior, guess, slots[current], fine[current])
    out[spec] = row
  return out


def markdown(result: dict, following: tuple) -> str:
  """Completion MAE at hidden cells, then the prior's fine MAE, per pattern and k."""
  cols = [f"completion, {k} following" for k in following] + ["change"] + \
         [f"fine, {k} following" for k in following] + ["change"]
  lines = ["| pattern | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
  for spec, row in result.items():
    if spec.startswith("_"):
      continue
    cells = []
    for prefix in ("k=", "fine k="):
      vals = [row[f"{prefix}{k}"] for k in following]
      cells += [f"{v:.3f}" for v in vals] + [f"{100 * (vals[-1] / vals[0] - 1):+.1f}%"]
    lines.append(f"| {spec} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained workdir (config.json, prior.npz)")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--following", default="0,1,2,6",
                      help="comma-separated counts of following slices; 0 first")
  parser.add_argument("--seed", type=int, default=0, help="mask seed")
  args = parser.parse_args(argv)
  following = tuple(int(k) for k in args.following.split(","))
  if not following or following[0] != 0 or min(following) < 0:
    parser.error(f"--following must start with 0 and hold no negative count, got {args.following}")
  start = time.time()
  result = study(args.workdir, following, args.seed)
  result["_seconds"] = round(time.time() - start, 1)
  result["_command"] = ("python -m benchmarks.following_slices --workdir=" + args.workdir
                        + f" --following={args.following} --seed={args.seed}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"following_slices_{result['_dataset']}.json").write_text(json.dumps(result, indent=1) + "\n")
  print(markdown(result, following))


if __name__ == "__main__":
  main()
