"""What `main` does, importable from a notebook: train, evaluate, reconstruct.

`run(config, workdir, mode)` dispatches on `config.method`: "diffrecon" (the two-stage diffusion
model) or a baseline name ("interp"). Every evaluation writes results.json / results.md into the
workdir by docs/evaluation.md; DiffRecon's results carry the `climatology` and `interp` baselines
beside them.
"""
from __future__ import annotations

import json
import os
import pathlib

from absl import logging

from diffrecon_jax import evaluate as evaluate_lib
from diffrecon_jax.baselines import climatology, interp
from diffrecon_jax.data import pipeline

MODES = ("train", "evaluate", "train_and_evaluate", "reconstruct")
BASELINES = {"interp": interp.InterpBaseline, "climatology": climatology.ClimatologyBaseline}
# Deterministic references scored beside every learned method, on the same masks
# (docs/evaluation.md): the floor and the bar.
REFERENCES = ("climatology", "interp")


def _baseline(name: str):
  if name not in BASELINES:
    raise ValueError(f"unknown method {name!r}; expected 'diffrecon' or one of {sorted(BASELINES)}")
  return BASELINES[name]()


def evaluate_methods(config, workdir, task, methods: list, extra: dict = None) -> list:
  """Scores `methods` (the first is the main one) and writes the results files."""
  docs = []
  for m in methods:
    res = evaluate_lib.evaluate_method(
        task, m, tuple(config.patterns.eval), seed=int(config.patterns.eval_mask_seed),
        split=config.eval.split, max_slices=int(config.eval.max_slices),
        chunk=int(config.eval.get("chunk_slices", 0)), workdir=workdir)
    docs.append(evaluate_lib.results_document(task, m, res, int(config.patterns.eval_mask_seed),
                                              extra if m is methods[0] else None))
  evaluate_lib.write_results(workdir, docs)
  logging.info("wrote %s", pathlib.Path(workdir) / "results.md")
  return docs


def resolve_workdir(workdir) -> str:
  """`workdir` as an absolute path ("~" expanded); a relative path is taken from the current
  directory. Raises ValueError for an empty path or one that exists as a file."""
  if workdir is None or str(workdir).strip() == "":
    raise ValueError("workdir is empty: pass --workdir=DIR (created if missing)")
  path = os.path.abspath(os.path.expanduser(str(workdir)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"workdir {path} exists and is not a directory")
  return path


def run(config, workdir: str, mode: str = "train_and_evaluate") -> list:
  """Runs `mode` for `config` in `workdir`; returns the results documents (if any)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  # Orbax needs absolute paths, and a notebook may change its directory between calls: resolve
  # once, against the directory the run was started from.
  workdir = resolve_workdir(workdir)
  wd = pathlib.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / "config.json").write_text(config.to_json_best_effort(indent=1))
  if config.method != "diffrecon":
    if mode in ("train", "reconstruct"):
      raise ValueError(f"method {config.method!r} has nothing to train; use --mode=evaluate")
    task = pipeline.prepare_task(config)
    return evaluate_methods(config, workdir, task, [_baseline(config.method)])
  from diffrecon_jax import diffrecon_method  # local: pulls in the models only when needed.
  return diffrecon_method.run(config, workdir, mode)
