"""The paper's experiments on one dataset in one command (Sec. V: Tables II/III, Figs. 6-9).

  python -m diffrecon_jax.experiments --config=configs/nytaxi.py --methods=all --workdir=DIR
  python -m diffrecon_jax.experiments --config=configs/nytaxi.py --methods=all --workdir=DIR \\
      --mask_seeds=0,1,2                       # mean and spread over three mask draws
  python -m diffrecon_jax.experiments --config=configs/nytaxi.py --methods=all --workdir=DIR \\
      --smoke                                  # every method, a few steps on a few slices
  ... --train_on_eval_layout   # each learning method trained per pattern on its own layout

Trains and scores every chosen method on the same data, patterns and masks (docs/evaluation.md),
then writes beside them:
  DIR/comparison.md, .csv   DiffRecon, the baselines and the references, methods as columns,
                            pattern x ratio x metric as rows, best bold, second underlined,
                            DiffRecon's change against the best other method in the last column,
                            and in words where it wins and where it does not
  DIR/ablations.md, .csv    DiffRecon against its ablations (Sec. V-C), same layout
  DIR/figures/              MAE / RMSE against the missing ratio (fixed, random) and the
                            ablation bars
  DIR/<method>/seed_<s>/    each method's results.json, results.md and masks per mask seed
  DIR/<method>/             training checkpoints of the diffusion methods (resumable)
  DIR/timing.json           wall time of every method (training + evaluation)
  DIR/budgets.json          every method's training budget (steps, batch) and wall time, also
                            a table in comparison.md
It resumes: a method whose results exist for every seed is not run again, and an interrupted
training continues from its last checkpoint. Ablations that train a phase exactly as DiffRecon
does (noJoint: both pre-training phases, noFG: Diffusion-C's) start from DiffRecon's finished
checkpoints of those phases (`ablations.SHARED_PHASES`) instead of training them again.

Methods (`--methods`, comma-separated names or groups of `methods.REGISTRY`):
  references  interp, climatology
  baselines   srcnn, srresnet, urbanfm, fode, stcf, urbansta, diffuflow
  diffrecon   DiffRecon, prior (its climatology prior alone, no network) and diffrecon_paper
              (the paper's model as published: the `:paper` variant, same steps and masks)
  ablations   diffrecon and diffrecon-noPre, diffrecon-noJoint, diffrecon-noSTPointFormer,
              diffrecon-noTPatternNet, diffc-<net> for the paper's noFG networks
  all         every one of the above
"""
from __future__ import annotations

import json
import pathlib
import shutil
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from ml_collections import config_flags

from diffrecon_jax.diffrecon import ablations
from diffrecon_jax import comparison
from diffrecon_jax import console
from diffrecon_jax import curves
from diffrecon_jax import parallel
from diffrecon_jax import evaluate as evaluate_lib
from diffrecon_jax import figures
from diffrecon_jax import methods as methods_lib
from diffrecon_jax.methods import MAIN, PAPER, PRIOR
from diffrecon_jax import run as run_lib
from diffrecon_jax.smoke import smoke_config
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.data import pipeline
from diffrecon_jax.diffrecon.prior_method import PriorMethod


def baselines() -> tuple:
  """The paper's baselines (Sec. V-A.4), in the paper's order."""
  return methods_lib.names("baselines")


def ablation_methods() -> tuple:
  """Method names of the ablations: diffrecon-<switch>, and diffc-<net> for noFG."""
  return methods_lib.names("ablations")


def groups() -> dict:
  """Group name -> method names: the registry's groups, "ablations" with DiffRecon first (it is
  compared with them and they reuse its phases), and "all"."""
  g = {name: methods_lib.names(name) for name in methods_lib.GROUPS}
  g["ablations"] = (MAIN,) + g["ablations"]
  return dict(g, all=methods_lib.names())


def parse_methods(spec: str) -> list:
  """"all" / group names / method names, comma-separated -> method names, each once, in the
  registry's order: references, baselines, DiffRecon, ablations (DiffRecon trains before the
  ablations that reuse its phases). A ValueError names an unknown entry."""
  g = groups()
  chosen = set()
  for part in filter(None, (p.strip() for p in str(spec).split(","))):
    if part in g:
      chosen.update(g[part])
    elif part in g["all"]:
      chosen.add(part)
    else:
      raise ValueError(f"unknown method or group {part!r}; groups: {sorted(g)}, methods: "
                       f"{list(g['all'])}")
  if not chosen:
    raise ValueError("--methods is empty")
  return [m for m in g["all"] if m in chosen]


