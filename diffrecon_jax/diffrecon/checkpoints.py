"""DiffRecon's Orbax checkpoints: one manager per training phase, reads that survive damage.

Every phase (stage_c, stage_f, joint) keeps its steps under workdir/<phase>/<step> with two items,
the train state and a JSON `meta` (the config, normalisation stats, shapes, whether the phase
finished). A read that fails (a truncated metadata file, a missing array file) makes the step
"damaged": resuming moves it aside to workdir/damaged_checkpoints/ and takes the previous step;
loading for sampling skips it; `CheckpointError` says what to do when nothing readable is left.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from diffrecon_jax.diffrecon import settings

ITEMS = ("state", "meta")


class Manager(ocp.CheckpointManager):
  """Orbax's manager, preemption left to `preemption.Watcher`: Orbax would report each phase's
  own steps to JAX's preemption service, whose counter must increase over the whole run."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def manager(workdir: epath.Path, phase: str, keep: int, read_only: bool = False):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None,
                                         create=not read_only, read_only=read_only)
  return Manager(workdir / phase, options=options, item_names=ITEMS)


def with_sharding(abstract: Any, sharding) -> Any:
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)


def restore(mngr, step: int, abstract_state: Any) -> tuple:
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def read_meta(mngr, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


class CheckpointError(RuntimeError):
  """A damaged checkpoint with no readable one to fall back on; the message names the step
  directory and what to do."""


DAMAGED_DIR = "damaged_checkpoints"


def step_dir(mngr, step: int) -> epath.Path:
  return epath.Path(mngr.directory) / str(step)


def one_line_reason(error: BaseException) -> str:
  """One short line from a read error (TensorStore's messages run to a page of JSON)."""
  lines = str(error).strip().splitlines()
  line = (lines[0] if lines else "").split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {line[:160]}{'...' if len(line) > 160 else ''}"


class Unreadable(Exception):
  """A checkpoint read failed (raised by `read`, caught by `newest_readable`)."""


def read(fn: Callable, *args) -> Any:
  """fn(*args), a checkpoint read; any failure becomes Unreadable(one-line reason): Orbax and
  TensorStore raise plain Exception (missing array file), JSONDecodeError (truncated metadata),
  FileNotFoundError, ... Only reads are wrapped, so other errors (a bad config) propagate."""
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    raise Unreadable(one_line_reason(e)) from e


def newest_readable(mngr, read: Callable[[int], Any], label: str) -> tuple:
  """((step, value) | None, damaged) for the newest step of `mngr` that `read(step)` reads and
  returns something other than None for (None: a readable step the caller does not want, e.g.
  an unfinished phase). A step whose reads (`read`) fail (a truncated metadata file, a missing
  or corrupt array file) is skipped with a warning naming its directory; `damaged` lists those
  steps as (step, reason), newest first."""
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      value = read(step)
    except Unreadable as e:
      damaged.append((step, str(e)))
      logging.warning("[%s] checkpoint %s cannot be read (%s); trying the previous one", label,
                      step_dir(mngr, step), damaged[-1][1])
      continue
    if value is not None:
      return (step, value), damaged
  return None, damaged


def damaged_message(mngr, damaged: list, what: str) -> str:
  step, reason = damaged[0]
  return (f"checkpoint {step_dir(mngr, step)} is damaged ({reason}) and {what}")


def restore_for_resume(mngr, phase: str, abstract: Any, workdir: epath.Path) -> tuple:
  """(step, state, meta) of the newest readable checkpoint of a phase, or (None, None, None)
  when the phase has none yet.

  Damaged newer steps are moved to workdir/damaged_checkpoints/<phase>/<step> (Orbax would
  refuse to save those steps again) with a warning; if every step is damaged, CheckpointError
  says which directory to delete.
  """
  found, damaged = newest_readable(mngr, lambda s: read(restore, mngr, s, abstract), phase)
  if damaged and found is None:
    raise CheckpointError(damaged_message(
        mngr, damaged, f"{phase} has no older readable checkpoint: delete "
        f"{mngr.directory} to train {phase} again from its start (earlier phases are kept), "
        "or retrain in a new workdir"))
  if damaged:
    if jax.process_index() == 0:
      for step, _ in damaged:
        dest = workdir / DAMAGED_DIR / phase / str(step)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
          dest.rmtree()
        step_dir(mngr, step).rename(dest)
        logging.warning("[%s] moved the damaged checkpoint to %s (delete it when done with it)",
                        phase, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"damaged checkpoints of {phase} moved")
    mngr.reload()
  if found is None:
    return None, None, None
  step, (state, meta) = found
  return step, state, meta


def _tuplify(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  return x


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config (checkpoint metadata, config.json) read back: the inverse of
  `config.to_json()` (JSON lists become tuples, as in the config files), upgraded by
  `settings.migrate` to the current version (a config saved before a field existed gets the
  value that reproduces the behaviour it was saved with)."""
  return settings.migrate(ml_collections.ConfigDict(_tuplify(json.loads(text))))


def same_config(saved_json, config: ml_collections.ConfigDict) -> bool:
  """Whether a checkpoint's saved config (JSON text or None) is `config`, once migrated, apart
  from the fields chosen at evaluate time (`settings.EVALUATE_TIME_FIELDS`: sampling,
  calibration, ...), which change no trained parameter."""
  if saved_json is None:
    return False

  def trained(text: str) -> dict:
    fields = json.loads(text)
    return {k: v for k, v in fields.items() if k not in settings.EVALUATE_TIME_FIELDS}

  return trained(config_from_json(saved_json).to_json()) == trained(config.to_json())
