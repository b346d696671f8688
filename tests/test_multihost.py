"""Two JAX processes on one machine train, checkpoint, evaluate and resume like one process.

Each process runs the real entry point (`python -m diffrecon_jax.main`, through
_multihost_subprocess) with --coordinator_address / --num_processes / --process_id on localhost;
JAX joins them (`jax.distributed`, CPU collectives through gloo) into one mesh of two devices,
one per process, and the global batch of 8 is split 4 / 4. Compared with a one-process run of
the same config and seed: the batches, the logged losses, the final parameters (in both
processes), the jointly written checkpoints and the results files (written once, by process 0).
Then process 1 is SIGKILLed mid-joint, process 0 is killed too (it fails or waits at its next
exchange with the lost peer; a cluster manager would stop it), and both are restarted with the
same command: they resume from the last committed checkpoint and end with the uninterrupted
run's parameters.

Sampling spread over the processes: the one-process run's trained workdir is evaluated
(--mode=evaluate, the calibration fitted anew) and reconstructed (--mode=reconstruct) by two
processes, each sampling its share of the sampler batches (batch k on process k mod 2); the
results, the calibration and the reconstructions equal the one-process run's exactly.

By default the runs use the stand-in denoisers of _train_helpers (the multi-process logic is
model-agnostic; 75-95 s on 2 cores for the four training launches, seven processes, and about
30 s more for the three sampling launches); with DIFFRECON_SLOW_TESTS=1 the real ones, with
Adam's eps at 1e-3 (_parallel_subprocess says why; measured 4.5 min).
"""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest


from diffrecon_jax.diffrecon import loading
from tests import _train_helpers as helpers
from tests import test_readme

REPO = pathlib.Path(__file__).resolve().parents[1]
SLOW = os.environ.get("DIFFRECON_SLOW_TESTS", "") == "1"
PHASES = ("stage_c", "stage_f", "joint")
TMP = ".orbax-checkpoint-tmp"
TIMEOUT_S = 240  # per launch; a hung collective fails the test instead of stalling the suite
KILL = ("joint", 4, 1)  # (phase, step, process): process 1 dies just before joint saves step 4
TERM = ("stage_f", 2, 1)  # process 1 gets SIGTERM just after stage_f saved step 2
# The tiny models of the README test; stage_c 4, stage_f 4, joint 6 steps; checkpoints and logs
# every 2 steps, 2 kept; a global batch of 8 (4 per process); two evaluation patterns.
_OVERRIDES = dict(f.split("=", 1) for f in test_readme.SMOKE_OVERRIDES)
_OVERRIDES.update({
    "--config.train.steps_c": "4", "--config.train.steps_f": "4",
    "--config.train.steps_joint": "6", "--config.train.batch_size": "8",
    "--config.train.keep_checkpoints": "2",
    "--config.patterns.train": "('random:0.4','large_scale:0.25')",
})
if SLOW:
  _OVERRIDES["--config.train.adam_eps"] = "1e-3"