def training_dir(workdir: pathlib.Path, method: str, tag: str = "") -> pathlib.Path:
  """Where a diffusion method's checkpoints live; every diffc-<net> shares one Diffusion-C.
  `tag`: the training layout's folder when training on the evaluation's own layout."""
  base = workdir / ("diffc" if method.startswith("diffc-") else method)
  return base / "layout" / f"train_{tag}" if tag else base


def _seed_dir(workdir: pathlib.Path, method: str, seed: int) -> pathlib.Path:
  return workdir / method / f"seed_{seed}"


def _done(workdir: pathlib.Path, method: str, seed: int) -> bool:
  return (_seed_dir(workdir, method, seed) / "results.json").exists()


def _copy_shared_phases(workdir: pathlib.Path, method: str, tag: str = "") -> None:
  """Seeds an ablation's training folder with DiffRecon's finished phases that it would train
  identically (`ablations.SHARED_PHASES`), when DiffRecon has them and the ablation does not."""
  phases = ablations.SHARED_PHASES.get(methods_lib.ablation_name(method), ())
  src, dst = training_dir(workdir, MAIN, tag), training_dir(workdir, method, tag)
  for phase in phases:
    if (dst / phase).exists() or not (src / phase).exists():
      continue
    # Only DiffRecon's finished step is needed; copying its folder keeps Orbax's layout.
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / phase, dst / phase)
    for extra in ("prior.npz",):
      if (src / extra).exists() and not (dst / extra).exists():
        shutil.copy2(src / extra, dst / extra)
    logging.info("%s: %s taken from %s (trained identically)", method, phase, src / phase)


def _evaluate(config, method_obj, task, out: pathlib.Path, seed: int) -> dict:
  c = config.copy_and_resolve_references()
  c.patterns.eval_mask_seed = int(seed)
  out.mkdir(parents=True, exist_ok=True)
  docs = run_lib.evaluate_methods(c, str(out), task, [method_obj], figures=False)
  return docs[0]


def _trained_method(config, workdir: pathlib.Path, method: str, task, tag: str = "") -> tuple:
  """(task, method object) of `method` under `config`, trained first when it is a diffusion
  method (resuming its checkpoints; `tag`: its training-layout folder)."""
  if config.method == PRIOR:  # DiffRecon's prior: trains (or reuses) DiffRecon itself
    main_config = methods_lib.method_config(config, MAIN)
    task_m, main = _trained_method(main_config, workdir, MAIN, task, tag)
    return task_m, PriorMethod(main.models.prior, task_m.history)
  if config.method == MAIN:
    tdir = training_dir(workdir, method, tag)
    _copy_shared_phases(workdir, method, tag)
    run_lib.run(config, str(tdir), "train")
    _, task_m, method_obj = run_lib.load_method(config, str(tdir))
    if method == PAPER:  # its config is DiffRecon's with other fields: name it apart
      method_obj.name = PAPER
    return task_m, method_obj
  task_m = task if task is not None else pipeline.prepare_task(config)
  return task_m, methods_lib.build(method, config)


def run_method(config, workdir: pathlib.Path, method: str, seeds: Sequence[int],
               task=None) -> list:
  """Trains (when needed) and scores `method` on every mask seed not scored yet; returns its
  results documents, one per seed (read back for the seeds done earlier)."""
  todo = [s for s in seeds if not _done(workdir, method, s)]
  if todo:
    c = methods_lib.method_config(config, method)
    task_m, method_obj = _trained_method(c, workdir, method, task)
    for s in todo:
      _evaluate(c, method_obj, task_m, _seed_dir(workdir, method, s), s)
  return [json.loads((_seed_dir(workdir, method, s) / "results.json").read_text())
          for s in seeds]


def layout_training_pattern(task, spec: str, seed: int, folder: pathlib.Path) -> str:
  """The training pattern that is an evaluation pattern's own layout: for `fixed`, a layout file
  with exactly the cells the evaluation hides under mask seed `seed` (written to `folder`); a
  user's `file:` mask and the `random` / `large_scale` patterns train on themselves."""
  p = patterns_lib.parse_pattern(spec)
  if p.kind != "fixed":
    return spec
  mask = patterns_lib.make_eval_mask(p, 1, task.coarse_shape,
                                     evaluate_lib.pattern_seed(seed, p.kind))[0]
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{evaluate_lib.file_label(p.label)}_seed{seed}.npy"
  np.save(path, mask)
  return f"file:{path}"


