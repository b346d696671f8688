"""Stopping training cleanly when the machine is taken back (spot / preemptible VMs, Colab).

Spot and preemptible TPU / GPU VMs and recycled Colab runtimes get SIGTERM some seconds before
they stop. Saving only every `train.checkpoint_every` steps would lose up to that many steps,
so training watches for the signal (`Watcher`): the handler only sets a flag, the loop checks it
between compiled calls (never inside one), saves a checkpoint at the step it has reached, waits
for it to be written and raises `Preempted`. The command line turns that into exit code
`EXIT_CODE` with a one-line message; the same command resumes from that checkpoint exactly (the
compiled calls are a function of the step alone: `train.chunk_size`).

Several processes: they must stop at one step (the save is collective), and a per-process flag
would stop some and not others. There JAX's preemption service does it: `jax.distributed`
catches SIGTERM on the process that gets it and tells every process, and
`multihost_utils.reached_preemption_sync_point` becomes True on all of them at the same call
(the first call after every process has heard of it), so the processes save one step together.
Its counter is the Watcher's own, one per check of the training loop (the same sequence on every
process, increasing across the three phases); Orbax's checkpoint managers report their
phase-local steps to the same service, so train.py's managers leave preemption to the Watcher
(`checkpoints.Manager`).
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import jax

# EX_TEMPFAIL (sysexits.h): a temporary failure, the user is invited to retry.
EXIT_CODE = 75


class Preempted(Exception):
  """Training stopped on a preemption signal after saving a checkpoint at `step` of `phase`."""

  def __init__(self, phase: str, step: int, total: int):
    super().__init__(f"preempted at step {step}/{total} of phase {phase}: checkpoint saved; "
                     f"run the same command again to resume from it")
    self.phase, self.step, self.total = phase, step, total


class Watcher:
  """Context manager: while open, SIGTERM asks training to stop at the next step boundary.

  Single process: installs a SIGTERM handler (main thread only: elsewhere Python refuses to set
  one, and nothing is installed) and restores the previous handler on exit. Several processes:
  installs nothing (JAX's preemption service holds SIGTERM) and asks the service at every check
  (module docstring).
  """

  def __init__(self, signals: tuple = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict = {}
    self.requested: Optional[int] = None  # the signal received, if any
    self._several = False
    self._checks = 0  # the sync counter of JAX's preemption service (several processes)

  def _handle(self, signum, frame) -> None:
    del frame
    self.requested = signum

  def __enter__(self) -> "Watcher":
    self._several = jax.process_count() > 1
    if not self._several and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def stop_now(self) -> bool:
    """True when training should save at the step it has reached and stop. Several processes:
    call it once per loop iteration on every process (it is a sync point of JAX's service)."""
    if not self._several:
      return self.requested is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    self._checks += 1
    try:
      return bool(multihost_utils.reached_preemption_sync_point(self._checks))
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return False