def _main_flags(workdir: pathlib.Path, mode: str = "") -> list:
  return (["--config=configs/nytaxi.py", f"--workdir={workdir}"]
          + [f"{k}={v}" for k, v in _OVERRIDES.items()] + ([f"--mode={mode}"] if mode else []))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(root: pathlib.Path, name: str, workdir: pathlib.Path, processes: int, port: int = 0,
            kill: tuple = (), term: tuple = (), mode: str = "") -> list:
  """Starts `processes` processes of the entry point on `workdir` (in `mode`, default
  train_and_evaluate), outputs under root/<name>; returns [(Popen, log path)]. With several
  processes they meet at 127.0.0.1:`port`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_XLA_FLAGS,
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  helper = [] if SLOW else ["--standins"]
  if kill:
    helper += ["--kill-phase", kill[0], "--kill-step", str(kill[1]), "--kill-process",
               str(kill[2])]
  if term:
    helper += ["--term-phase", term[0], "--term-step", str(term[1]), "--term-process",
               str(term[2])]
  procs = []
  for i in range(processes):
    dist = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
             f"--process_id={i}"] if processes > 1 else [])
    log = root / f"{name}.{i}.log"
    with log.open("w") as f:
      procs.append((subprocess.Popen(
          [sys.executable, "-m", "tests._multihost_subprocess", str(root / name), *helper, "--",
           *_main_flags(workdir, mode), *dist],
          cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT), log))
  return procs


def _kill_all(procs: list) -> None:
  for p, _ in procs:
    if p.poll() is None:
      p.kill()
  for p, _ in procs:
    p.wait()


def _wait(procs: list, rc: int = 0) -> list:
  """Waits for every process to exit with `rc`; on another exit or the deadline kills the rest
  and fails with the failed process's log. Returns the logs' texts."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p, _ in procs):
      bad = [(p, log) for p, log in procs if p.poll() not in (None, rc)]
      if bad or time.monotonic() > deadline:
        p, log = bad[0] if bad else procs[0]
        pytest.fail(f"{'rc ' + str(p.returncode) if bad else 'timed out'}: {log}\n"
                    f"{log.read_text()[-4000:]}")
      time.sleep(0.2)
    for p, log in procs:
      assert p.returncode == rc, f"rc {p.returncode}: {log}\n{log.read_text()[-4000:]}"
  finally:
    _kill_all(procs)
  return [log.read_text() for _, log in procs]


