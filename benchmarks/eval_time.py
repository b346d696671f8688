"""How long the nine-pattern evaluation of the default sampler takes against the former one.

The former default completed each map once with Diffusion-C and drew 2 fine samples of DDIM-10
from that one completion (`sampling.ensemble="shared_completion"`), uncalibrated. The default
draws `sampling.n_samples` members, each with its own completion, and recalibrates them with
scales fitted once per workdir on the validation split (calibration.json). Both are timed here
from the same checkpoints, one command after the other, on a copy of a trained workdir (the
workdir itself is not touched): first the former sampler, then the default with no
calibration.json (so the one-off fit is timed too), then the default again with the fit saved.
Writes `<out>/eval_time_<config name>.json` with each command's wall time and the per-pattern seconds
evaluate.py records in results.json.

  python -m benchmarks.eval_time --workdir=runs/nytaxi --config=configs/nytaxi.py
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

# The former default sampler (before `sampling.ensemble="members"` and the recalibration).
FORMER = ("--config.sampling.ensemble=shared_completion", "--config.sampling.n_samples=2",
          "--config.sampling.steps=10", "--config.calibration.enabled=False")
# Results files evaluate writes; removed from the copy so nothing stale is read back.
WRITTEN = ("results*.json", "results.md", "calibration.json")


def copy_workdir(src: pathlib.Path, dst: pathlib.Path) -> None:
  """The trained workdir without its results, figures and calibration."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("figures", "masks", *WRITTEN))


def timed_evaluate(config: str, workdir: pathlib.Path, flags: tuple) -> dict:
  """Wall time of one `--mode=evaluate` command and the per-pattern seconds it recorded."""
  cmd = [sys.executable, "-m", "diffrecon_jax.main", f"--config={config}",
         f"--workdir={workdir}", "--mode=evaluate", *flags]
  start = time.perf_counter()
  subprocess.run(cmd, check=True)
  wall = time.perf_counter() - start
  doc = json.loads((workdir / "results.json").read_text())
  per_pattern = {f"{r['pattern']}:{r['missing_ratio']}": r["seconds"] for r in doc["results"]}
  return {"command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1),
          "patterns_seconds": round(sum(per_pattern.values()), 1),
          "per_pattern_seconds": per_pattern, "sampler": doc["sampler"],
          "mean_mae": sum(r["mae"] for r in doc["results"]) / len(doc["results"]),
          "coverage_90": [r["coverage_90"] for r in doc["results"]],
          "spread_skill": [r["spread_skill"] for r in doc["results"]]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained workdir (not modified)")
  parser.add_argument("--config", required=True, help="the config it was trained with")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args(argv)
  src = pathlib.Path(args.workdir).resolve()
  if not (src / "joint").is_dir():
    raise SystemExit(f"{src} has no joint/ checkpoints: train it first (README main command)")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp) / src.name
    copy_workdir(src, work)
    former = timed_evaluate(args.config, work, FORMER)
    for pattern in WRITTEN:
      for path in work.glob(pattern):
        path.unlink()
    default_with_fit = timed_evaluate(args.config, work, ())
    default_fitted = timed_evaluate(args.config, work, ())
  result = {"workdir": str(src), "former": former, "default_with_fit": default_with_fit,
            "default_fitted": default_fitted,
            "ratio_patterns": round(default_fitted["patterns_seconds"]
                                    / former["patterns_seconds"], 2),
            "ratio_command_with_fit": round(default_with_fit["wall_seconds"]
                                            / former["wall_seconds"], 2)}
  path = out / f"eval_time_{pathlib.Path(args.config).stem}.json"
  path.write_text(json.dumps(result, indent=1))
  print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}), "->", path)


if __name__ == "__main__":
  main()
