"""launch/colab.ipynb runs end to end (with nbclient, in a Python kernel of this environment).

The notebook reads its training budget and extra config fields from the environment
(DIFFRECON_NOTEBOOK_STEPS, DIFFRECON_NOTEBOOK_OVERRIDES); the test gives it the README test's
smoke settings, so it checks every cell (install skipped because the package imports, config,
train + evaluate, results table, figures) in about a minute on 2 cores.
"""
import ast
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests import _train_helpers as helpers
from tests.conftest import REPO_ROOT
from tests.test_readme import SMOKE_OVERRIDES

NOTEBOOK = REPO_ROOT / "launch" / "colab.ipynb"


def _overrides() -> dict:
  """SMOKE_OVERRIDES ("--config.a.b=value") as {"a.b": value} (tuples as JSON lists)."""
  out = {}
  for flag in SMOKE_OVERRIDES:
    key, value = flag[len("--config."):].split("=", 1)
    out[key] = ast.literal_eval(value)
  return out


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
  overrides = _overrides()
  monkeypatch.setenv("DIFFRECON_NOTEBOOK_STEPS", "8")  # the smoke overrides: 2 / 2 / 2
  monkeypatch.setenv("DIFFRECON_NOTEBOOK_OVERRIDES", json.dumps(overrides))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", helpers.FAST_COMPILE_XLA_FLAGS)
  # The kernel imports this checkout (not another installed copy).
  monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      "commit the notebook without outputs")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  params, install, config, train, table, figures = code
  assert "parameters" in params.metadata.get("tags", [])
  assert f"diffrecon_jax from {REPO_ROOT / 'diffrecon_jax'}" in _text(install)
  assert "steps: 2 / 2 / 2" in _text(config) and "random:0.4" in _text(config)
  log = _text(train)
  assert "[joint] step 2/2" in log and "diffrecon random:0.4: MAE" in log, log
  assert "orbax" not in log.lower() and "Save Finalize" not in log, log
  assert (tmp_path / "runs" / "colab" / "log.txt").is_file()
  markdown = [o for o in table.outputs if "text/markdown" in o.get("data", {})]
  assert markdown and "| pattern |" in markdown[0]["data"]["text/markdown"]
  images = [o for o in figures.outputs if "image/png" in o.get("data", {})]
  pngs = sorted(p.name for p in (tmp_path / "runs" / "colab" / "figures").glob("*.png"))
  assert pngs and len(images) == len(pngs), (pngs, len(images))
