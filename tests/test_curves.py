"""Training curves (curves.py): the loss figure from metrics.jsonl and TensorBoard events that
hold the same scalars (read back from the event file without TensorFlow)."""
import json
import struct

import numpy as np

from diffrecon_jax import curves


def _records():
  out = []
  for phase, steps in (("stage_c", 4), ("joint", 2)):
    for step in range(1, steps + 1):
      out.append({"phase": phase, "step": step, "total": steps, "loss": 1.0 / step,
                  "grad_norm": 0.5, "steps_per_sec": 3.0, "eta_sec": 1.0, "time": 100.0 + step})
  return out


def _events(path) -> list:
  """(tag, step, value) of every scalar in a TFRecord event file."""
  from tensorboardX.proto import event_pb2
  data, out, pos = path.read_bytes(), [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    for v in event.summary.value:
      out.append((v.tag, event.step, v.simple_value))
  return out


def test_figure_from_metrics_skips_a_cut_line(tmp_path):
  assert curves.write_figure(tmp_path) is None  # no metrics yet: nothing drawn
  lines = [json.dumps(r) for r in _records()] + ['{"phase": "joint", "st']  # a crash mid-line
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
  assert len(curves.read_metrics(tmp_path)) == 6
  path = curves.write_figure(tmp_path)
  assert path == tmp_path / "figures" / "training_curves.png" and path.stat().st_size > 10_000


def test_tensorboard_events_hold_the_records(tmp_path):
  board = curves.TensorBoard(tmp_path)
  for r in _records():
    board.add(r)
  board.close()
  (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  got = _events(events)
  assert ("stage_c/loss", 4, np.float32(0.25)) in got and ("joint/grad_norm", 2, 0.5) in got
  tags = {t for t, _, _ in got}
  assert tags == {f"{p}/{k}" for p in ("stage_c", "joint")
                  for k in ("loss", "grad_norm", "steps_per_sec", "eta_sec")}
