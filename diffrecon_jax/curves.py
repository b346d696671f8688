"""Training curves beside metrics.jsonl: a figure of the losses (workdir/figures/
training_curves.png, after training) and, with `train.tensorboard`, TensorBoard event files in
workdir/tensorboard (tensorboardX: no TensorFlow; `tensorboard --logdir WORKDIR/tensorboard`).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Optional

from absl import logging

from diffrecon_jax import figures
from diffrecon_jax import paths

METRICS_FILE = "metrics.jsonl"
FIGURE = "training_curves.png"
EVENTS_DIR = "tensorboard"
# Record keys that are not scalars to plot.
_NOT_SCALARS = ("phase", "step", "total", "time")


def read_metrics(workdir) -> list:
  """The records of workdir/metrics.jsonl ([] when there is none); a line cut short by a crash
  is skipped."""
  path = paths.as_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


def write_figure(workdir) -> Optional[object]:
  """workdir/figures/training_curves.png from metrics.jsonl; None (and nothing written) when
  there are no records or drawing fails (a warning)."""
  records = read_metrics(workdir)
  if not records:
    return None
  return figures.write_safely(figures.training_curves, records,
                              path=paths.as_path(workdir) / "figures" / FIGURE,
                              title=f"training curves ({METRICS_FILE})")


class TensorBoard:
  """Scalars of each logged record as TensorBoard events, tag "<phase>/<key>" at the phase's
  step. A bucket workdir's events are written to a local folder and copied there by `close`."""

  def __init__(self, workdir):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError as err:
      raise ImportError("train.tensorboard=True needs tensorboardX: pip install tensorboardX"
                        ) from err
    self.target = paths.as_path(workdir) / EVENTS_DIR
    self.local = (os.fspath(self.target) if paths.is_local(self.target)
                  else tempfile.mkdtemp(prefix="diffrecon_jax_tb_"))
    self.writer = SummaryWriter(logdir=self.local)

  def add(self, record: dict) -> None:
    for key, value in record.items():
      if key not in _NOT_SCALARS and isinstance(value, (int, float)):
        self.writer.add_scalar(f"{record['phase']}/{key}", value, int(record["step"]),
                               walltime=record.get("time"))

  def close(self) -> None:
    self.writer.close()
    if not paths.is_local(self.target):
      self.target.mkdir(parents=True, exist_ok=True)
      for name in os.listdir(self.local):
        (self.target / name).write_bytes(pathlib.Path(self.local, name).read_bytes())
      shutil.rmtree(self.local, ignore_errors=True)
    logging.info("TensorBoard events in %s", self.target)
