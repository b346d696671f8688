"""The one dispatcher: what `main` does, importable from a notebook.

`run(config, workdir, mode)` runs a mode for `config.method`, a name of `methods.REGISTRY`:
  - "diffrecon" (the two-stage diffusion model): train (`train.train`), evaluate from the workdir's
    checkpoints alone, train_and_evaluate, or reconstruct (writes the reconstructed maps);
  - a method built from the config (`methods.buildable()`: the references climatology and interp,
    the supervised networks, urbansta, diffuflow): evaluate only; a baseline that learns is
    trained on the train split when it is evaluated.
Every evaluation writes results.json / results.md into the workdir by docs/evaluation.md;
DiffRecon's results carry its prior and the references (`methods.names("references")`) beside
them, on the same masks.

Several processes (`parallel.maybe_initialize_distributed`): all of them train, and all of them
evaluate and reconstruct with a trained DiffRecon in lockstep, its sampler batches spread over
every process's devices (`DiffReconMethod`, `batching.run_batched`; the calibration fit too);
the references and the methods built from the config are scored by process 0 alone, which
alone writes the files.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from diffrecon_jax.diffrecon import ablations
from diffrecon_jax.diffrecon import loading
from diffrecon_jax.diffrecon import model
from diffrecon_jax import evaluate as evaluate_lib
from diffrecon_jax import methods as methods_lib
from diffrecon_jax import parallel
from diffrecon_jax import nofg
from diffrecon_jax import paths
from diffrecon_jax import provenance
from diffrecon_jax.diffrecon import train as train_lib
from diffrecon_jax import user_reconstruct
from diffrecon_jax.baselines import climatology
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.data import pipeline
from diffrecon_jax.data import registry
from diffrecon_jax.diffrecon.prior_method import PriorMethod

MODES = ("train", "evaluate", "train_and_evaluate", "reconstruct")


def resolve_workdir(workdir) -> str:
  """`workdir` as an absolute path ("~" expanded; a relative path is taken from the current
  directory) or a URI as given (`gs://BUCKET/...`: every file goes through `paths`). Raises
  ValueError for an empty path or one that exists as a file."""
  if workdir is None or str(workdir).strip() == "":
    raise ValueError("workdir is empty: pass --workdir=DIR (created if missing)")
  path = paths.resolve(str(workdir))
  if path.exists() and not path.is_dir():
    raise ValueError(f"workdir {path} exists and is not a directory")
  return str(path)


def resolve_data_paths(config) -> None:
  """Makes `config.data.path` and `config.data.tfds_dir` absolute (against the current
  directory), in place: the config is saved with the checkpoints, and a later evaluate or
  reconstruct started elsewhere (which may refit the calibration on the training data) must
  find the same files."""
  for key in ("path", "tfds_dir"):
    value = config.data[key]
    if value:
      config.data[key] = registry.absolute_path(value)


def setup_compilation_cache(config) -> None:
  """Persistent compilation cache from config.train.compilation_cache_dir (JAX itself also
  honours the JAX_COMPILATION_CACHE_DIR environment variable)."""
  path = config.train.compilation_cache_dir
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(str(path)))


def evaluate_methods(config, workdir, task, methods: list, extra: dict = None,
                     figures: bool = True, origin: dict = None) -> list:
  """Scores `methods` (the first is the main one) and writes the results files; with
  `figures`, the main method's figures go to workdir/figures; `origin` (`provenance.collect`)
  goes into every document as `provenance`.

  In a multi-process run every process calls it: a method that samples across processes
  (`samples_across_processes`) is scored by all of them in lockstep, any other only by process
  0 (it enters no collective, so the order of the list is free). Process 0 alone writes files
  (masks, figures, predictions, results) and returns the documents; the others return []."""
  main = parallel.is_main_process()
  docs = []
  predictions = evaluate_lib.PredictionsSpec.from_config(config, workdir, origin) if main else None
  for m in methods:
    if not main and not samples_across_processes(m):
      continue
    climatology.prepare_reference(m, config, task)  # its calendar table, chosen on val
    res = evaluate_lib.evaluate_method(
        task, m, tuple(config.patterns.eval), seed=int(config.patterns.eval_mask_seed),
        split=config.eval.split, max_slices=int(config.eval.max_slices),
        chunk=int(config.eval.chunk_slices), workdir=workdir if main else None,
        figures_dir=(paths.as_path(workdir) / "figures" if main and figures and m is methods[0]
                     else None),
        predictions=predictions)
    doc = evaluate_lib.results_document(task, m, res, int(config.patterns.eval_mask_seed),
                                        extra if m is methods[0] else None)
    if origin:
      doc["provenance"] = origin
    docs.append(doc)
  if not main:
    return _evaluated_elsewhere(sampled=True)
  evaluate_lib.write_results(workdir, docs)
  logging.info("wrote %s", paths.as_path(workdir) / "results.md")
  return docs


def run(config, workdir: str, mode: str = "train_and_evaluate") -> list:
  """Runs `mode` for `config` in `workdir`; returns the results documents (if any)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  # Orbax needs absolute paths, and a notebook may change its directory between calls: resolve
  # once, against the directory the run was started from.
  workdir = resolve_workdir(workdir)
  resolve_data_paths(config)
  wd = paths.as_path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  # What produced this run (versions, devices, commit, command), kept with its results.
  origin = provenance.collect(mode=mode)
  if parallel.is_main_process():  # several processes: one writes the shared files.
    (wd / "config.json").write_text(config.to_json_best_effort(indent=1))
    provenance.record(wd, origin)
  if config.method != methods_lib.MAIN:
    method = methods_lib.build(config.method, config)  # a ValueError names an unknown one
    if mode in ("train", "reconstruct"):
      raise ValueError(f"method {config.method!r} has nothing to train or trains when it is "
                       f"evaluated; use --mode=evaluate")
    if not parallel.is_main_process():
      return _evaluated_elsewhere()
    task = pipeline.prepare_task(config)
    return evaluate_methods(config, workdir, task, [method], origin=origin)
  setup_compilation_cache(config)
  nofg.check_ablation(config)
  if mode in ("train", "train_and_evaluate"):
    trained = ablations.apply(config)  # the ablation's fields (Sec. V-C); the config otherwise
    task = pipeline.prepare_task(trained)
    models = model.build_models_for_task(trained, task)
    train_lib.train(trained, workdir, task=task, models=models)
    if mode == "train":
      return []
  if mode == "reconstruct" and config.reconstruct.input:
    # The user's own observations: a one-process job (a few maps need no second host).
    return [user_reconstruct.reconstruct_file(config, workdir)]
  # Every process restores (Orbax reads a checkpoint collectively) and, for a DiffRecon that
  # samples across processes, evaluates in lockstep (process 0 writes the files); noFG, whose
  # fine network trains when it is evaluated, runs on process 0 alone.
  saved_config, task, method = load_method(config, workdir, across_processes=True)
  if not parallel.is_main_process() and not samples_across_processes(method):
    return _evaluated_elsewhere()
  if mode == "reconstruct":
    written = reconstruct_to_files(saved_config, workdir, task, method)
    _log_batches(method)
    return [written] if parallel.is_main_process() else _evaluated_elsewhere(sampled=True)
  extra = {"trained_on": list(saved_config.patterns.train)}
  docs = evaluate_methods(saved_config, workdir, task, [method] + references_for(method, task),
                          extra, origin=origin)
  _log_batches(method)
  return docs


