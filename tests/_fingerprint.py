"""What a trained tiny DiffRecon produces, reduced to a comparable record: the logged losses of
every phase, the evaluated metrics and checksums of the reconstructions.

A refactor that must not change behaviour (moving the model, typed settings, one registry) is
checked against tests/golden/tiny_e2e.json, recorded from the code before the change. On the
machine type it was recorded on (same CPU model and core count: XLA's CPU code and its thread
split then match) the numbers must be bit-identical; elsewhere, equal to float tolerance.

Regenerate only when a change is meant to change the numbers:
  DIFFRECON_UPDATE_GOLDEN=1 python -m pytest tests/test_diffrecon_e2e.py
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "tiny_e2e.json"
_LOSS_KEYS = ("loss", "loss_c", "loss_f", "grad_norm")
_METRIC_KEYS = ("mae", "rmse", "crps", "completion_mae", "coverage_90", "spread_skill")


def machine() -> str:
  """The CPU model and core count: where bit-identical numbers can be expected."""
  model = ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{model} x{os.cpu_count()}"


def _digest(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def fingerprint(workdir: pathlib.Path) -> dict:
  """{"losses": [[phase, step, key, value]...], "metrics": {pattern: {key: value}},
  "reconstructions": {file: {array: sha256 prefix}}, "values": {file: {array: mean}}}."""
  losses = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    losses += [[rec["phase"], rec["step"], k, rec[k]] for k in _LOSS_KEYS if k in rec]
  doc = json.loads((workdir / "results.json").read_text())
  metrics = {f"{r['pattern']}:{r['missing_ratio']}": {k: r[k] for k in _METRIC_KEYS}
             for r in doc["results"]}
  digests, values = {}, {}
  for path in sorted(workdir.glob("reconstruction_*.npz")):
    with np.load(path) as rec:
      keys = [k for k in ("fine", "fine_q05", "fine_q95", "coarse") if k in rec]
      digests[path.name] = {k: _digest(rec[k]) for k in keys}
      values[path.name] = {k: float(np.mean(rec[k], dtype=np.float64)) for k in keys}
  return {"losses": losses, "metrics": metrics, "reconstructions": digests, "values": values}


def check(workdir: pathlib.Path) -> None:
  """Asserts the workdir's fingerprint equals the golden one (bit-identical on the recording
  machine type, to 1e-4 relative elsewhere); DIFFRECON_UPDATE_GOLDEN=1 records it instead."""
  got = fingerprint(workdir)
  if os.environ.get("DIFFRECON_UPDATE_GOLDEN"):
    GOLDEN.write_text(json.dumps({"machine": machine(), **got}, indent=1) + "\n")
    return
  want = json.loads(GOLDEN.read_text())
  assert [row[:3] for row in got["losses"]] == [row[:3] for row in want["losses"]]
  assert got["metrics"].keys() == want["metrics"].keys()
  if want["machine"] == machine():
    assert got["losses"] == want["losses"]
    assert got["metrics"] == want["metrics"]
    assert got["reconstructions"] == want["reconstructions"]
    return
  np.testing.assert_allclose([r[3] for r in got["losses"]], [r[3] for r in want["losses"]],
                             rtol=1e-4, atol=1e-6)
  for pattern, values in want["metrics"].items():
    for key, value in values.items():
      np.testing.assert_allclose(got["metrics"][pattern][key], value, rtol=1e-3, atol=1e-6)
  for name, values in want["values"].items():
    for key, value in values.items():
      np.testing.assert_allclose(got["values"][name][key], value, rtol=1e-3, atol=1e-4)