def run_method_on_layouts(config, workdir: pathlib.Path, method: str, seeds: Sequence[int],
                          task) -> list:
  """Like `run_method`, but a method that learns trains once per evaluation pattern on that
  pattern's own layout (`layout_training_pattern`; a `fixed` layout once per mask seed) and is
  scored on it alone; the per-pattern results are joined into one document per seed, each entry
  with the pattern it was `trained_on`."""
  if methods_lib.REGISTRY[method].group == "references":
    return run_method(config, workdir, method, seeds, task)
  out = []
  for s in seeds:
    if not _done(workdir, method, s):
      entries, doc = [], None
      for spec in config.patterns.eval:
        label = evaluate_lib.file_label(patterns_lib.parse_pattern(spec).label)
        part = workdir / method / "layout" / f"{label}_seed{s}"
        train_spec = layout_training_pattern(task, spec, s, workdir / "layouts")
        if not (part / "results.json").exists():
          c = methods_lib.method_config(config, method)
          c.patterns.train, c.patterns.eval = (train_spec,), (spec,)
          tag = label if train_spec == spec else f"{label}_seed{s}"
          task_m, method_obj = _trained_method(c, workdir, method, task, tag)
          _evaluate(c, method_obj, task_m, part, s)
        doc = json.loads((part / "results.json").read_text())
        entries += [dict(e, trained_on=train_spec) for e in doc["results"]]
      doc = dict(doc, results=entries, trained_on_eval_layout=True)
      doc.pop("trained_on", None)
      evaluate_lib.write_results(_seed_dir(workdir, method, s), [doc])
    out.append(json.loads((_seed_dir(workdir, method, s) / "results.json").read_text()))
  return out


def training_budget(config: ml_collections.ConfigDict, method: str) -> dict:
  """What `method` trains under `config` (`methods.method_config`'s): {"training": words with its
  steps per phase, "batch": maps per step (None without training)}; every learning method's
  budget in one place, so the comparison lists them side by side."""
  c = methods_lib.method_config(config, method)
  t = c.train
  if methods_lib.REGISTRY[method].group == "references":
    return {"training": "none (statistics of the train split)", "batch": None}
  if method == PRIOR:
    return {"training": "none (DiffRecon's prior: train-split statistics)", "batch": None}
  if method == "urbansta":  # its budget as its builder resolves it (-1 = DiffRecon's)
    u = methods_lib.build(method, c)
    return {"training": f"STA {u.steps['sta']} + FIN {u.steps['fin']} + joint "
                        f"{u.steps['joint']} steps", "batch": u.batch_size}
  if method == "diffuflow":
    d = methods_lib.build(method, c)
    return {"training": f"{d.steps} steps; {d.n_samples} samples x DDIM-{d.sampling_steps}, "
                        f"{d.point}", "batch": d.batch_size}
  if methods_lib.trains_diffrecon(method):
    # The steps the ablation trains (`ablations.apply`: noPre's joint phase takes the
    # pre-training steps, noFG trains Diffusion-C alone), not the config's as given.
    t = ablations.apply(c).train
    phases = {"noPre": f"joint {t.steps_joint}",
              "noJoint": f"Diffusion-C {t.steps_c} + Diffusion-F {t.steps_f}",
              "noFG": f"Diffusion-C {t.steps_c}; "
                      f"{c.ablation_fine_network} {c.baselines.steps}"}.get(
                          c.ablation, f"Diffusion-C {t.steps_c} + Diffusion-F {t.steps_f} + "
                                      f"joint {t.steps_joint}")
    return {"training": phases + " steps", "batch": int(t.batch_size)}
  b = c.baselines
  pre = f" (+ {b.stcf_pretrain_steps} x 2 contrastive)" if method == "stcf" else ""
  return {"training": f"{b.steps} steps{pre}", "batch": int(b.batch_size)}


def training_seconds(folder: pathlib.Path) -> Optional[float]:
  """Wall time of a diffusion method's training from its metrics.jsonl (per phase: the span of
  its records plus the steps before the first one at that record's rate); None without one."""
  records = curves.read_metrics(folder)
  total = 0.0
  for phase in dict.fromkeys(r["phase"] for r in records):
    rows = [r for r in records if r["phase"] == phase]
    first = rows[0]
    lead = first["step"] / first["steps_per_sec"] if first.get("steps_per_sec") else 0.0
    total += max(r["time"] for r in rows) - first["time"] + lead
  return round(total, 1) if records else None


