"""Training of DiffRecon (paper Sec. IV-E): stage pre-training, then joint training.

Three phases run in order, each with its own optimizer and Orbax checkpoint directory:

  stage_c  (config.train.steps_c)      only Diffusion-C learns: eps-MSE (eq. 4) on the
                                        pseudo-complete current coarse map, conditioned on the
                                        masked window (obs, mask) and external features.
  stage_f  (config.train.steps_f)      only Diffusion-F learns: eps-MSE on the current fine map,
                                        conditioned on the pseudo-complete coarse window.
  joint    (config.train.steps_joint)  both learn, end to end: w_c L_C + w_f L_F where L_F is
                                        conditioned on Diffusion-C's differentiable completion of
                                        the current coarse map (`model.joint_loss`).

The losses and the models are the DiffRecon model's (`model.py`); this module owns the state,
the optimizers, the compiled step, the loop, the EMA and the checkpoints.

One compiled step serves every phase and every device layout: `jax.jit` over a one-axis Mesh,
state replicated and donated, the batch drawn INSIDE the step from the state's PRNG key and split
over the 'data' axis, `steps_per_call` steps fused with `lax.scan` (tiny models are otherwise
launch-bound). Because the key lives in the state and the fused chunks end on every checkpoint
step, a run resumed from a checkpoint reaches the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from diffrecon_jax import console
from diffrecon_jax.diffrecon import checkpoints
from diffrecon_jax import curves
from diffrecon_jax.diffrecon import model
from diffrecon_jax import parallel
from diffrecon_jax import paths
from diffrecon_jax import preemption
from diffrecon_jax.diffrecon import prior as prior_lib
from diffrecon_jax.diffrecon import settings as settings_lib
from diffrecon_jax.diffrecon.settings import TrainSettings
from diffrecon_jax.data import patterns as patterns_lib
from diffrecon_jax.data import pipeline

Array = jax.Array
PHASES = model.PHASES
# Component losses first: a NaN is reported under the loss it starts in.
_METRIC_NAMES = {"stage_c": ("loss_c", "loss", "grad_norm"),
                 "stage_f": ("loss_f", "loss", "grad_norm"),
                 "joint": ("loss_c", "loss_f", "loss", "grad_norm")}


# --------------------------------------------------------------------------------------------
# State, models, optimizers
# --------------------------------------------------------------------------------------------
@struct.dataclass
class TrainState:
  """Everything a phase needs to continue exactly; what the checkpoints hold.

  Attributes:
    step: () int32, steps done in the current phase.
    params: {'c': Diffusion-C params, 'f': Diffusion-F params}.
    ema_params: same structure; exponential moving average used for sampling.
    opt_state: optax state of the phase's optimizer.
    rng: (2,) uint32 raw PRNG key; every batch, mask, tau and noise of the next step derive from
      it, so the state alone determines the rest of the run.
  """
  step: Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: Array


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static arguments of `pipeline.sample_train_batch` (hashable; closed over by the step)."""
  batch_size: int
  history: int
  index_range: tuple
  patterns: tuple  # (kind ids (P,) int32, ratios (P,) float32[, layouts (L, I, J)]) as tuples.

  @classmethod
  def from_task(cls, config: ml_collections.ConfigDict, task) -> "BatchSpec":
    """The spec of `task`'s train split under config.train.batch_size."""
    kinds, ratios, *layouts = patterns_lib.encode_train_patterns(task.patterns_train,
                                                                 task.coarse_shape)
    lo, hi = task.train_range
    # Tuples all the way down: the spec is a static (hashable) argument of the jitted step.
    layouts = (tuple(tuple(map(tuple, np.asarray(l).tolist())) for l in layouts[0])
               if layouts else None)
    return cls(int(settings_lib.read(config, "train.batch_size")), int(task.history),
               (int(lo), int(hi)),
               (tuple(int(k) for k in kinds), tuple(float(r) for r in ratios))
               + ((layouts,) if layouts else ()))


def _label_tree(params: dict) -> dict:
  return {name: jax.tree_util.tree_map(lambda _, n=name: n, sub) for name, sub in params.items()}