def samples_across_processes(method) -> bool:
  """Whether `method` spreads its sampling over every process of a multi-process run (a
  `DiffReconMethod` built with `across_processes`): then every process must call it alike."""
  return bool(getattr(method, "across_processes", False))


def _log_batches(method) -> None:
  """How many of a method's sampler batches (calibration fit included) this process ran."""
  if samples_across_processes(method):
    logging.info("process %d of %d ran %d of the %d sampler batches of %s",
                 jax.process_index(), jax.process_count(), method.batches_run["here"],
                 method.batches_run["total"], method.name)


def references_for(method, task) -> list:
  """The deterministic references scored beside a trained DiffRecon `method`: its own prior
  without the networks (`prior`, when the model has one: the networks' contribution is the
  column difference), then the registry's references."""
  prior = getattr(getattr(method, "models", None), "prior", None)
  own = [PriorMethod(prior, task.history)] if prior is not None else []
  return own + [methods_lib.build(name) for name in reference_names()]


def reference_names() -> tuple:
  """The registry's references in the order results.md lists them beside a trained model: the
  floor (climatology), then the bar (interp); the comparison's column order reversed."""
  return tuple(reversed(methods_lib.names("references")))


def _evaluated_elsewhere(sampled: bool = False) -> list:
  """[] on a process > 0, logged: it `sampled` with the others, or left all to process 0."""
  logging.info("process %d of %d: %s", jax.process_index(), jax.process_count(),
               "sampled with the others; the other methods and the results files are process "
               "0's" if sampled else "evaluation and results files are process 0's")
  return []