def budget_table(budgets: dict) -> str:
  """Markdown table of {method: {"training", "batch", "train_s", "wall_s"}}."""
  lines = ["| method | training | batch | training time | wall time of this run |",
           "|---|---|---|---|---|"]
  fmt = lambda v: "-" if v is None else f"{v:.0f} s"
  for m, b in budgets.items():
    lines.append(f"| {m} | {b['training']} | {b['batch'] or '-'} | {fmt(b.get('train_s'))} | "
                 f"{fmt(b.get('wall_s'))} |")
  return "\n".join(lines)


def write_tables(workdir: pathlib.Path, docs: dict, units: str = "",
                 budgets: Optional[dict] = None) -> dict:
  """comparison.md/.csv, ablations.md/.csv and the figures from {method: [docs]}; returns
  {name: path} of what was written. `budgets`: {method: `training_budget` + "wall_s"}, listed
  under the tables."""
  written = {}
  fig_dir = workdir / "figures"
  main_docs = docs.get(MAIN)
  d0 = next(iter(docs.values()))[0]
  head = (f"{d0['dataset']}: {d0['coarse_shape'][0]}x{d0['coarse_shape'][1]} -> "
          f"{d0['fine_shape'][0]}x{d0['fine_shape'][1]} (N={d0['scale_factor']}), "
          f"{d0['results'][0]['n_test_slices']} {d0['results'][0].get('split', 'test')} slices, "
          f"mask seeds {sorted({d['seed'] for ds in docs.values() for d in ds})}")
  abl = [m for m in ablation_methods() if m in docs]
  comp = [m for m in docs if m not in abl]
  for name, methods, others in (("comparison", comp, [m for m in comp if m != MAIN]),
                                ("ablations", ([MAIN] if main_docs else []) + abl, abl)):
    if not methods or (name == "ablations" and not abl):
      continue
    sub = {m: docs[m] for m in methods}
    rows = comparison.table_rows(sub, comparison.METRICS + comparison.EXTRA_METRICS[:1])
    main = MAIN if main_docs and len(methods) > 1 else None
    text = [f"# {name}: {head}", ""]
    if main:
      text += [comparison.wins_summary(
          [r for r in rows if r["key"] in ("mae", "rmse")], MAIN, others), ""]
    text += [comparison.markdown(rows, methods, main, others),
             "CRPS of a deterministic method is its MAE (docs/evaluation.md). Bold: best of the "
             "row; underlined: second."]
    named = [f"- {m}: {methods_lib.REGISTRY[m].label}" for m in methods
             if methods_lib.REGISTRY[m].label]
    if named:
      text += ["", "Columns:"] + named
    if budgets:
      text += ["", "Budgets (steps of Adam per training phase, maps per step; training time of "
               "the diffusion methods from their metrics.jsonl; wall time of this run from "
               "timing.json: training and evaluation, or evaluation alone when the training "
               "was done before):", "",
               budget_table({m: budgets[m] for m in methods if m in budgets})]
    (workdir / f"{name}.md").write_text("\n".join(text) + "\n")
    (workdir / f"{name}.csv").write_text(comparison.csv_text(rows, methods, main, others))
    written[name] = str(workdir / f"{name}.md")
    plot_rows = [r for r in rows if r["key"] in ("mae", "rmse")]
    if name == "comparison":
      p = figures.write_safely(figures.error_vs_ratio, plot_rows, methods,
                               path=fig_dir / "error_vs_ratio.png",
                               title=f"{d0['dataset']}: error against the missing ratio",
                               units=units)
    else:
      p = figures.write_safely(figures.ablation_bars, plot_rows, methods,
                               path=fig_dir / "ablations_mae.png",
                               title=f"{d0['dataset']}: DiffRecon and its ablations (MAE)",
                               units=units)
    if p is not None:
      written[f"{name}_figure"] = str(p)
  return written


def _check_mode(workdir: pathlib.Path, on_layout: bool) -> None:
  """One workdir holds one training mode: results of the two are not comparable."""
  path = workdir / "mode.json"
  if path.exists():
    saved = json.loads(path.read_text()).get("train_on_eval_layout", False)
    if saved != on_layout:
      raise ValueError(f"{workdir} holds results trained {'on' if saved else 'without'} the "
                       f"evaluation's own layout; use another --workdir for the other mode")
  path.write_text(json.dumps({"train_on_eval_layout": on_layout}))