def make_optimizer(phase: str, train_cfg: TrainSettings) -> optax.GradientTransformation:
  """The phase's optimizer over {'c', 'f'} parameters.

  Global-norm clipping over both models, then AdamW per model (`optax.multi_transform`) with the
  phase's rate; the model that does not train in a pre-training phase gets `set_to_zero`, so
  neither its gradient nor weight decay moves it. `train_cfg.adam_eps` is Adam's denominator
  floor: it bounds the step lr * g / (rms(g) + eps) of a parameter whose
  gradient is rounding noise (the denoisers have a few the loss is invariant to).
  """
  eps = float(train_cfg.adam_eps)
  total = train_cfg.steps(phase) if phase in PHASES else 0

  def adamw(lr):
    return optax.adamw(learning_rate(float(lr), total, train_cfg.lr_schedule), eps=eps,
                       weight_decay=float(train_cfg.weight_decay))
  if phase == "stage_c":
    transforms = {"c": adamw(train_cfg.lr_c), "f": optax.set_to_zero()}
  elif phase == "stage_f":
    transforms = {"c": optax.set_to_zero(), "f": adamw(train_cfg.lr_f)}
  elif phase == "joint":
    transforms = {"c": adamw(train_cfg.lr_joint_c), "f": adamw(train_cfg.lr_joint_f)}
  else:
    raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
  chain = [optax.multi_transform(transforms, _label_tree)]
  if float(train_cfg.grad_clip) > 0:
    chain.insert(0, optax.clip_by_global_norm(float(train_cfg.grad_clip)))
  return optax.chain(*chain)


# Cosine schedules end at this fraction of the phase's rate rather than 0: the last steps still
# move the parameters the EMA averages (ours; vdm / improved-diffusion decay to 0 or not at all).
COSINE_FINAL_FRACTION = 0.1
LR_SCHEDULES = settings_lib.LR_SCHEDULES


def learning_rate(lr: float, total: int, schedule: str):
  """The phase's rate: `lr` throughout ("constant", the paper's and CSDI's Adam) or a cosine
  from `lr` down to COSINE_FINAL_FRACTION * lr over the phase's `total` steps ("cosine"). The
  schedule reads the optimizer's own update count, which the checkpoints hold, so a resumed
  phase continues on the same curve."""
  if schedule == "constant" or total <= 0:
    return lr
  if schedule == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=int(total), alpha=COSINE_FINAL_FRACTION)
  raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def ema_decay_at(step: Array, decay: float, warmup: bool) -> Array:
  """The EMA's decay for the update after `step` steps of the phase: `decay`, or with `warmup`
  min(decay, (1 + step) / (10 + step)) (TensorFlow's ExponentialMovingAverage with num_updates):
  a short phase's average then forgets the initial parameters instead of keeping
  decay ** steps of them (0.999 ** 2000 = 0.14 of a random initialisation)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  t = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def phase_start_state(optimizer: optax.GradientTransformation, params: dict, ema_params: dict,
                      rng: Array) -> TrainState:
  """A phase's first state: step 0, fresh optimizer moments, carried parameters and EMA."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                    opt_state=optimizer.init(params), rng=rng)


def abstract_phase_state(optimizer: optax.GradientTransformation, abstract_params, rng: Array,
                         sharding) -> TrainState:
  """The shapes, dtypes and `sharding` of a phase's state (what its checkpoints restore into
  and its compiled step takes), without computing it."""
  return checkpoints.with_sharding(jax.eval_shape(
      lambda p, e, k: phase_start_state(optimizer, p, e, k), abstract_params, abstract_params,
      rng), sharding)