def load_method(config, workdir: str, across_processes: bool = False) -> tuple:
  """(config, task, method) from a workdir's newest finished checkpoint (`loading.from_workdir`):
  a DiffReconMethod named after its ablation, if any, or for the noFG ablation Diffusion-C
  followed by its fine network. Model, data and training settings come from the checkpoint;
  what is chosen at evaluate time comes from `config` (`settings.EVALUATE_TIME_FIELDS`).
  across_processes: in a multi-process run, every process calls this and the DiffReconMethod
  samples across all of them (`loading.from_workdir`; not the noFG ablation's)."""
  def checked_task(saved_config, meta):  # the saved config's data, checked against the checkpoint
    task = pipeline.prepare_task(saved_config)
    check_task_matches(task, meta)
    return task

  method, saved_config, _, task_of = loading.from_workdir(workdir, config, checked_task,
                                                          across_processes=across_processes)
  task = task_of()
  if ablations.check(saved_config) == "noFG":
    method = nofg.DiffCThenFine(method, nofg.fine_network(saved_config), method.name,
                                on_base=bool(saved_config.get("ablation_fine_on_base", False)))
  return saved_config, task, method


def check_task_matches(task, meta: dict) -> None:
  """The data at evaluate time must be the data the checkpoint was trained on."""
  if meta.get("shapes") and dict(task.shapes) != dict(meta["shapes"]):
    raise ValueError(f"data shapes {task.shapes} differ from the checkpoint's {meta['shapes']}")
  if meta.get("stats"):
    saved = np.asarray(meta["stats"]["fine"]["mean"], np.float32)
    if not np.allclose(saved, task.fine_norm.mean, rtol=1e-5):
      raise ValueError("normalisation statistics differ from the checkpoint's: different data?")


def reconstruct_to_files(config, workdir, task, method) -> dict:
  """Writes reconstruction_<pattern>.npz (fine point, the 90% interval fine_q05 / fine_q95,
  completed coarse and its interval, mask, slices, timestamps) for every evaluation pattern;
  returns {pattern label: path}.

  The method sees what an evaluation shows it (`evaluate.observe`), on a val or test split.
  A method that samples across processes is called by every process in lockstep; process 0
  alone writes the files.
  """
  slices, _ = evaluate_lib.evaluation_slices(task, config.eval.split,
                                             int(config.eval.max_slices))
  written = {}
  for spec in config.patterns.eval:
    p = patterns_lib.parse_pattern(spec)
    mask, seed = evaluate_lib.eval_mask(task, p, int(config.patterns.eval_mask_seed))
    t0 = time.perf_counter()
    view = evaluate_lib.observe(task, mask)
    parts = [method.reconstruct(view, piece) for piece in evaluate_lib.contiguous_pieces(slices)]
    # Calibrated 90% intervals when the method has a calibration; a deterministic fine stage
    # (the noFG ablation) has no spread: its interval is the map itself.
    rec = user_reconstruct.interval_outputs(parts)
    path = paths.as_path(workdir) / f"reconstruction_{evaluate_lib.file_label(p.label)}.npz"
    if parallel.is_main_process():
      paths.save_npz(path, **rec, mask=mask[slices], slices=slices,
                     timestamps=task.series.timestamps[slices], mask_seed=seed)
      logging.info("wrote %s (%.1f s)", path, time.perf_counter() - t0)
    written[p.label] = str(path)
  return written