def run_experiments(config, workdir, methods: Sequence[str], seeds: Sequence[int] = (0,),
                    smoke: bool = False, train_on_eval_layout: bool = False) -> dict:
  """Runs `methods` on `config`'s dataset with every mask seed and writes the tables; returns
  {"docs": {method: [docs]}, "written": {...}, "timing": {method: seconds}}.

  train_on_eval_layout: every method that learns trains once per evaluation pattern, on that
  pattern's own layout (`run_method_on_layouts`), instead of once on the mix of
  `config.patterns.train`."""
  workdir = pathlib.Path(run_lib.resolve_workdir(workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  if smoke:
    config = smoke_config(config)
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("no mask seeds given")
  _check_mode(workdir, bool(train_on_eval_layout))
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  run_lib.setup_compilation_cache(config)
  timing_path = workdir / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
  task = None
  docs = {}
  start = time.time()
  for k, m in enumerate(methods):
    done = all(_done(workdir, m, s) for s in seeds)
    logging.info("[%d/%d] %s: %s (%.0f s elapsed)", k + 1, len(methods), m,
                 "results found, not run again" if done else f"running, mask seeds {seeds}",
                 time.time() - start)
    t0 = time.time()
    needs_task = train_on_eval_layout or not methods_lib.trains_diffrecon(m)
    if not done and task is None and needs_task:
      task = pipeline.prepare_task(config)
    runner = run_method_on_layouts if train_on_eval_layout else run_method
    docs[m] = runner(config, workdir, m, seeds, task)
    if not done:
      timing[m] = round(time.time() - t0, 1)
      timing_path.write_text(json.dumps(timing, indent=1))
    mae = sum(r["mae"] for r in docs[m][0]["results"]) / len(docs[m][0]["results"])
    logging.info("[%d/%d] %s: mean MAE %.4f over %d patterns (seed %d)%s", k + 1, len(methods),
                 m, mae, len(docs[m][0]["results"]), seeds[0],
                 f", {timing.get(m, 0):.0f} s" if m in timing else "")
  units = ""
  # Training time: the diffusion methods' from their metrics.jsonl (also when this run only
  # evaluated them); the other learners train inside their evaluation (wall time).
  budgets = {m: dict(training_budget(config, m), wall_s=timing.get(m),
                     train_s=training_seconds(training_dir(workdir, m))
                     if methods_lib.trains_diffrecon(m) else None) for m in methods}
  (workdir / "budgets.json").write_text(json.dumps(budgets, indent=1))
  written = write_tables(workdir, docs, units, budgets)
  for name, path in written.items():
    logging.info("wrote %s", path)
  return {"docs": docs, "written": written, "timing": timing}


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file "
                                          "(optionally with ':variant').", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of every method's runs and the tables.")
_METHODS = flags.DEFINE_string("methods", "all", "Comma-separated methods or groups: all, "
                               "references, baselines, diffrecon, ablations, or names.")
_SEEDS = flags.DEFINE_string("mask_seeds", "", "Comma-separated mask seeds (default: the "
                             "config's patterns.eval_mask_seed).")
_ON_LAYOUT = flags.DEFINE_bool(
    "train_on_eval_layout", False, "Train every learning method once per evaluation pattern on "
    "that pattern's own layout (the fixed mask's exact cells), as UrbanSTA trains per sensor "
    "layout, instead of once on the mix of config.patterns.train.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Every method a few steps on a few slices: checks "
                           "the whole pipeline in minutes; the numbers mean nothing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    workdir = run_lib.resolve_workdir(_WORKDIR.value)
    methods = parse_methods(_METHODS.value)
    seeds = ([int(s) for s in _SEEDS.value.split(",") if s.strip()] if _SEEDS.value
             else [int(_CONFIG.value.patterns.eval_mask_seed)])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  log_path = console.setup(workdir, parallel.process_index_for_logs())
  logging.info("experiments on %s: %s; mask seeds %s; workdir %s", _CONFIG.value.data.name,
               ", ".join(methods), seeds, workdir)
  with console.errors_end_the_program("diffrecon_jax.experiments", log_path):
    run_experiments(_CONFIG.value, workdir, methods, seeds, smoke=_SMOKE.value,
                    train_on_eval_layout=_ON_LAYOUT.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