# --------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------
def make_train_step(phase: str, models: model.Models, optimizer: optax.GradientTransformation,
                    train_cfg: TrainSettings, spec: BatchSpec, mesh,
                    steps_per_call: int,
                    joint: Optional[model.JointSettings] = None,
                    sample_batch: Callable[..., dict] = pipeline.sample_train_batch) -> Callable:
  """`steps_per_call` fused train steps as one jitted, sharded function.

  Returns step_fn(state, arrays) -> (state, metrics): arrays = `TaskData.device_arrays()` (placed
  replicated, see `parallel.put_replicated`); state is donated; metrics maps each name of the
  phase ('loss', 'loss_c' / 'loss_f', 'grad_norm') to a (steps_per_call,) float32 array, one
  value per fused step (so a non-finite value is located to its step; the host averages).
  `joint` (`joint_settings`) is needed by the joint phase only.
  """
  parallel.check_batch_size(spec.batch_size, mesh)
  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  decay = float(train_cfg.ema_decay)
  # (kinds, ratios[, layouts]): the layouts of `file:` training patterns must reach the sampler,
  # or those patterns train with nothing hidden.
  patterns = (np.asarray(spec.patterns[0], np.int32), np.asarray(spec.patterns[1], np.float32),
              *(np.asarray(layout, np.float32) for layout in spec.patterns[2:]))

  def one_step(state: TrainState, arrays: dict) -> tuple:
    rng, k_batch, k_loss = jax.random.split(state.rng, 3)
    batch = sample_batch(arrays, k_batch, batch_size=spec.batch_size, history=spec.history,
                         index_range=spec.index_range, patterns=patterns)
    # Split the batch over 'data': each device computes its share, XLA all-reduces the grads.
    batch = jax.lax.with_sharding_constraint(batch, data)
    grad_fn = jax.value_and_grad(
        lambda p: model.phase_loss(phase, models, p, batch, k_loss, joint), has_aux=True)
    (_, metrics), grads = grad_fn(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay_at(state.step, decay, train_cfg.ema_warmup)
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                     rng=rng)
    return new, {k: v.astype(jnp.float32) for k, v in metrics.items()}

  def multi_step(state: TrainState, arrays: dict) -> tuple:
    if steps_per_call == 1:
      # No scan for a single step: XLA:CPU runs a convolution-heavy step inside a while loop
      # several times slower than the same step unlooped (measured: 1.2 s vs 0.1-0.2 s for the
      # Diffusion-F step on 2 cores), so CPU configs use one step per call.
      state, metrics = one_step(state, arrays)
      return state, jax.tree_util.tree_map(lambda v: v[None], metrics)
    return jax.lax.scan(lambda s, _: one_step(s, arrays), state, None, length=steps_per_call)

  return jax.jit(multi_step, in_shardings=(repl, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def check_finite(phase: str, first_step: int, metrics: dict) -> None:
  """Raises FloatingPointError naming phase, step and metric at the first non-finite value.

  Args: metrics name -> (n,) host values of steps first_step + 1 .. first_step + n.
  """
  bad = None
  for name in _METRIC_NAMES.get(phase, tuple(metrics)):
    if name not in metrics:
      continue
    v = np.asarray(metrics[name])
    idx = np.nonzero(~np.isfinite(v))[0]
    if idx.size and (bad is None or idx[0] < bad[1]):
      bad = (name, int(idx[0]), float(v[idx[0]]))
  if bad is not None:
    name, i, val = bad
    raise FloatingPointError(
        f"non-finite {name} ({val}) in phase {phase} at step {first_step + i + 1}; stopping "
        f"without saving this state (the last checkpoint in <workdir>/{phase} is kept). "
        f"Lower the learning rate or set config.train.grad_clip.")


def chunk_size(step: int, total: int, steps_per_call: int, *everies: int) -> int:
  """Length of the next fused call: at most steps_per_call, never crossing a multiple of any
  `every` (checkpoint / log cadence) nor `total`. A function of `step` alone, so a resumed run
  makes the same calls as an uninterrupted one."""
  bound = total
  for every in everies:
    if every > 0:
      bound = min(bound, (step // every + 1) * every)
  return max(1, min(steps_per_call, bound - step))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
# Progress lines a phase shows on the console (every record still goes to metrics.jsonl and
# workdir/log.txt): a normal run prints tens of lines, not one per `log_every` steps.
_CONSOLE_LINES_PER_PHASE = 10


class _MetricsLog:
  """workdir/metrics.jsonl and log.txt: one record per log window; the console: about
  `_CONSOLE_LINES_PER_PHASE` of them per phase, and the last."""

  def __init__(self, workdir: epath.Path, phase: str, total: int, start_step: int,
               board: Optional[curves.TensorBoard] = None):
    self.path = workdir / curves.METRICS_FILE
    self.board = board  # TensorBoard events of the same records (`train.tensorboard`)
    self.phase, self.total = phase, total
    self.console_every = max(1, total // _CONSOLE_LINES_PER_PHASE)
    self.next_console = start_step + 1
    self.sums, self.n = {}, 0
    self.t0, self.step0 = time.time(), start_step
    self.phase_t0, self.phase_step0 = self.t0, start_step

  def add(self, metrics: dict) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(np.sum(v))
    self.n += len(next(iter(metrics.values())))

  def flush(self, step: int) -> Optional[dict]:
    if not self.n:
      return None
    now = time.time()
    rate = (step - self.step0) / max(now - self.t0, 1e-9)
    overall = (step - self.phase_step0) / max(now - self.phase_t0, 1e-9)
    eta = (self.total - step) / max(overall, 1e-9)
    record = {"phase": self.phase, "step": step, "total": self.total,
              **{k: v / self.n for k, v in self.sums.items()},
              "steps_per_sec": rate, "eta_sec": eta, "time": now}
    losses = " ".join(f"{k}={record[k]:.4f}" for k in sorted(self.sums))
    shown = step >= self.next_console or step >= self.total
    if shown:
      self.next_console = step + self.console_every
    logging.info("[%s] step %d/%d %s | %.2f steps/s | ETA %.0fs", self.phase, step, self.total,
                 losses, rate, eta, extra=None if shown else console.FILE_ONLY)
    if jax.process_index() == 0:
      paths.append_text(self.path, json.dumps(record) + "\n")  # a bucket has no append
      if self.board is not None:
        self.board.add(record)
    self.sums, self.n, self.t0, self.step0 = {}, 0, now, step
    return record


def joint_settings(train_cfg: TrainSettings, task) -> model.JointSettings:
  """The joint objective's weights and x0 clip (the one rule of `model.x0_clip_bound`, on the
  normalised coarse train split of `task`)."""
  lo, hi = task.split.range("train")
  return model.JointSettings(
      weight_c=train_cfg.joint_weight_c, weight_f=train_cfg.joint_weight_f,
      x0_clip=model.x0_clip_bound(train_cfg.joint_x0_clip_factor, task.coarse[lo:hi]))


def training_arrays(task, models: model.Models) -> dict:
  """What the train step draws its batches from: `task.device_arrays()`, plus "slot" (T,) int32,
  each slice's climatology slot (a training slice's row of the table fitted without its day
  when the prior is cross-fitted: `prior.Prior.training_slots`), when the models use the prior."""
  arrays = task.device_arrays()
  if models.needs_slots:
    arrays["slot"] = jnp.asarray(models.prior.training_slots(task.series.timestamps,
                                                             int(task.split.val_start)))
  return arrays


@dataclasses.dataclass(frozen=True)
class _Phase:
  """What one phase's loop needs besides its state (built once per phase by `train`)."""
  name: str
  total: int
  models: model.Models
  optimizer: optax.GradientTransformation
  train_cfg: TrainSettings
  spec: BatchSpec
  joint: model.JointSettings
  mesh: Any
  manager: Any
  base_meta: dict
  workdir: epath.Path
  copy_state: Callable
  watcher: preemption.Watcher
  board: Optional[curves.TensorBoard] = None
  compiled: Optional[dict] = None  # {steps per call: compiled step} made ahead (`_CompileAhead`)
  on_first_step: Optional[Callable[[], None]] = None  # called once the phase's first call ran


class _CompileAhead:
  """Compiles the first train step of the later phases on one background thread while the
  earlier ones train (`train.compile_ahead`).

  On a cold start the three phases' steps compile for about a minute on 2 CPU cores, each at its
  phase's start, while one train step keeps about one core busy: compiled beside stage_c's
  training, stage_f and joint start at once (measured; WORKSPACE.md). Compiling does not change
  what a step computes, so a run with it equals one without.
  """

  def __init__(self, jobs: dict):
    """jobs: {phase: (steps per call, function returning the compiled step)}, in phase order;
    nothing compiles before `start`."""
    self._jobs = jobs
    self._pool = None
    self._futures = {}

  def start(self) -> None:
    """Starts compiling (once). Called after the first phase's first step has run: its own
    compilation (and the parameters' initialisation) then had every core, and the background
    compile uses what one train step leaves idle."""
    if self._pool is not None or not self._jobs:
      return
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
    self._futures = {phase: (n, self._pool.submit(job)) for phase, (n, job) in self._jobs.items()}

  def take(self, phase: str) -> dict:
    """{steps per call: compiled step} for `phase`, waiting for it if it is being compiled;
    {} when it was not compiled ahead or failed (the phase then compiles its step itself)."""
    self.start()
    if phase not in self._futures:
      return {}
    n, future = self._futures.pop(phase)
    try:
      return {n: future.result()}
    except Exception as err:  # pylint: disable=broad-except  (an optimisation only)
      logging.warning("[%s] compiling the train step ahead failed (%s: %s); it compiles now",
                      phase, type(err).__name__, err)
      return {}

  def close(self) -> None:
    for _, future in self._futures.values():
      future.cancel()
    if self._pool is not None:
      self._pool.shutdown(wait=True)


def _compile_ahead(phases: tuple, models: model.Models, tc: TrainSettings, spec: BatchSpec,
                   mesh, joint: model.JointSettings, arrays: dict, abstract_params,
                   base_key) -> _CompileAhead:
  """A `_CompileAhead` of the train steps of `phases`, each lowered for its phase's abstract
  state (the sharded shapes `phase_start_state` and the checkpoints give) and the first call's
  steps per call."""
  repl = parallel.replicated(mesh)

  def job(phase: str, n: int) -> Callable:
    def compile_step():
      optimizer = make_optimizer(phase, tc)
      abstract = abstract_phase_state(optimizer, abstract_params, base_key, repl)
      step_fn = make_train_step(phase, models, optimizer, tc, spec, mesh, n, joint)
      return step_fn.lower(abstract, arrays).compile()
    return compile_step

  jobs = {}
  for phase in phases:
    n = chunk_size(0, tc.steps(phase), max(1, tc.steps_per_call), tc.checkpoint_every,
                   tc.log_every)
    jobs[phase] = (n, job(phase, n))
  return _CompileAhead(jobs)


def train(config: ml_collections.ConfigDict, workdir: str, task=None, mesh=None,
          models: Optional[model.Models] = None) -> dict:
  """Runs stage_c, stage_f and joint in order, resuming from `workdir` when it has checkpoints.

  Args:
    config: full config (configs/*.py).
    workdir: output folder: stage_c/, stage_f/, joint/ (Orbax), metrics.jsonl.
    task: optional prepared `pipeline.TaskData` (default: `pipeline.prepare_task(config)`).
    mesh: optional mesh (default: every device on the 'data' axis).
    models: the denoisers to train (default: `model.build_models` of the config; tests pass
      small stand-ins).
  Returns:
    {'state': final TrainState, 'phases': {phase: {'start_step', 'end_step', 'total',
     'skipped', 'last': last logged record or None}}, 'workdir': str}.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  task = pipeline.prepare_task(config) if task is None else task
  mesh = parallel.make_mesh() if mesh is None else mesh
  tc = TrainSettings.from_config(config)
  spec = BatchSpec.from_task(config, task)
  parallel.check_batch_size(spec.batch_size, mesh)
  repl = parallel.replicated(mesh)
  if models is None:
    models = model.build_models_for_task(config, task)
  joint = joint_settings(tc, task)
  if models.prior is not None and jax.process_index() == 0:
    # The climatology the model corrects travels with its checkpoints (evaluation reads it).
    models.prior.save(prior_lib.prior_path(workdir))
  arrays = parallel.put_replicated(training_arrays(task, models), mesh)
  base_meta = {"config": config.to_json(), "stats": task.stats, "shapes": task.shapes,
               "aggregation": task.series.aggregation,
               "history": int(task.history), "scale": int(task.scale)}
  base_key = jax.random.PRNGKey(int(config.seed))
  copy_state = jax.jit(lambda s: jax.tree_util.tree_map(jnp.copy, s), out_shardings=repl)
  abstract_params = jax.eval_shape(lambda k: model.init_params(models, task.shapes, k),
                                   base_key)

  state: Optional[TrainState] = None
  summary = {}
  # Later phases' steps compile while the first one trains (`train.compile_ahead`).
  ahead = _compile_ahead(PHASES[1:] if tc.compile_ahead else (), models, tc, spec, mesh, joint,
                         arrays, abstract_params, base_key)
  board = (curves.TensorBoard(workdir) if tc.tensorboard and jax.process_index() == 0
           else None)
  # SIGTERM (spot VMs, Colab) saves at the step reached and stops (preemption.py).
  with preemption.Watcher() as watcher, _finally(board, workdir, ahead):
    for p_idx, phase in enumerate(PHASES):
      total = tc.steps(phase)
      optimizer = make_optimizer(phase, tc)
      start_fn = lambda p, e, k, opt=optimizer: phase_start_state(opt, p, e, k)
      abstract = abstract_phase_state(optimizer, abstract_params, base_key, repl)
      mngr = checkpoints.manager(workdir, phase, tc.keep_checkpoints)
      try:
        latest, restored, meta = checkpoints.restore_for_resume(mngr, phase, abstract, workdir)
        if latest is not None:
          if not checkpoints.same_config(meta.get("config"), config):
            logging.warning("[%s] the checkpoint's config differs from the current one; "
                            "resuming anyway", phase)
          state = copy_state(restored)  # jit outputs: reliably donatable.
          if meta.get("finished"):
            logging.info("[%s] finished earlier (step %d); skipped", phase, latest)
            summary[phase] = {"start_step": latest, "end_step": latest, "total": total,
                              "skipped": True, "last": None}
            continue
          logging.info("[%s] resuming from step %d/%d", phase, latest, total)
        else:
          if state is None:
            # EMA starts at the initial parameters; a separate buffer since the state is donated.
            params, ema = jax.jit(
                lambda k: (lambda p: (p, jax.tree_util.tree_map(jnp.copy, p)))(
                    model.init_params(models, task.shapes, k, tc.init_prng_impl)),
                out_shardings=repl)(jax.random.fold_in(base_key, 0))
          else:
            params, ema = state.params, state.ema_params
          state = jax.jit(start_fn, out_shardings=repl)(
              params, ema, jax.random.fold_in(base_key, p_idx + 1))
        ctx = _Phase(name=phase, total=total, models=models, optimizer=optimizer, train_cfg=tc,
                     spec=spec, joint=joint, mesh=mesh, manager=mngr, base_meta=base_meta,
                     workdir=workdir, copy_state=copy_state, watcher=watcher, board=board,
                     compiled=ahead.take(phase) if p_idx else {},
                     on_first_step=ahead.start)
        state, last = _run_phase(ctx, state, arrays)
        summary[phase] = {"start_step": int(latest or 0), "end_step": total, "total": total,
                          "skipped": False, "last": last}
      finally:
        mngr.wait_until_finished()
        mngr.close()
  return {"state": state, "phases": summary, "workdir": str(workdir)}


@contextlib.contextmanager
def _finally(board: Optional[curves.TensorBoard], workdir, ahead: _CompileAhead):
  """After training (finished, preempted or failed): compiling ahead stopped, the TensorBoard
  events closed and, on process 0, the loss figure drawn from metrics.jsonl."""
  try:
    yield
  finally:
    ahead.close()
    if board is not None:
      board.close()
    if jax.process_index() == 0:
      curves.write_figure(workdir)


def _run_phase(ctx: _Phase, state: TrainState, arrays: dict) -> tuple:
  """Trains phase `ctx.name` from state.step to `ctx.total`, saving every
  `train.checkpoint_every` steps and at the end; returns (state, last logged record)."""
  phase, total, tc, spec, mesh = ctx.name, ctx.total, ctx.train_cfg, ctx.spec, ctx.mesh
  k_every, log_every = tc.checkpoint_every, tc.log_every
  steps_per_call = max(1, tc.steps_per_call)
  step = int(parallel.to_host(state.step))
  fns: dict = dict(ctx.compiled or {})
  on_first_step = ctx.on_first_step
  log = _MetricsLog(ctx.workdir, phase, total, step, ctx.board)
  last = None

  def save(step_now: int, finished: bool):
    meta = dict(ctx.base_meta, phase=phase, step=step_now, total=total, finished=finished)
    # A copy: the async writer must not read buffers the next (donating) call reuses.
    ctx.manager.save(step_now, args=ocp.args.Composite(
        state=ocp.args.StandardSave(ctx.copy_state(state)), meta=ocp.args.JsonSave(meta)))

  logging.info("[%s] %d steps (from %d), global batch %d on %d device(s)", phase, total, step,
               spec.batch_size, mesh.devices.size)
  while step < total:
    n = chunk_size(step, total, steps_per_call, k_every, log_every)
    if n not in fns:
      fns[n] = make_train_step(phase, ctx.models, ctx.optimizer, tc, spec, mesh, n, ctx.joint)
    state, metrics = fns[n](state, arrays)
    metrics = parallel.to_host(metrics)
    if on_first_step is not None:
      on_first_step()
      on_first_step = None
    check_finite(phase, step, metrics)
    step += n
    log.add(metrics)
    if log_every > 0 and (step % log_every == 0 or step == total):
      last = log.flush(step) or last
    if step < total and k_every > 0 and step % k_every == 0:
      save(step, finished=False)
    if step < total and ctx.watcher.stop_now():
      # Preempted (spot VM, Colab): keep every step done so far, then stop cleanly.
      if log.n:
        log.flush(step)
      if k_every <= 0 or step % k_every:
        save(step, finished=False)
      ctx.manager.wait_until_finished()
      logging.info("[%s] preempted at step %d/%d: checkpoint saved", phase, step, total)
      raise preemption.Preempted(phase, step, total)
  if log.n:
    last = log.flush(step) or last
  save(total, finished=True)
  return state, last
