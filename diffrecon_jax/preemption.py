"""Stopping training cleanly when the machine is taken back (spot / preemptible VMs, Colab).

Spot and preemptible TPU / GPU VMs and recycled Colab runtimes get SIGTERM some seconds before
they stop. Saving only every `train.checkpoint_every` steps would lose up to that many steps,
so training watches for the signal (`Watcher`): the handler only sets a flag, the loop checks it
between compiled calls (never inside one), saves a checkpoint at the step it has reached, waits
for it to be written and raises `Preempted`. The command line turns that into exit code
`EXIT_CODE` with a one-line message; the same command resumes from that checkpoint exactly (the
compiled calls are a function of the step alone: `train._chunk`).

Several processes: they must stop at one step (the save is collective), and a per-process flag
would stop some and not others, so SIGTERM is not watched there and keeps its default action
(the periodic checkpoints remain). JAX's preemption service and Orbax's
`CheckpointManager.reached_preemption` could make every process agree on a step, but JAX's
protocol needs one increasing counter across the three phases (each restarts at step 0) and
Orbax's own saves report phase-local steps to it: not done yet.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from absl import logging
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
  installs nothing (module docstring).
  """

  def __init__(self, signals: tuple = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict = {}
    self.requested: Optional[int] = None  # the signal received, if any

  def _handle(self, signum, frame) -> None:
    del frame
    self.requested = signum

  def __enter__(self) -> "Watcher":
    if jax.process_count() > 1:
      logging.warning("several processes: SIGTERM is not watched (periodic checkpoints only)")
    elif threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def stop_now(self) -> bool:
    """True when training should save at the step it has reached and stop."""
    return self.requested is not None