def _wait_for_the_kill(procs: list, victim: int) -> None:
  """Waits until process `victim` SIGKILLs itself, then kills the others (they fail or wait in
  the next collective with it; a cluster manager would stop them too)."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while True:
      # The others first: one that failed because the victim had just died is no failure.
      others = [p.poll() for i, (p, _) in enumerate(procs) if i != victim]
      if procs[victim][0].poll() is not None:
        break
      if time.monotonic() > deadline or any(rc is not None for rc in others):
        pytest.fail(f"process {victim} did not die as planned (others: {others}):\n"
                    f"{procs[victim][1].read_text()[-4000:]}")
      time.sleep(0.2)
    assert procs[victim][0].returncode == -signal.SIGKILL, procs[victim][1].read_text()[-4000:]
  finally:
    _kill_all(procs)


def _steps(phase_dir: pathlib.Path) -> list:
  """Committed checkpoint steps of a phase directory."""
  return sorted(int(p.name) for p in phase_dir.iterdir() if p.name.isdigit())


def _tmp_dirs(phase_dir: pathlib.Path) -> list:
  return sorted(p.name for p in phase_dir.iterdir() if TMP in p.name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  logs = {"one": _wait(_launch(root, "one", root / "wd_one", 1))}
  port = _free_port()
  logs["two"] = _wait(_launch(root, "two", root / "wd_two", 2, port))
  # A host lost mid-phase, then the same command again on both hosts.
  _wait_for_the_kill(_launch(root, "unused", root / "wd_crash", 2, port, kill=KILL), KILL[2])
  after_kill = {p: (_steps(root / "wd_crash" / p), _tmp_dirs(root / "wd_crash" / p))
                for p in PHASES}
  logs["resumed"] = _wait(_launch(root, "resumed", root / "wd_crash", 2, port))
  return root, logs, after_kill


def _out(root, name: str, process: int) -> tuple:
  d = root / name
  return np.load(d / f"process_{process}.npz"), json.loads(
      (d / f"process_{process}.json").read_text())


def _state_keys(npz) -> list:
  keys = [k for k in npz.files if k.startswith(("params", "ema"))]
  assert len(keys) > (100 if SLOW else 8), keys
  return keys


def test_two_processes_form_one_mesh(runs):
  root, _, _ = runs
  for i in (0, 1):
    _, info = _out(root, "two", i)
    assert (info["process_index"], info["process_count"]) == (i, 2), info
    assert (info["device_count"], info["local_device_count"]) == (2, 1), info
  # A reduction over a batch split across the processes sees both halves in each of them.
  _, one = _out(root, "one", 0)
  assert {_out(root, "two", i)[1]["global_mask_sum"] for i in (0, 1)} == {
      one["global_mask_sum"]}


def test_each_process_draws_its_half_of_the_one_process_batch(runs):
  root, _, _ = runs
  one = _out(root, "one", 0)[0]
  halves = [_out(root, "two", i)[0] for i in (0, 1)]
  keys = [k for k in one.files if k.startswith("batch/")]
  assert {"batch/mask", "batch/obs", "batch/fine", "batch/coarse"} <= set(keys), keys
  for k in keys:
    assert halves[0][k].shape[0] == halves[1][k].shape[0] == one[k].shape[0] // 2 == 4, k
    # Process 0 holds rows 0-3 of the one global draw, process 1 rows 4-7: no process repeats
    # another's windows or masks.
    np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), one[k],
                                  err_msg=k)
  for k in ("batch/mask", "batch/fine"):
    assert not np.array_equal(halves[0][k], halves[1][k]), k


def _metrics(workdir: pathlib.Path) -> list:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(runs):
  root, _, _ = runs
  one, two = _metrics(root / "wd_one"), _metrics(root / "wd_two")
  # One record per log step, written once (by process 0), with the one-process losses.
  assert [(r["phase"], r["step"]) for r in two] == [(r["phase"], r["step"]) for r in one] == [
      ("stage_c", 2), ("stage_c", 4), ("stage_f", 2), ("stage_f", 4), ("joint", 2),
      ("joint", 4), ("joint", 6)]
  for a, b in zip(one, two):
    for k in ("loss", "grad_norm", "loss_c", "loss_f"):
      if k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=f"{a['phase']} {k}")
  assert len({r["loss"] for r in one}) == len(one)  # the losses do move from step to step
  ref = _out(root, "one", 0)[0]
  p0, p1 = (_out(root, "two", i)[0] for i in (0, 1))
  for k in _state_keys(ref):
    np.testing.assert_array_equal(p1[k], p0[k], err_msg=k)  # both processes hold one state
    np.testing.assert_allclose(p0[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_checkpoints_are_written_jointly_and_read_by_one_process(runs):
  root, _, _ = runs
  wd = root / "wd_two"
  assert {p: _steps(wd / p) for p in PHASES} == {
      "stage_c": [2, 4], "stage_f": [2, 4], "joint": [4, 6]}
  assert all(_tmp_dirs(wd / p) == [] for p in PHASES)
  build = {} if SLOW else {"build_models": helpers.standin_models}
  _, ema, _, meta = loading.load_for_sampling(wd, **build)
  assert meta["phase"] == "joint" and meta["finished"] and meta["step"] == 6
  ref = _out(root, "one", 0)[0]
  for path, leaf in jax.tree_util.tree_leaves_with_path(ema):
    np.testing.assert_allclose(np.asarray(leaf), ref["ema" + jax.tree_util.keystr(path)],
                               rtol=1e-4, atol=1e-6)


def _batches_run(log: str) -> tuple:
  """(batches this process ran, batches in all) from its log line (`run._log_batches`)."""
  found = re.findall(r"process \d+ of \d+ ran (\d+) of the (\d+) sampler batches", log)
  assert len(found) == 1, log[-3000:]
  return tuple(int(v) for v in found[0])


def _both_sampled(logs: list) -> None:
  """Each of the two processes ran some of the sampler batches, together all of them."""
  (here_0, total), (here_1, total_1) = (_batches_run(log) for log in logs)
  assert total == total_1 and here_0 + here_1 == total and here_0 > 0 and here_1 > 0, (
      here_0, here_1, total)
  # Batch k on process k mod 2: process 0 runs the odd batch out of a stage, if any.
  assert here_0 >= here_1, (here_0, here_1, total)


def test_both_processes_sample_and_process_zero_writes_the_results(runs):
  root, logs, _ = runs
  assert _out(root, "one", 0)[1]["evaluated"] == 3  # DiffRecon and the two references
  # DiffRecon is sampled by both processes, the references are scored by process 0 alone.
  assert [_out(root, "two", i)[1]["evaluated"] for i in (0, 1)] == [3, 1]
  assert "sampled with the others; the other methods and the results files" in logs["two"][1]
  assert "wrote" in logs["two"][0] and "results.md" not in logs["two"][1]
  assert "calibration.json" in logs["two"][0] and "calibration.json" not in logs["two"][1]
  _both_sampled(logs["two"])
  for name in ("results.json", "results_climatology.json", "results_interp.json"):
    one = json.loads((root / "wd_one" / name).read_text())
    two = json.loads((root / "wd_two" / name).read_text())
    assert len(two["results"]) == len(one["results"]) == 2, name
    for a, b in zip(one["results"], two["results"]):
      assert (a["pattern"], a["missing_ratio"]) == (b["pattern"], b["missing_ratio"]), name
      for k in ("mae", "rmse", "crps", "completion_mae"):
        if a.get(k) is not None:
          # The point metrics agree to 1e-3. The ensemble's CRPS comes from short stochastic
          # chains of untrained tiny models (members of their own completions, clipped x0
          # estimates) that turn the two trainings' ~1e-4 parameter differences into a few
          # percent.
          rtol = 0.1 if k == "crps" and name == "results.json" else 1e-3
          np.testing.assert_allclose(b[k], a[k], rtol=rtol, err_msg=f"{name} {k}")
  masks = sorted(p.name for p in (root / "wd_two" / "masks").iterdir())
  assert masks == sorted(p.name for p in (root / "wd_one" / "masks").iterdir()) and masks


# What a run writes about itself rather than about its samples: timings and provenance.
_RUN_RECORDS = ("seconds", "maps_per_second", "provenance")


def _without_run_records(doc):
  if isinstance(doc, dict):
    return {k: _without_run_records(v) for k, v in doc.items() if k not in _RUN_RECORDS}
  if isinstance(doc, list):
    return [_without_run_records(v) for v in doc]
  return doc


@pytest.fixture(scope="module")
def sampled(runs):
  """The one-process run's trained workdir evaluated (calibration fitted anew) and then
  reconstructed by two processes, and reconstructed by one; returns (root, logs)."""
  root, _, _ = runs
  keep = shutil.ignore_patterns("results*", "calibration.json", "masks", "figures", "log*.txt",
                                "reconstruction*")
  for name in ("wd_sampled_two", "wd_sampled_one"):
    shutil.copytree(root / "wd_one", root / name, ignore=keep)
  # The one-process reconstruction uses the calibration the one-process evaluation fitted.
  shutil.copy2(root / "wd_one" / "calibration.json", root / "wd_sampled_one")
  port = _free_port()
  logs = {"evaluate": _wait(_launch(root, "eval_two", root / "wd_sampled_two", 2, port,
                                    mode="evaluate"))}
  logs["reconstruct"] = _wait(_launch(root, "rec_two", root / "wd_sampled_two", 2, port,
                                      mode="reconstruct"))
  _wait(_launch(root, "rec_one", root / "wd_sampled_one", 1, mode="reconstruct"))
  return root, logs


def test_two_processes_evaluate_a_workdir_exactly_like_one(sampled):
  root, logs = sampled
  assert [_out(root, "eval_two", i)[1]["evaluated"] for i in (0, 1)] == [3, 1]
  _both_sampled(logs["evaluate"])
  assert "results.md" not in logs["evaluate"][1]
  one, two = root / "wd_one", root / "wd_sampled_two"
  # The calibration (point weights, spread and interval scales) fitted on batches from both
  # processes, then every metric of DiffRecon and of the references: the one-process numbers.
  cal = [_without_run_records(json.loads((wd / "calibration.json").read_text()))
         for wd in (one, two)]
  assert cal[0] == cal[1] and cal[0]["spread_scale"], cal
  for name in ("results.json", "results_climatology.json", "results_interp.json"):
    docs = [_without_run_records(json.loads((wd / name).read_text())) for wd in (one, two)]
    assert docs[0] == docs[1], name
  assert json.loads((one / "results.json").read_text())["results"][0]["crps"] is not None
  assert sorted(p.name for p in (two / "masks").iterdir()) == sorted(
      p.name for p in (one / "masks").iterdir())


def test_two_processes_reconstruct_exactly_like_one(sampled):
  root, logs = sampled
  _both_sampled(logs["reconstruct"])
  # No calibration to fit: it was saved by the evaluation, and both processes read process 0's.
  assert all("fitting the calibration" not in log for log in logs["reconstruct"])
  files = sorted(p.name for p in (root / "wd_sampled_one").glob("reconstruction_*.npz"))
  assert len(files) == 2, files  # one per evaluation pattern
  assert files == sorted(p.name for p in (root / "wd_sampled_two").glob("reconstruction_*.npz"))
  for name in files:
    one, two = (np.load(root / wd / name) for wd in ("wd_sampled_one", "wd_sampled_two"))
    assert {"fine", "fine_q05", "fine_q95", "coarse"} <= set(one.files), one.files
    assert sorted(two.files) == sorted(one.files)
    for k in one.files:
      np.testing.assert_array_equal(two[k], one[k], err_msg=f"{name} {k}")


def test_a_killed_host_and_a_restart_resume_from_the_last_committed_checkpoint(runs):
  root, logs, after_kill = runs
  # Killed before joint's save of step 4: that step is no checkpoint (at most the survivor's
  # uncommitted part), every earlier one is.
  assert {p: s for p, (s, _) in after_kill.items()} == {
      "stage_c": [2, 4], "stage_f": [2, 4], "joint": [2]}, after_kill
  assert set(after_kill["joint"][1]) <= {f"4{TMP}"}, after_kill
  for log in logs["resumed"]:
    assert "[stage_c] finished earlier" in log and "[stage_f] finished earlier" in log
    assert re.findall(r"\[(\w+)\] resuming from step (\d+)/", log) == [("joint", "2")]
  resumed, uninterrupted = _out(root, "resumed", 0)[0], _out(root, "two", 0)[0]
  for k in _state_keys(uninterrupted):
    np.testing.assert_allclose(resumed[k], uninterrupted[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert _steps(root / "wd_crash" / "joint") == [4, 6]
  assert all(_tmp_dirs(root / "wd_crash" / p) == [] for p in PHASES)


def test_a_preempted_job_stops_at_one_step_on_every_host_and_resumes_exactly(runs):
  """SIGTERM on one host (a spot VM's notice): JAX's preemption service tells the other, both
  save the same step, exit with the preemption status, and the same command resumes there;
  the final state equals the uninterrupted run's."""
  from diffrecon_jax import preemption
  root, _, _ = runs
  port = _free_port()
  logs = _wait(_launch(root, "unused_term", root / "wd_term", 2, port, term=TERM),
               rc=preemption.EXIT_CODE)
  stops = [re.findall(r"preempted at step (\d+)/\d+ of phase (\w+)", log) for log in logs]
  assert stops[0] and stops[0] == stops[1], stops  # one step, on both hosts
  step, phase = int(stops[0][0][0]), stops[0][0][1]
  assert step in _steps(root / "wd_term" / phase)  # saved there, though no periodic save was due
  resumed = _wait(_launch(root, "term_resumed", root / "wd_term", 2, port))
  for log in resumed:
    assert f"[{phase}] resuming from step {step}/" in log, log[-3000:]
  again, uninterrupted = _out(root, "term_resumed", 0)[0], _out(root, "two", 0)[0]
  for k in _state_keys(uninterrupted):
    np.testing.assert_allclose(again[k], uninterrupted[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_entry_point_names_a_missing_multi_host_flag(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  proc = subprocess.run(
      [sys.executable, "-m", "diffrecon_jax.main", "--config=configs/nytaxi.py",
       f"--workdir={tmp_path}", "--num_processes=2", "--process_id=1"],
      cwd=REPO, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "missing: --coordinator_address (JAX_COORDINATOR_ADDRESS)" in proc.stderr, proc.stderr
  assert not any(tmp_path.iterdir())  # stopped before any work
