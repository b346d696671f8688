"""What a user sees: the console of the entry point, the log file, and one-line errors.

One smoke-size training run through `python -m diffrecon_jax.main` (the README's smoke
overrides, about 35 s on 2 cores) is checked for its console (progress and evaluation lines, no
Orbax chatter, a line budget) and its workdir/log.txt (the chatter). The same workdir then has its
checkpoints damaged for the entry point's one-line error. Bad inputs stop the entry point with
one line naming the file or value, no traceback.
"""
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from diffrecon_jax import console
from tests import _train_helpers as helpers
from tests.conftest import REPO_ROOT
from tests.test_readme import SMOKE_OVERRIDES

# A smoke run prints about 15 lines; the full nytaxi run adds one line per 100 steps of
# 17,000 and 3 per pattern (~200 lines at most). Hundreds of lines per smoke run is the chatter.
SMOKE_LINE_BUDGET = 40
ORBAX_CHATTER = re.compile(r"orbax|checkpoint_manager|Save Finalize|atomicity|tensorstore|ocdbt",
                           re.I)


def _main(cwd, *args, cache=None, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS,
             PYTHONPATH=str(REPO_ROOT))
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  return subprocess.run([sys.executable, "-m", "diffrecon_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("console")
  proc = _main(REPO_ROOT, "--config=configs/nytaxi.py", f"--workdir={root / 'wd'}",
               *SMOKE_OVERRIDES, f"--config.train.compilation_cache_dir={root / 'xla'}",
               cache=root / "xla")
  assert proc.returncode == 0, proc.stderr[-4000:]
  return root, proc


def test_console_shows_progress_and_results_not_library_chatter(smoke_run):
  root, proc = smoke_run
  lines = (proc.stdout + proc.stderr).splitlines()
  assert len(lines) <= SMOKE_LINE_BUDGET, "\n".join(lines)
  chatter = [l for l in lines if ORBAX_CHATTER.search(l)]
  assert not chatter, "\n".join(chatter)
  text = "\n".join(lines)
  for phase in ("stage_c", "stage_f", "joint"):  # phase, step, losses, steps/s, ETA
    assert re.search(rf"\[{phase}\] step 2/2 .*loss=\d.* \| [\d.]+ steps/s \| ETA \d+s", text), text
  assert re.search(r"diffrecon random:0\.4: MAE [\d.]+ RMSE", text), text
  assert f"wrote {root / 'wd' / 'results.md'}" in text, text
  assert all(re.match(r"\d\d:\d\d:\d\d ", l) for l in lines), text  # our format, not absl's


def test_log_file_has_everything(smoke_run):
  root, _ = smoke_run
  log = (root / "wd" / "log.txt").read_text()
  assert "Save Finalize" in log and "checkpoint_manager.py" in log  # the chatter, at INFO
  assert "[joint] step 2/2" in log and "diffrecon random:0.4: MAE" in log  # and our lines
  assert len(log.splitlines()) > 100


def test_a_damaged_checkpoint_is_skipped_with_one_warning(smoke_run, tmp_path):
  """joint's only checkpoint loses an array file: evaluation uses stage_f's, says so in one
  warning, and the abandoned reads (hundreds of TensorStore errors) stay in the log file."""
  root, _ = smoke_run
  wd = tmp_path / "wd"
  shutil.copytree(root / "wd", wd)
  next((wd / "joint" / "2" / "state" / "d").iterdir()).unlink()
  proc = _main(REPO_ROOT, "--config=configs/nytaxi.py", f"--workdir={wd}", "--mode=evaluate",
               *SMOKE_OVERRIDES, cache=root / "xla")
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stderr.splitlines()
  assert len(lines) <= SMOKE_LINE_BUDGET and "Traceback" not in proc.stderr, proc.stderr[-4000:]
  warnings = [l for l in lines if "WARNING" in l]
  assert len(warnings) == 2, warnings
  assert f"[joint] checkpoint {wd / 'joint' / '2'} cannot be read" in warnings[0]
  assert f"using stage_f step 2 instead of the damaged {wd / 'joint' / '2'}" in warnings[1]
  assert "loaded stage_f step 2" in proc.stderr and "diffrecon random:0.4: MAE" in proc.stderr


def test_damaged_checkpoints_stop_evaluation_with_one_line(smoke_run, tmp_path):
  root, _ = smoke_run
  wd = tmp_path / "wd"
  shutil.copytree(root / "wd", wd)
  for phase in ("stage_c", "stage_f", "joint"):  # every finished checkpoint: metadata truncated
    for meta in (wd / phase).glob("*/meta/metadata"):
      meta.write_text(meta.read_text()[:40])
  proc = _main(REPO_ROOT, "--config=configs/nytaxi.py", f"--workdir={wd}", "--mode=evaluate",
               timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("diffrecon_jax: error: checkpoint ") and str(wd / "joint" / "2") in last
  assert "JSONDecodeError" in last and "delete that step directory" in last, last
  # each damaged checkpoint was reported as skipped on the console, with its path
  for phase in ("stage_c", "stage_f", "joint"):
    assert f"WARNING: [{phase}] checkpoint {wd / phase / '2'} cannot be read" in proc.stderr


def _bad_input_cases(tmp: pathlib.Path) -> list:
  """(flags, what the one-line error must contain) for bad inputs a user can give."""
  np.save(tmp / "mask_shape.npy", np.ones((6, 8)))
  values = np.ones((8, 6))
  values[1, 2] = 2.0
  np.save(tmp / "mask_values.npy", values)
  (tmp / "grid.nc").write_text("not a NetCDF file")
  evaluate = ["--config.method=interp", "--mode=evaluate", "--config.eval.max_slices=4"]
  return [
      (["--config.data.name=nyctaxi"] + evaluate, "unknown dataset 'nyctaxi'"),
      (["--config.patterns.eval=('random:1.5',)"] + evaluate,
       "'random:1.5': missing ratio must be in [0, 1), got 1.5"),
      (["--config.patterns.eval=('holes:0.2',)"] + evaluate, "unknown kind 'holes'"),
      ([f"--config.patterns.eval=('file:{tmp / 'mask_shape.npy'}',)"] + evaluate,
       f"mask file {tmp / 'mask_shape.npy'}: shape (6, 8) must be (8, 6)"),
      ([f"--config.patterns.eval=('file:{tmp / 'mask_values.npy'}',)"] + evaluate,
       f"mask file {tmp / 'mask_values.npy'}: values must be 1 (observed), 0 or NaN (missing); "
       "found 2.0 at index (1, 2)"),
      (["--config.method=kriging", "--mode=evaluate"], "unknown method 'kriging'"),
  ], [
      (["--config=configs/custom.py", f"--config.data.path={tmp / 'grid.nc'}", "--mode=train"],
       f"{tmp / 'grid.nc'}: not a readable 'custom' dataset file (OSError: "),
  ]


def test_bad_inputs_stop_the_entry_point_with_one_line(tmp_path):
  nytaxi, other = _bad_input_cases(tmp_path)
  cases = [(["--config=configs/nytaxi.py"] + f, want) for f, want in nytaxi] + other
  for i, (flags, want) in enumerate(cases):
    proc = _main(REPO_ROOT, *flags, f"--workdir={tmp_path / f'wd{i}'}", timeout=300)
    assert proc.returncode != 0, flags
    assert "Traceback" not in proc.stderr, (flags, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("diffrecon_jax: ") and want in last, (flags, last)
    assert f"traceback in {tmp_path / f'wd{i}' / 'log.txt'}" in last, last
    assert "Traceback" in (tmp_path / f"wd{i}" / "log.txt").read_text()  # for whoever debugs


def _record(name, level, pathname):
  return logging.LogRecord(name, level, pathname, 1, "msg", None, None)


def test_console_filter_keeps_project_lines_and_warnings():
  keep = console.ConsoleFilter().filter
  pkg = str(REPO_ROOT / "diffrecon_jax" / "train.py")
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  jax_file = "/site-packages/jax/_src/xla_bridge.py"
  assert keep(_record("absl", logging.INFO, pkg))            # our absl lines
  assert keep(_record("diffrecon_jax.x", logging.INFO, "x.py"))
  assert not keep(_record("absl", logging.INFO, orbax))       # library INFO: log file only
  assert not keep(_record("absl", logging.WARNING, orbax))    # Orbax restating our options
  assert keep(_record("absl", logging.ERROR, orbax))
  assert not keep(_record("jax._src.xla_bridge", logging.INFO, jax_file))
  assert keep(_record("jax._src.xla_bridge", logging.WARNING, jax_file))
  hidden = _record("absl", logging.INFO, pkg)
  hidden.diffrecon_file_only = True
  assert not keep(hidden)


def test_a_long_phase_shows_about_ten_progress_lines_and_records_every_window(tmp_path,
                                                                            monkeypatch):
  from etils import epath
  from diffrecon_jax.diffrecon import train
  calls = []
  monkeypatch.setattr(train.logging, "info",
                      lambda msg, *args, **kw: calls.append((args[1], kw.get("extra"))))
  log = train._MetricsLog(epath.Path(tmp_path), "stage_c", total=8000, start_step=0)
  for step in range(100, 8001, 100):
    log.add({"loss": np.ones(4)})
    log.flush(step)
  shown = [step for step, extra in calls if extra is None]
  assert len(calls) == 80 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 80
  assert 9 <= len(shown) <= 11 and shown[0] == 100 and shown[-1] == 8000
  assert all(extra == console.FILE_ONLY for step, extra in calls if step not in shown)


def test_jax_backend_probing_stays_off_the_console(tmp_path):
  # Without JAX_PLATFORMS, JAX probes every backend it knows and logs "Unable to initialize
  # backend 'tpu'" at INFO on a machine without one; the entry point must set the console filter
  # before anything starts a backend, so that line goes to log.txt only.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = str(REPO_ROOT)
  proc = subprocess.run([sys.executable, "-m", "diffrecon_jax.main", "--config=configs/nytaxi.py",
                         f"--workdir={tmp_path / 'wd'}", "--mode=evaluate"], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1  # nothing trained there: the one-line error
  lines = (proc.stdout + proc.stderr).splitlines()
  assert lines and all(l.startswith("diffrecon_jax: error:") for l in lines), proc.stderr
  assert "xla_bridge" not in proc.stderr


def test_a_command_modules_bad_input_ends_it_with_one_line_and_other_errors_pass():
  """`console.errors_end_the_program`: a ValueError / FileNotFoundError becomes SystemExit with
  the program, the message and the log path; any other exception is not swallowed."""
  for err in (ValueError("bad --train_seeds"), FileNotFoundError("grid.nc: file not found")):
    with pytest.raises(SystemExit) as stop:
      with console.errors_end_the_program("diffrecon_jax.train_seeds", "/w/log.txt"):
        raise err
    assert str(stop.value) == (f"diffrecon_jax.train_seeds: error: {err}  (traceback in "
                               f"/w/log.txt)")
    assert stop.value.__cause__ is None and stop.value.__suppress_context__
  with pytest.raises(KeyError):
    with console.errors_end_the_program("diffrecon_jax.train_seeds", "/w/log.txt"):
      raise KeyError("not a user error")
