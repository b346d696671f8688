"""A trained DiffRecon from its workdir alone: the one loader evaluation and reconstruction use.

`load_for_sampling` restores the EMA parameters of the newest finished phase (joint, else
stage_f, else stage_c) with the config, statistics and shapes saved beside them, and the prior
the training saved (`prior.prior_path`). `from_workdir` turns that into a `DiffReconMethod`:
the settings chosen at evaluate time replace the saved ones (`settings.EVALUATE_TIME_FIELDS`),
the samplers' clip bounds are computed, and the calibration fitted on the validation split is
attached (fitted and saved first when the workdir has none for this sampler).
"""
from __future__ import annotations

from typing import Callable, Optional

from absl import logging
from etils import epath
import jax

from diffrecon_jax import parallel
from diffrecon_jax.data import pipeline
from diffrecon_jax.diffrecon import ablations
from diffrecon_jax.diffrecon import calibration
from diffrecon_jax.diffrecon import checkpoints
from diffrecon_jax.diffrecon import model
from diffrecon_jax.diffrecon import prior as prior_lib
from diffrecon_jax.diffrecon import settings
from diffrecon_jax.diffrecon import train as train_lib
from diffrecon_jax.diffrecon.method import DiffReconMethod


def from_workdir(workdir: str, config=None, task=None,
                 check: Optional[Callable[..., None]] = None,
                 across_processes: bool = False) -> tuple:
  """(method, saved_config, meta, task_of) of the trained DiffRecon in `workdir`.

  Args:
    workdir: a training run's folder (its checkpoints, prior.npz, calibration.json).
    config: the config of this command, or None: its `settings.EVALUATE_TIME_FIELDS` replace
      the saved ones; model, data and training settings always come from the checkpoint.
    task: the saved config's `pipeline.TaskData`, a function (saved_config, meta) -> TaskData,
      or None (`pipeline.prepare_task`); read only when needed (the clip bounds of a stage that
      does not diffuse a residual over the prior, fitting a missing calibration).
    check: called as check(saved_config, models, meta) before anything is computed (a
      reconstruct input checked against the model, before any calibration is fitted).
    across_processes: in a multi-process run, every process calls this (and then samples in
      lockstep): the method spreads its sampler batches over every process's devices
      (`DiffReconMethod`), and every process takes process 0's calibration or fits it with
      the others; process 0 alone writes calibration.json. Otherwise (and always for noFG,
      whose fine network trains on one process) only process 0 gets the calibration and the
      method samples on this process's devices alone.
  Returns:
    a `DiffReconMethod` named after its ablation (`ablations.method_name`), with its calibration
    (on process 0, or on every process when it samples across them; none for noFG, whose fine
    stage is not this model's), the saved config with this command's evaluate-time fields, the
    checkpoint's metadata, and `task_of()`: the task, prepared at most once (here, or on the
    caller's first call).
  """
  saved, params, models, meta = load_for_sampling(workdir)
  params = parallel.local_copy(params)  # each process samples on its own devices.
  for key in settings.EVALUATE_TIME_FIELDS:
    if config is not None and key in config:
      saved[key] = config[key]
  if check is not None:
    check(saved, models, meta)
  prepared = []

  def task_of() -> object:
    if not prepared:
      prepared.append(task(saved, meta) if callable(task) else
                      task if task is not None else pipeline.prepare_task(saved))
    return prepared[0]

  sampling = settings.SamplingSettings.from_config(saved)
  needs_task = model.clip_bounds_need_train_split(models)
  clip = model.x0_clip_bounds(sampling.x0_clip_factor, models,
                              task_of() if needs_task else None)
  nofg = ablations.check(saved) == "noFG"
  method = DiffReconMethod(saved, params, models, clip, sampling,
                           across_processes=across_processes and not nofg)
  method.name = ablations.method_name(saved)
  if not nofg and (method.across_processes or parallel.is_main_process()):
    # Every process that samples fits (or reads) it; process 0 alone writes the file.
    calibration.attach(method, saved, workdir, task_of)
  return method, saved, meta, task_of


def load_for_sampling(workdir: str, mesh=None,
                      build_models: Callable[..., model.Models] = model.build_models
                      ) -> tuple:
  """(config, ema_params {'c', 'f'}, models, metadata) of the newest finished phase in `workdir`.

  Looks at joint/, then stage_f/, then stage_c/; needs nothing but the workdir (the config,
  normalisation stats and shapes are in the checkpoint's metadata). `build_models(config, scale,
  stats, aggregation)` makes the denoisers the parameters belong to. A finished checkpoint that
  cannot be read is skipped with a warning naming it, and the next newest finished one is used;
  when none is readable, CheckpointError names the damaged step directory and what to do.
  """
  workdir = epath.Path(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  damaged_seen = []
  for phase in reversed(model.PHASES):
    if not (workdir / phase).exists():
      continue
    mngr = checkpoints.manager(workdir, phase, 0, read_only=True)
    try:
      found, damaged = checkpoints.newest_readable(
          mngr, lambda step, m=mngr, p=phase: _load_finished(m, p, step, workdir, mesh,
                                                             build_models), phase)
      damaged_seen += [(mngr, d) for d in damaged]
      if found is None:
        continue
      step, (config, models, state, meta) = found
      logging.info("loaded %s step %d from %s", phase, step, workdir)
      if damaged_seen:
        logging.warning("using %s step %d instead of the damaged %s", phase, step,
                        ", ".join(str(checkpoints.step_dir(m, d[0])) for m, d in damaged_seen))
      return config, state.ema_params, models, meta
    finally:
      mngr.close()
  if damaged_seen:
    mngr, damaged = damaged_seen[0]
    raise checkpoints.CheckpointError(checkpoints.damaged_message(
        mngr, [damaged], "no other finished checkpoint is readable: delete that step directory "
        "and rerun training (--mode=train resumes from the previous checkpoint), or retrain in a "
        "new workdir"))
  raise FileNotFoundError(
      f"no finished training phase under {workdir} (looked for joint/, stage_f/, stage_c/ "
      f"checkpoints with finished=True); run training first")


def _load_finished(mngr, phase: str, step: int, workdir: epath.Path, mesh,
                   build_models: Callable[..., model.Models]) -> Optional[tuple]:
  """(config, models, state, meta) restored from `step` if it ends its phase, else None."""
  meta = checkpoints.read(checkpoints.read_meta, mngr, step)
  if not meta.get("finished"):
    return None
  config = checkpoints.config_from_json(meta["config"])  # migrated to the current version
  kwargs = {}
  path = prior_lib.prior_path(workdir)
  if model.uses_prior(config) and path.exists():
    # Written by `train`; without it `build_models` says the prior is missing.
    kwargs["prior"] = prior_lib.Prior.load(path, meta["stats"])
  models = build_models(config, int(meta["scale"]), meta.get("stats"),
                        meta.get("aggregation", "sum"), **kwargs)
  key = jax.random.PRNGKey(0)
  abstract_params = jax.eval_shape(
      lambda k: model.init_params(models, meta["shapes"], k), key)
  opt = train_lib.make_optimizer(phase, settings.TrainSettings.from_config(config))
  abstract = checkpoints.with_sharding(jax.eval_shape(
      lambda p, e, k: train_lib.phase_start_state(opt, p, e, k), abstract_params,
      abstract_params, key), parallel.replicated(mesh))
  state, meta = checkpoints.read(checkpoints.restore, mngr, step, abstract)
  return config, models, state, meta
