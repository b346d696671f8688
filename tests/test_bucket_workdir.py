"""A workdir in a bucket: train, evaluate and reconstruct with `gs://bucket/...` as the workdir,
the bucket mocked by `etils.epath.testing.mock_epath` onto a local folder (no network).

Every file the package writes goes through `diffrecon_jax.paths` (etils.epath); Orbax's array
writes go through tensorstore, whose gs:// driver this test cannot reach, so its checkpoint
manager alone is pointed at the mocked bucket's local folder (`checkpoints.manager`). The test then
checks that every file of the run is in the bucket and nothing was written under the current
directory (a `gs:` folder there is what pathlib / open make of a bucket URI), and a static check
that the run's modules write files only through the path layer.
"""
import ast
import os
import pathlib
import re

import netCDF4
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from diffrecon_jax import console, paths, run

from diffrecon_jax.diffrecon import checkpoints
from diffrecon_jax.configs import custom as custom_config
from diffrecon_jax.data import example_grid
from tests.test_readme import SMOKE_OVERRIDES

WORKDIR = "gs://bucket/runs/grid"


def _overrides(config) -> None:
  """The README test's smoke settings ("--config.a.b=value") applied to `config`."""
  for flag in SMOKE_OVERRIDES:
    key, value = flag[len("--config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = ast.literal_eval(value) if value[:1] in "(-0123456789" else value


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... mapped onto tmp_path/store/bucket/... for epath; yields that store."""
  store = tmp_path / "store"
  store.mkdir()

  def local(p):
    s = os.fspath(p)
    return str(store / s[len("gs://"):]) if s.startswith("gs://") else s

  def back(p):
    s = str(p)
    return "gs://" + os.path.relpath(s, store) if s.startswith(str(store) + os.sep) else s

  def one(fn, p, *args, **kwargs):
    return fn(local(p), *args, **kwargs)

  def two(fn, p, dst, **kwargs):
    return fn(local(p), local(dst), **kwargs)

  def walk(fn, p, **kwargs):
    for top, dirs, files in fn(local(p), **kwargs):
      yield back(top), dirs, files

  real_manager = checkpoints.manager
  # Orbax's arrays go through tensorstore's own gs:// driver: its manager gets the local folder.
  monkeypatch.setattr(checkpoints, "manager", lambda workdir, *a, **k: real_manager(
      epath.Path(local(workdir)), *a, **k))
  fns = dict(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
             remove=one, rmtree=one, stat=one, rename=two, replace=two, copy=two, walk=walk,
             glob=lambda fn, p: [back(x) for x in fn(local(p))])
  # `epath.testing.mock_epath` swaps every backend, local paths' too, and Orbax's local writes
  # then fail; only gs:// is swapped here, with the same mock backend.
  mock_backend = epath_testing._MockBackend(mock_fns=fns)  # pylint: disable=protected-access
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", mock_backend)  # pylint: disable=protected-access
  yield store


def test_train_evaluate_reconstruct_with_a_bucket_workdir(bucket, tmp_path, monkeypatch):
  data = tmp_path / "data"
  data.mkdir()
  example_grid.main([str(data / "grid.nc")])
  example_grid.main([str(data / "observed.nc"), "--coarsen", "2", "--last", "24",
                     "--nan-fraction", "0.3"])
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  config = custom_config.get_config()
  config.data.path = str(data / "grid.nc")
  _overrides(config)
  config.train.compilation_cache_dir = str(tmp_path / "xla")
  assert run.resolve_workdir(WORKDIR) == WORKDIR  # a URI is kept as it is
  try:
    console.setup(WORKDIR)
    docs = run.run(config, WORKDIR, "train_and_evaluate")
    config.reconstruct.input = str(data / "observed.nc")
    rec = run.run(config, WORKDIR, "reconstruct")[0]
  finally:
    console.close()  # copies the log to the bucket
  assert docs and np.isfinite(docs[0]["results"][0]["mae"])
  assert rec["netcdf"] == f"{WORKDIR}/reconstruction/observed.nc"
  wd = bucket / "bucket" / "runs" / "grid"
  for name in ("config.json", "provenance.json", "log.txt", "metrics.jsonl", "prior.npz",
               "calibration.json", "results.json", "results.md", "results_climatology.json",
               "reconstruction/observed.nc", "reconstruction/observed.npz"):
    assert (wd / name).is_file() and (wd / name).stat().st_size > 0, name
  for folder, suffix in (("masks", ".npz"), ("figures", ".png")):
    assert list((wd / folder).glob(f"*{suffix}")), folder
  for phase in ("stage_c", "stage_f", "joint"):
    assert (wd / phase).is_dir(), phase
  assert "[joint] step 2/2" in (wd / "log.txt").read_text()
  with netCDF4.Dataset(wd / "reconstruction" / "observed.nc") as ds:
    assert ds.variables["flow"].shape[0] == 24 - 2 * 2
  # Nothing was written beside the run: no `gs:` folder (or anything else) under the cwd.
  assert not any(cwd.iterdir()), list(cwd.iterdir())


# Modules that write a run's files (train, evaluate, reconstruct) and what must not appear in
# them: file writes that bypass `paths` (etils.epath) and so cannot reach a bucket.
RUN_MODULES = ("run.py", "evaluate.py", "diffrecon/train.py", "diffrecon/checkpoints.py",
               "diffrecon/loading.py", "console.py", "diffrecon/calibration.py", "provenance.py",
               "diffrecon/prior.py", "figures.py", "user_reconstruct.py", "main.py")
# (Reading a user's input file stays local: only the outputs must reach a bucket.)
BYPASSES = (r"\bnp\.savez?(_compressed)?\(", r"\.savefig\(", r"\bos\.replace\(",
            r"pathlib\.Path\((workdir|wd|folder|figures_dir)\)", r"\bopen\([^)]*[\"'][wa]",
            r"netCDF4\.Dataset\((?!local\b)[^)]*[\"']w", r"FileHandler\((path|wd|workdir)")


def test_the_run_modules_write_only_through_the_path_layer():
  package = pathlib.Path(paths.__file__).parent
  found = []
  for name in RUN_MODULES:
    for k, line in enumerate((package / name).read_text().splitlines(), 1):
      if any(re.search(p, line) for p in BYPASSES):
        found.append(f"{name}:{k}: {line.strip()}")
  assert not found, "\n".join(found)


def test_the_path_layer_on_a_local_folder(tmp_path):
  """Local paths stay pathlib paths; npz, text appends and atomic writes round-trip."""
  p = paths.as_path(tmp_path / "a.npz")
  assert isinstance(p, pathlib.Path) and isinstance(paths.as_path("gs://b/x"), epath.Path)
  paths.save_npz(p, x=np.arange(3), s=np.asarray("sum"))
  z = paths.load_npz(p)
  assert z["x"].tolist() == [0, 1, 2] and str(z["s"]) == "sum"
  paths.append_text(tmp_path / "m.jsonl", "a\n")
  paths.append_text(tmp_path / "m.jsonl", "b\n")
  assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"
  paths.write_text_atomic(tmp_path / "r.json", "{}")
  assert (tmp_path / "r.json").read_text() == "{}" and not (tmp_path / "r.json.tmp").exists()
  assert paths.resolve("rel") == pathlib.Path(os.getcwd()) / "rel"
